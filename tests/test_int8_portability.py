"""INT8 files that compute the same on every CPU, proven on any CPU.

x86 CPUs without VNNI add pairs of u8 x s8 products in saturating 16-bit lanes (see
compress/quantization/int8_kernels.py). These tests emulate that kernel in numpy on a real exported
layer, so
they show the difference between full-range and portable weights on a VNNI machine too; none of
them depends on the instruction set of the machine that runs it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from compress.benchmark.compare import bench_models
from compress.benchmark.spec import BenchConfig
from compress.core.cpu_features import CpuFeatures, cpu_features
from compress.exporters.onnx.export import export_onnx, preprocessing_metadata
from compress.exporters.onnx.graph import load_onnx
from compress.exporters.onnx.verify import open_session
from compress.exporters.qdq import int8_portability, portable_from_metadata, store_int8_weights
from compress.nets.models import build_model
from compress.nets.weights import load_weights
from compress.quantization.fake_quant import calibrate, prepare_quantized
from compress.quantization.int8_kernels import (
    PAIR_LIMIT,
    U8_MAX,
    WEIGHT_RANGES,
    emulate_pairwise_int16,
    exact_product,
    resolve_weight_range,
    worst_pair_sums,
)

SIZE = 8
PORTABLE = [name for name, r in WEIGHT_RANGES.items() if r.portable]


# --- the arithmetic ---------------------------------------------------------------------------


def test_the_non_vnni_kernel_saturates_exactly_where_the_bound_says():
    weights = np.array([[127, 2], [127, 1], [-64, -64], [-65, -64]], dtype=np.int8).T  # (K=2, N=4)
    activations = np.full((1, 2), U8_MAX, dtype=np.uint8)
    exact, emulated = (
        exact_product(activations, weights),
        emulate_pairwise_int16(activations, weights),
    )
    assert exact.tolist() == [[32895, 32640, -32640, -32895]]
    assert emulated.tolist() == [
        [32767, 32640, -32640, -32768]
    ]  # 129 and -129 saturate, 128 does not
    assert worst_pair_sums(weights, axis=1).tolist() == [129, 128, 128, 129]


def test_opposite_signs_and_single_weights_never_pair():
    assert worst_pair_sums(np.array([[127, -127, 1, -1]])).tolist() == [128]
    assert worst_pair_sums(np.array([[127], [-3]])).tolist() == [127, 3]  # K = 1: nothing to pair


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 40))
def test_weights_within_the_bound_are_exact_in_every_packing_order_and_for_every_input(seed, k):
    rng = np.random.default_rng(seed)
    weights = rng.integers(-127, 128, size=(k, 6))
    weights = np.clip(weights, -PAIR_LIMIT // 2, PAIR_LIMIT // 2) if seed % 2 else weights
    within = worst_pair_sums(weights, axis=1) <= PAIR_LIMIT
    order = rng.permutation(k)
    w = weights[order]
    worst = (
        np.concatenate([(w > 0).T, (w < 0).T]).astype(np.int64) * U8_MAX
    )  # per channel, the largest pair sums
    random = rng.integers(0, 256, size=(8, k))
    for a in (worst, random):
        same = emulate_pairwise_int16(a, w) == exact_product(a, w)
        assert same[:, within].all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 64),
    name=st.sampled_from(PORTABLE),
    depthwise=st.booleans(),
)
def test_portable_weight_ranges_keep_every_pair_within_the_bound(seed, k, name, depthwise):
    rng = np.random.default_rng(seed)
    weight = torch.from_numpy(
        rng.standard_normal((5, k)) * rng.uniform(0.01, 3, size=(5, 1))
    ).float()
    weight[0, 0] = 4 * weight[0].abs().max()  # one dominant weight
    scale = WEIGHT_RANGES[name].scale(weight, depthwise)
    q = torch.round(weight / scale[:, None]).numpy()
    assert np.abs(q).max() <= 127
    if not depthwise:  # depthwise kernels widen before multiplying: any int8 weight is exact there
        assert worst_pair_sums(q).max() <= PAIR_LIMIT
    full = WEIGHT_RANGES["full"].scale(weight, depthwise)
    seven_bit = WEIGHT_RANGES["7bit"].scale(weight, depthwise)
    assert (full <= scale + 1e-12).all() and (
        scale <= seven_bit + 1e-12
    ).all()  # never coarser than 7-bit


def test_auto_is_portable_on_cpu_and_full_range_for_tensorrt():
    assert WEIGHT_RANGES[resolve_weight_range("auto", "onnxruntime-cpu")].portable
    assert resolve_weight_range("auto", "tensorrt") == "full" and not WEIGHT_RANGES["full"].portable
    assert resolve_weight_range("7bit", "tensorrt") == "7bit"


# --- on a real exported layer -----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(digits_teacher, tmp_path_factory):
    """The digits teacher (cifar:resnet20 at 8x8) quantized with each weight range and exported,
    plus real digit images normalised as it expects."""
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("portability")
    digits = load_digits()
    pixels = torch.from_numpy(digits.images[:256] / 16.0).float()[:, None].expand(-1, 3, -1, -1)
    images = ((pixels - 0.5) / 0.25).contiguous()
    model = load_weights(
        build_model("cifar:resnet20", num_classes=10, cifar_stem=True).eval(), digits_teacher
    ).eval()
    files = {}
    for name in ("full", "pair-limit"):
        qmodel = prepare_quantized(
            model, target="onnxruntime-cpu", example_inputs=images[:2], weight_range=name
        )
        calibrate(qmodel, [images[:128]], method="minmax")
        files[name] = (
            qmodel.eval(),
            export_onnx(
                qmodel,
                folder / f"{name}.onnx",
                image_size=SIZE,
                exporter="torchscript",
                transform=store_int8_weights,
            ),
        )
    return files, images.numpy()


def layer_operands(path, images, layer):
    """(u8 activations im2col'd in the two packing orders, int8 weights as (K, N) in each) of one
    Conv of a QDQ file, the activations computed by ONNX Runtime on real images."""
    model = onnx.load(path)
    node = next(
        n for n in model.graph.node if n.op_type == "Conv" and (n.name or n.output[0]) == layer
    )
    producers = {out: n for n in model.graph.node for out in n.output}
    activation_dq, weight_dq = producers[node.input[0]], producers[node.input[1]]
    u8_name = activation_dq.input[0]
    inits = {i.name: i for i in model.graph.initializer}
    weight = numpy_helper.to_array(inits[weight_dq.input[0]]).astype(np.int64)
    zero_point = int(numpy_helper.to_array(inits[activation_dq.input[2]]))
    model.graph.output.append(helper.make_tensor_value_info(u8_name, onnx.TensorProto.UINT8, None))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    u8 = session.run([u8_name], {"input": images})[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    pads, strides = attrs.get("pads", [0, 0, 0, 0]), attrs.get("strides", [1, 1])
    padded = F.pad(
        torch.from_numpy(u8).double(), (pads[1], pads[3], pads[0], pads[2]), value=zero_point
    )
    kh, kw = weight.shape[2:]
    cols = F.unfold(
        padded, (kh, kw), stride=strides
    )  # (N, C*kh*kw, L), reduction order (c, kh, kw)
    channels = weight.shape[1]
    chw = cols.transpose(1, 2).reshape(-1, channels * kh * kw).long().numpy()
    hwc = (
        chw.reshape(-1, channels, kh * kw).transpose(0, 2, 1).reshape(len(chw), -1)
    )  # (kh, kw, c): NHWC kernels
    w_chw = weight.reshape(len(weight), -1).T
    w_hwc = weight.transpose(0, 2, 3, 1).reshape(len(weight), -1).T
    return [(chw, w_chw), (hwc, w_hwc)]


def worst_case(w: np.ndarray) -> np.ndarray:
    """Per output channel, the activations that drive its positive and its negative pairs to the
    limit."""
    return np.concatenate([(w > 0).T, (w < 0).T]).astype(np.int64) * U8_MAX


def test_full_range_weights_give_wrong_sums_on_the_emulated_kernel_and_portable_ones_do_not(
    exported,
):
    files, images = exported
    for name, (_, path) in files.items():
        report = int8_portability(onnx.load(path))
        for a, w in layer_operands(path, images, report.worst_layer):
            assert a.min() >= 0 and a.max() <= U8_MAX and np.abs(w).max() <= 127
            adversarial = worst_case(w)
            wrong = emulate_pairwise_int16(adversarial, w) != exact_product(adversarial, w)
            real = emulate_pairwise_int16(a, w) == exact_product(a, w)
            if name == "full":
                assert not report.portable and report.worst_pair_sum > PAIR_LIMIT
                assert wrong.any(), (
                    "full-range weights must saturate the 16-bit lanes for some input"
                )
            else:
                assert report.portable and report.layers_at_risk == 0
                assert not wrong.any() and real.all()


def test_portability_is_checked_on_every_integer_layer(exported):
    files, _ = exported
    full, portable = (
        int8_portability(onnx.load(files[name][1])) for name in ("full", "pair-limit")
    )
    assert full.layers == portable.layers == 22 == full.paired_layers  # 21 convs + the classifier
    assert full.layers_at_risk == 22 and full.worst_lane > 32767
    assert portable.worst_pair_sum <= PAIR_LIMIT and portable.worst_lane <= 32767


def test_depthwise_convolutions_are_exempt_and_counted():
    torch.manual_seed(0)
    model = build_model("torchvision:mobilenet_v2", num_classes=10, cifar_stem=True).eval()
    qmodel = prepare_quantized(
        model,
        target="onnxruntime-cpu",
        example_inputs=torch.randn(2, 3, 16, 16),
        weight_range="pair-limit",
    )
    calibrate(qmodel, [torch.randn(4, 3, 16, 16)], method="minmax")
    proto = onnx.load_model_from_string(_exported_bytes(qmodel))
    report = int8_portability(proto)
    depthwise = sum(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in model.modules())
    assert report.portable and report.layers - report.paired_layers == depthwise == 17
    # a depthwise layer keeps its full 8-bit range: its largest weight rounds to +-127
    dw = qmodel.get_submodule("features.1.conv.0.0")
    q = torch.round(dw.weight / dw.weight_scale[:, None, None, None])
    assert q.abs().flatten(1).amax(1).eq(127).all()


def _exported_bytes(qmodel) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(
            qmodel.eval(),
            Path(folder) / "m.onnx",
            image_size=16,
            exporter="torchscript",
            transform=store_int8_weights,
        )
        return path.read_bytes()


def test_full_range_file_is_verified_with_the_exact_kernels_where_the_cpu_saturates(
    exported, monkeypatch, tmp_path, capsys
):
    """On any CPU: ONNX Runtime's exact u8u8 kernels (what a VNNI CPU computes) reproduce the
    fake-quantized model; on a CPU said to lack VNNI, the export verifies that way and warns."""
    import compress.core.cpu_features as features
    from compress.exporters.network import prove_portability

    files, images = exported
    qmodel, path = files["full"]
    exact = open_session(path, exact_int8=True).run(None, {"input": images})[0]
    with torch.no_grad():
        theirs = qmodel(torch.from_numpy(images)).numpy()
    assert np.abs(exact - theirs).max() / np.abs(theirs).max() < 0.2
    assert (exact.argmax(1) == theirs.argmax(1)).mean() >= 0.95

    avx2 = CpuFeatures("x86_64", ("avx", "avx2", "fma"), known=True)
    monkeypatch.setattr(
        features, "cpu_features", lambda: avx2
    )  # prove_portability reads it when called
    copy = tmp_path / "full.onnx"
    copy.write_bytes(path.read_bytes())
    record, use_exact = prove_portability(copy, "full", "onnxruntime-cpu", warn=True)
    assert use_exact and record["verified_with"].startswith("u8u8") and not record["portable"]
    assert "saturates" in capsys.readouterr().err
    assert portable_from_metadata({p.key: p.value for p in load_onnx(copy).metadata_props}) is False


def test_a_portable_range_that_yields_a_non_portable_file_is_refused(exported, tmp_path):
    from compress.errors import ExportError
    from compress.exporters.network import prove_portability

    files, _ = exported
    copy = tmp_path / "mislabelled.onnx"
    copy.write_bytes(files["full"][1].read_bytes())
    with pytest.raises(ExportError, match="pairs weights summing to"):
        prove_portability(copy, "pair-limit", "onnxruntime-cpu", warn=False)


# --- the CPU, the bench ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("features", "saturates", "summary"),
    [
        (CpuFeatures("x86_64", ("avx2",), True), True, "x86_64, AVX2, no VNNI"),
        (
            CpuFeatures("x86_64", ("avx2", "avx512f", "avx512bw"), True),
            True,
            "x86_64, AVX-512, no VNNI",
        ),
        (
            CpuFeatures("x86_64", ("avx2", "avx512f", "avx512_vnni"), True),
            False,
            "x86_64, AVX-512, VNNI",
        ),
        (CpuFeatures("x86_64", ("avx2", "avx_vnni"), True), False, "x86_64, AVX2, VNNI"),
        (CpuFeatures("aarch64", ("asimd", "asimddp"), True), False, "aarch64, dot-product"),
        (CpuFeatures("x86_64", (), False), False, "x86_64, flags unknown"),
    ],
)
def test_which_cpus_saturate(features, saturates, summary):
    assert features.saturates_u8s8 is saturates and features.summary() == summary


def test_this_cpus_features_are_read():
    found = cpu_features()
    if found.known and found.x86:  # every x86-64 CPU that runs current torch wheels has SSE4.1
        assert "sse4_1" in found.flags
    assert found.to_dict()["saturates_u8s8"] == found.saturates_u8s8


def test_bench_records_the_cpu_and_warns_when_a_full_range_file_would_saturate(
    exported, monkeypatch, capsys
):
    import compress.benchmark.measure as benchmark

    files, images = exported
    path = files["full"][1]
    cfg = BenchConfig(batch_size=8, warmup=1, iterations=5, time_budget_s=0.3, threads=1)
    result = bench_models({"student": path}, cfg, None, mean=[0.5] * 3, std=[0.25] * 3)
    assert (
        result.machine["cpu_features"]["arch"]
        and "saturates_u8s8" in result.machine["cpu_features"]
    )
    assert (
        result.rows[0].int8_portable is False
    )  # from the weights: this file has no verdict in its metadata
    avx2 = CpuFeatures("x86_64", ("avx2",), True)
    monkeypatch.setattr(benchmark, "cpu_features", lambda: avx2)
    warned = bench_models(
        {"student": path, "portable": files["pair-limit"][1]},
        cfg,
        None,
        mean=[0.5] * 3,
        std=[0.25] * 3,
    )
    student, portable = warned.row("student"), warned.row("portable")
    assert "saturating 16-bit lanes" in student.warning and portable.warning is None
    assert "warning" in student.to_json() and "warning" not in portable.to_json()
    assert capsys.readouterr().err.count("warning:") == 1


def test_preprocessing_metadata_survives_the_portability_verdict(exported, tmp_path):
    from compress.exporters.onnx.export import add_metadata

    files, _ = exported
    copy = tmp_path / "m.onnx"
    copy.write_bytes(files["pair-limit"][1].read_bytes())
    add_metadata(copy, preprocessing_metadata([0.5] * 3, [0.25] * 3, SIZE, 10))
    report = int8_portability(load_onnx(copy))
    add_metadata(copy, report.metadata())
    metadata = {p.key: p.value for p in load_onnx(copy).metadata_props}
    assert metadata["compress.image_size"] == "8" and metadata["compress.int8_portable"] == "true"


@pytest.mark.slow
def test_compress_list_shows_the_weight_ranges_and_which_are_portable():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "compress", "list", "weight-ranges"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(lines) == set(WEIGHT_RANGES)
    assert all(("portable" in lines[name]) == r.portable for name, r in WEIGHT_RANGES.items())
