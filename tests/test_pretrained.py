"""Pretrained weights in: every source (safetensors and state_dict files, torchvision's weights
names, timm's tags, Hugging Face Hub repositories) read from files and fake caches made here,
head replacement, small-image stems, key mismatches, refused pickles, the offline message, and a
recipe whose teacher and student start from pretrained weights. Nothing touches the network:
every download function is replaced by one that fails the test."""

import urllib.error
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DIGITS_BASE, assert_one_line_error, run_cli
from safetensors.torch import save_file

from compress.core.compat import torchvision
from compress.errors import ModelError
from compress.nets.models import build_model
from compress.nets.pretrained import (
    build_pretrained,
    fit_state_dict,
    load_pretrained,
    parse_weights,
    read_weights_file,
)

HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMM_REPO = "timm/test_resnet.r160_in1k"  # timm's 0.5M-parameter test network, 1000 classes


def save_safetensors(state: dict, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def fake_hub_cache(root: Path, repo: str, state: dict, filename: str = "model.safetensors"):
    """A Hugging Face Hub cache holding ``repo``'s weights file, laid out as huggingface_hub
    writes it (``models--org--name/{refs/main, snapshots/<commit>/<file>}``)."""
    folder = root / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(HUB_COMMIT)
    if filename.endswith(".safetensors"):
        save_safetensors(state, snapshot / filename)
    else:
        torch.save(state, snapshot / filename)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any download attempt fails the test (torch.hub's and the Hub's)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to download: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def timm_reference() -> dict:
    """The state_dict a fake Hub cache holds for timm's test_resnet (1000 classes)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    return timm.create_model("test_resnet", pretrained=False).state_dict()


# --- naming the weights ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, model, kind, name",
    [
        ("teacher.safetensors", "torchvision:resnet18", "file", "teacher.safetensors"),
        ("runs/best.pt", "cifar:resnet20", "file", "runs/best.pt"),
        ("IMAGENET1K_V2", "torchvision:resnet50", "torchvision", "IMAGENET1K_V2"),
        ("ResNet50_Weights.IMAGENET1K_V2", "torchvision:resnet50", "torchvision", None),
        ("pretrained", "torchvision:resnet50", "torchvision", "DEFAULT"),
        ("timm:resnet50.a1_in1k", "timm:resnet50", "timm", "a1_in1k"),
        ("a1_in1k", "timm:resnet50", "timm", "a1_in1k"),
        ("pretrained", "timm:resnet50", "timm", ""),
        ("hf-hub:me/my-model", "cifar:resnet20", "hf-hub", "me/my-model"),
    ],
)
def test_each_form_of_weights_names_its_source(text, model, kind, name):
    source = parse_weights(text, model)
    assert source.kind == kind
    assert source.name == (name if name is not None else text)
    assert source.text == text


def test_hub_revision_is_kept():
    source = parse_weights("hf-hub:me/model@v1.2", "torchvision:resnet18")
    assert (source.name, source.revision) == ("me/model", "v1.2")


@pytest.mark.parametrize(
    "text, model, message",
    [
        ("model.onnx", "torchvision:resnet18", "expected a .safetensors"),
        ("weights/model.h5", "torchvision:resnet18", "expected a weights file ending in"),
        ("timm:resnet50.a1_in1k", "torchvision:resnet50", "need a timm: model"),
        ("timm:resnet18.a1_in1k", "timm:resnet50", "expected timm:resnet50.<tag>"),
        ("pretrained", "cifar:resnet20", "has no named pretrained weights"),
        ("hf-hub:no-slash", "torchvision:resnet18", "expected hf-hub:<org>/<name>"),
        ("", "torchvision:resnet18", "expected a .safetensors"),
    ],
)
def test_weights_that_name_nothing_are_refused(text, model, message):
    with pytest.raises(ModelError, match=message):
        parse_weights(text, model)


# --- files ---------------------------------------------------------------------------------------


def test_safetensors_teacher_gets_a_new_head_for_other_classes(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.squeezenet1_1(weights=None)
    path = save_safetensors(source.state_dict(), tmp_path / "squeezenet.safetensors")
    model, report = build_pretrained("torchvision:squeezenet1_1", 10, str(path))
    # SqueezeNet's classifier is a 1x1 conv: 1000 ImageNet classes -> 10
    assert report.head_replaced == ("classifier.1.weight", "classifier.1.bias")
    assert report.source_classes == 1000
    assert model.classifier[1].weight.shape[0] == 10
    assert report.loaded == len(model.state_dict()) - 2
    for key, tensor in model.state_dict().items():
        if not key.startswith("classifier.1."):
            assert torch.equal(tensor, source.state_dict()[key]), key


def test_same_classes_load_every_tensor_and_compute_the_same(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).eval()
    path = save_safetensors(source.state_dict(), tmp_path / "student.safetensors")
    model, report = build_pretrained("torchvision:mobilenet_v3_small", 10, str(path))
    assert report.head_replaced == () and report.skipped == ()
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.eval()(images), source(images))


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_networks_with_aux_heads_train_on_their_logits_and_load_weights_that_hold_them(
    tmp_path, name
):
    """torchvision's GoogLeNet and Inception-v3 are built without their auxiliary classifiers:
    in training mode those return a tuple (GoogLeNet crashed inside the loss) and Inception's
    needs 299 px. A weights file that holds them (torchvision's own do) loads without them."""
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", num_classes=10)
    logits = model.train()(torch.randn(2, 3, 96, 96))
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 10)
    source = torchvision.models.get_model(name, weights=None, aux_logits=True, init_weights=True)
    assert any(k.startswith(("aux1.", "AuxLogits.")) for k in source.state_dict())
    path = save_safetensors(source.state_dict(), tmp_path / f"{name}.safetensors")
    loaded, report = build_pretrained(f"torchvision:{name}", 1000, str(path))
    assert report.skipped == () and report.head_replaced == ()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[key]), key


