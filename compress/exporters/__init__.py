"""Writing networks to deployable files: ONNX export and its proof (:mod:`.onnx`, :mod:`.network`),
INT8 QDQ graphs (:mod:`.qdq`), FP16 ONNX (:mod:`.fp16`) and TensorRT engines (:mod:`.tensorrt`).
The table of formats is :data:`compress.exporters.formats.FORMATS`."""

from compress.exporters.formats import FORMATS

__all__ = ["FORMATS"]
