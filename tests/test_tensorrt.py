"""TensorRT engines: the code path up to the import runs everywhere; the build itself only where
tensorrt and a CUDA device exist (marked `tensorrt`, skipped elsewhere)."""

import importlib.util

import pytest
import torch
from torch import nn

from compress.errors import ExportError
from compress.exporters.formats import FORMATS
from compress.exporters.onnx.export import export_onnx
from compress.exporters.tensorrt import build_engine

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def test_the_format_table_names_the_engine_builder():
    from compress.exporters.tensorrt import build_from_onnx, convert_onnx

    fmt = FORMATS.get("tensorrt")
    assert (fmt.suffix, fmt.needs_gpu, fmt.artifact, fmt.builder, fmt.converter) == (
        ".engine",
        True,
        "engine",
        build_from_onnx,
        convert_onnx,
    )


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_error_says_how_to_get_it(tmp_path):
    onnx_path = export_onnx(small_cnn(), tmp_path / "m.onnx", image_size=8)
    with pytest.raises(
        ExportError,
        match=(
            r"tensorrt package, which is not installed; install the extra .*pip install -e "
            r"'\.\[tensorrt\]'"
        ),
    ):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not (HAVE_TENSORRT and torch.cuda.is_available()), reason="needs tensorrt and a CUDA device"
)
def test_engine_builds_with_a_batch_profile_and_reuses_its_timing_cache(tmp_path):
    import tensorrt as trt

    onnx_path = export_onnx(small_cnn(), tmp_path / "m.onnx", image_size=8)
    cache = tmp_path / "timing.cache"
    engine_path = build_engine(
        onnx_path, tmp_path / "m.engine", fp16=True, batch=(1, 4, 8), timing_cache=cache
    )
    assert cache.is_file() and cache.stat().st_size > 0
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
        engine_path.read_bytes()
    )
    shapes = engine.get_tensor_profile_shape("input", 0)
    assert [tuple(s)[0] for s in shapes] == [1, 4, 8]
    assert build_engine(
        onnx_path, tmp_path / "again.engine", fp16=True, batch=(1, 4, 8), timing_cache=cache
    ).is_file()


@pytest.mark.tensorrt
@pytest.mark.skipif(
    not (HAVE_TENSORRT and torch.cuda.is_available()), reason="needs tensorrt and a CUDA device"
)
def test_engine_reproduces_its_pytorch_model_and_a_wrong_engine_fails(tmp_path):
    import numpy as np

    from compress.exporters.spec import ExportConfig
    from compress.exporters.tensorrt import verify_engine

    model = small_cnn()
    onnx_path = export_onnx(model, tmp_path / "m.onnx", image_size=8)
    engine_path = build_engine(onnx_path, tmp_path / "m.engine", fp16=True, batch=(1, 4, 8))
    images = np.random.default_rng(0).standard_normal(
        (19, 3, 8, 8), dtype=np.float32
    )  # not a multiple of 8
    record = verify_engine(engine_path, model, images, ExportConfig(), int8=False)
    assert record["samples"] == 19 and record["max_rel_diff"] <= ExportConfig().fp16_tolerance
    other = small_cnn()
    with torch.no_grad():
        other[0].weight.mul_(-1)
    with pytest.raises(ExportError, match="does not reproduce"):
        verify_engine(engine_path, other, images, ExportConfig(), int8=False)