def test_small_image_stem_is_left_new_and_recorded(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = save_safetensors(source.state_dict(), tmp_path / "r18.safetensors")
    model, report = build_pretrained("torchvision:resnet18", 10, str(path), cifar_stem=True)
    assert report.reinitialised == ("conv1.weight",)  # 7x7 stride 2 -> 3x3 stride 1
    assert model.conv1.weight.shape[-1] == 3
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_state_dict_of_wrapped_training_loads(tmp_path):
    """DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes, under a "state_dict" key."""
    source = build_model("cifar:resnet20", 10)
    wrapped = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": wrapped}, tmp_path / "best.pt")
    model, report = build_pretrained("cifar:resnet20", 10, str(tmp_path / "best.pt"))
    assert report.loaded == len(model.state_dict())
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_key_mismatch_lists_the_first_keys_and_strict_false_loads_what_fits(tmp_path):
    path = save_safetensors(
        build_model("cifar:resnet20", 10).state_dict(), tmp_path / "r.safetensors"
    )
    with pytest.raises(ModelError) as err:
        build_pretrained("cifar:resnet32", 10, str(path))
    message = str(err.value)
    assert "missing keys layer1.3.conv1.weight" in message and "more)" in message
    assert "strict_weights: false" in message
    model, report = build_pretrained("cifar:resnet32", 10, str(path), strict=False)
    assert report.skipped and all(".3." in k or ".4." in k for k in report.skipped)
    assert report.loaded == len(model.state_dict()) - len(report.skipped)


def test_weights_of_another_architecture_are_refused_even_when_not_strict(tmp_path):
    path = save_safetensors(
        torchvision.models.squeezenet1_1().state_dict(), tmp_path / "s.safetensors"
    )
    with pytest.raises(ModelError, match="no tensor matches a layer"):
        build_pretrained("cifar:resnet20", 10, str(path), strict=False)


def test_a_pickled_whole_model_is_refused_with_how_to_save_a_state_dict(tmp_path):
    torch.save(build_model("cifar:resnet20", 10), tmp_path / "whole.pt")
    with pytest.raises(ModelError, match=r"torch.save\(model.state_dict\(\), path\)"):
        build_pretrained("cifar:resnet20", 10, str(tmp_path / "whole.pt"))


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_corrupt_safetensors_file_is_one_line(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="bad.safetensors is not a safetensors file"):
        read_weights_file(path)


# --- named weights through the libraries' caches ------------------------------------------------


def test_torchvision_weights_name_loads_from_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    source = torchvision.models.squeezenet1_1(weights=None)
    torch.save(source.state_dict(), cache / Path(weights.url).name)
    model, report = build_pretrained("torchvision:squeezenet1_1", 10, "IMAGENET1K_V1")
    assert report.source_classes == 1000 and report.source == "IMAGENET1K_V1"
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    # DEFAULT / pretrained name the same file for this model
    assert (
        build_pretrained("torchvision:squeezenet1_1", 10, "pretrained")[1].loaded == report.loaded
    )


def test_torchvision_googlenet_weights_bring_their_input_transform(tmp_path, monkeypatch):
    """torchvision's builder turns ``transform_input`` on with its ImageNet weights (they were
    trained on inputs the network re-normalises); a weights file of the user's does not."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    source = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    torch.save(source.state_dict(), cache / Path(weights.url).name)
    model, _ = build_pretrained("torchvision:googlenet", 10, "IMAGENET1K_V1")
    assert model.transform_input is True
    expected = torchvision.models.googlenet(
        weights=None, num_classes=10, aux_logits=False, transform_input=True
    )
    expected.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), expected.eval()(images))
    path = save_safetensors(source.state_dict(), tmp_path / "mine.safetensors")
    assert build_pretrained("torchvision:googlenet", 10, str(path))[0].transform_input is False


def test_offline_download_names_the_file_and_where_to_place_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def unreachable(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    with pytest.raises(ModelError) as err:
        build_pretrained("torchvision:squeezenet1_1", 10, "IMAGENET1K_V1")
    message = str(err.value)
    assert weights.url in message and "Name or service not known" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name) in message
    assert "\n" not in message


def test_unknown_torchvision_weights_list_the_known_ones():
    from compress.nets.pretrained import check_source

    with pytest.raises(
        ModelError, match="torchvision knows: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"
    ):
        check_source(parse_weights("IMAGENET21K", "torchvision:resnet50"), "torchvision:resnet50")


def test_timm_tag_loads_through_timm_from_the_hub_cache(hub_cache, timm_reference):
    fake_hub_cache(hub_cache, TIMM_REPO, timm_reference)
    model, report = build_pretrained("timm:test_resnet", 10, "timm:test_resnet.r160_in1k")
    assert report.head_replaced == ("fc.weight", "fc.bias") and report.source_classes == 1000
    state = model.state_dict()
    assert all(
        torch.equal(state[k], v) for k, v in timm_reference.items() if not k.startswith("fc.")
    )
    # the bare tag, 'pretrained' (timm's default tag) and a module built elsewhere: same weights
    for weights in ("r160_in1k", "pretrained"):
        again, _ = build_pretrained("timm:test_resnet", 10, weights)
        assert torch.equal(again.conv1[0].weight, model.conv1[0].weight)
    loose = build_model("timm:test_resnet", 10)
    assert load_pretrained(loose, "r160_in1k").head_replaced == ("fc.weight", "fc.bias")
    assert torch.equal(loose.conv1[0].weight, model.conv1[0].weight)


def test_timm_weights_missing_offline_name_the_repository(hub_cache):
    pytest.importorskip("timm")
    with pytest.raises(ModelError) as err:
        build_pretrained("timm:test_resnet", 10, "pretrained")
    assert TIMM_REPO in str(err.value) and str(hub_cache) in str(err.value)
    assert "HF_HUB_OFFLINE=1" in str(err.value)


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hub_repository_weights_load_from_the_hub_cache(hub_cache, filename):
    source = build_model("cifar:resnet20", 10)
    fake_hub_cache(hub_cache, "me/digits-resnet20", source.state_dict(), filename)
    model, report = build_pretrained("cifar:resnet20", 10, "hf-hub:me/digits-resnet20")
    assert report.loaded == len(model.state_dict())
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_hub_repository_not_cached_offline_is_one_line(hub_cache):
    with pytest.raises(ModelError, match="cannot fetch model.safetensors or pytorch_model.bin of"):
        build_pretrained("cifar:resnet20", 10, "hf-hub:me/absent")


def test_fit_state_dict_works_on_any_module():
    """The library path: a user's own nn.Module and a state_dict in memory."""
    source = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 100)
    )
    target = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 5)
    )
    report = fit_state_dict(target, source.state_dict(), "memory")
    assert report.head_replaced == ("2.weight", "2.bias") and report.source_classes == 100
    assert torch.equal(target[0].weight, source[0].weight)


