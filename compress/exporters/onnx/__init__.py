"""ONNX export of an image classifier, the proof that it matches PyTorch, and what the file holds.

Three steps, each usable alone (:mod:`.export`, :mod:`.verify`, :mod:`.graph`):

* :func:`export_onnx` writes one self-contained ``.onnx`` file with a dynamic (or fixed) batch
  axis and our preprocessing (mean/std/image size/classes) in its ``metadata_props``, so the file
  alone is enough to run it correctly;
* :func:`verify_onnx` runs ONNX Runtime and PyTorch on the same images and fails loudly when they
  disagree (CONTRIBUTING.md habit 6: every export proves itself);
* :func:`read_onnx_info` reads size, parameters, MACs and metadata back from any ONNX file, so the
  report and the benchmark describe the exported artifact, not the PyTorch model it came from.

torch is imported inside the functions that need it: reading and benchmarking a file does not
pay for it.
"""