# --- recipes --------------------------------------------------------------------------------------


def recipe(tmp_path: Path, **sections) -> Path:
    raw = {**DIGITS_BASE, "name": "pretrained", **sections}
    path = tmp_path / "pretrained.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "teacher, message",
    [
        ({"model": "torchvision:resnet50", "weights": "IMAGENET21K"}, "teacher.weights: "),
        ({"model": "cifar:resnet20", "weights": "missing.safetensors"}, "no such file"),
        (
            {"model": "cifar:resnet20", "weights": "a.pt", "checkpoint": "b.pt"},
            "give checkpoint (the finished teacher) or weights",
        ),
    ],
)
@pytest.mark.slow
def test_recipe_weights_are_checked_before_anything_runs(tmp_path, teacher, message):
    result = run_cli("run", recipe(tmp_path, teacher=teacher), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, message)


@pytest.mark.slow
def test_new_head_without_training_is_refused(tmp_path):
    path = save_safetensors(
        build_model("cifar:resnet20", 100).state_dict(), tmp_path / "c100.safetensors"
    )
    teacher = {"model": "cifar:resnet20", "weights": str(path), "train": {"epochs": 0}}
    result = run_cli(
        "run", recipe(tmp_path, teacher=teacher), "--out", tmp_path / "out", cwd=tmp_path
    )
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "teacher.weights:", "100 classes", "train.epochs >= 1")


@pytest.mark.slow
def test_safetensors_teacher_and_pretrained_student_run_end_to_end(
    tmp_path, digits_teacher, timm_reference
):
    """The user's path: a trained teacher handed over as .safetensors (kept as it is: epochs 0),
    a student starting from timm weights found in the Hub cache (head replaced), distilled,
    exported and measured; run as a user runs it, in a fresh process with HF_HOME set."""
    import os

    teacher_file = save_safetensors(
        torch.load(digits_teacher, weights_only=True), tmp_path / "teacher.safetensors"
    )
    hf_home = tmp_path / "hf"
    fake_hub_cache(hf_home / "hub", TIMM_REPO, timm_reference)
    path = recipe(
        tmp_path,
        teacher={"model": "cifar:resnet20", "weights": str(teacher_file), "train": {"epochs": 0}},
        student={"model": "timm:test_resnet", "weights": "timm:test_resnet.r160_in1k"},
        stages=[
            "teacher",
            {"distill": {"train": {"epochs": 2, "optimizer": "adamw", "lr": 0.003}}},
            "export",
            {
                "bench": {
                    "processes": 1,
                    "batch_size": 8,
                    "iterations": 5,
                    "warmup": 1,
                    "time_budget_s": 1,
                }
            },
        ],
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "compress", "run", str(path), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "pretrained"
    import json

    teacher = json.loads((run / "teacher" / "stage.json").read_text())["metrics"]
    original = json.loads((Path(digits_teacher).parent / "stage.json").read_text())["metrics"]
    assert teacher["source"] == "pretrained"
    assert teacher["top1"] == pytest.approx(original["top1"])  # the same network, unchanged
    assert teacher["weights"]["loaded"] == len(torch.load(digits_teacher, weights_only=True))
    distill = json.loads((run / "distill" / "stage.json").read_text())["metrics"]
    assert distill["student_weights"]["head_replaced"] == ["fc.weight", "fc.bias"]
    assert distill["student_weights"]["source_classes"] == 1000
    assert distill["top1"] > 50  # learned the digits from its pretrained start
    assert (run / "student.onnx").is_file()


def test_a_rewritten_weights_file_reruns_the_stages(tmp_path):
    from compress.pipeline.recipe.load import load_recipe
    from compress.pipeline.runner import stage_keys

    path = save_safetensors(
        build_model("cifar:resnet20", 10).state_dict(), tmp_path / "t.safetensors"
    )
    recipe_path = recipe(tmp_path, teacher={"model": "cifar:resnet20", "weights": str(path)})
    before = [key for _, key, _ in stage_keys(load_recipe(recipe_path))]
    save_safetensors(build_model("cifar:resnet20", 10).state_dict(), path)
    after = [key for _, key, _ in stage_keys(load_recipe(recipe_path))]
    assert before != after
    from compress.pipeline.recipe.serialise import recipe_to_dict
    from compress.pipeline.runner import shared_inputs

    plain = load_recipe(recipe(tmp_path, teacher=DIGITS_BASE["teacher"]))
    assert "weights_sha256" not in shared_inputs(plain, recipe_to_dict(plain))  # old keys stay


@pytest.mark.slow
def test_a_pretrained_student_ends_with_batchnorm_statistics_of_the_new_data(
    tmp_path, digits_teacher
):
    """Pretrained statistics describe another dataset, and MobileNetV3 updates them with
    momentum 0.01: after a short fine-tune the eval-mode student was near chance (224 px run:
    7.4% at 95.6% training accuracy). The distill stage re-estimates them after training."""
    from conftest import run_recipe

    torch.manual_seed(0)
    stale = build_model("torchvision:mobilenet_v3_small", 10, cifar_stem=True).state_dict()
    for name, value in stale.items():  # statistics of "ImageNet": far from the digits'
        if name.endswith("running_mean"):
            value.fill_(3.0)
        elif name.endswith("running_var"):
            value.fill_(0.01)
    weights = save_safetensors(stale, tmp_path / "student.safetensors")
    artifacts = run_recipe(
        tmp_path,
        {
            **DIGITS_BASE,
            "name": "stale_statistics",
            "teacher": {"model": "cifar:resnet20", "checkpoint": digits_teacher},
            "student": {
                "model": "torchvision:mobilenet_v3_small",
                "cifar_stem": True,
                "weights": str(weights),
            },
            "stages": [
                "teacher",
                {"distill": {"train": {"epochs": 2, "optimizer": "adamw", "lr": 0.003}}},
            ],
        },
    )
    metrics = artifacts["distill"].metrics
    assert metrics["top1_before_batchnorm_recalibration"] < 30  # the stale statistics
    assert metrics["top1"] > metrics["top1_before_batchnorm_recalibration"] + 25
