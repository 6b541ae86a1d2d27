"""Which architectures get through the whole chain: train, distill, prune, quantize, export (with
its proof), bench, through the library API, on weights trained on real images.

    python benchmarks/architecture_coverage.py                                  # all, digits
    python benchmarks/architecture_coverage.py --only torchvision:resnet18      # one
    python benchmarks/architecture_coverage.py --source timm                    # timm only
    python benchmarks/architecture_coverage.py --data ../shared/data/cifar10    # on CIFAR-10

Every torchvision classifier (``torchvision.models.list_models``) and one or two models of each
timm family in :data:`TIMM_MODELS` run in a child process of their own (a crash or a hang costs
that model only; ``--timeout`` CPU seconds per thread each, :func:`run_limited`). In the child,
on scikit-learn's handwritten digits (1,797 real scanned images, 1,500 to train, 297 to test),
or CIFAR-10 with ``--data``, resized to the model's image size (64 px, or the first of
56/96/112/128/160/224 its forward accepts):

1. ``train``: cross-entropy, AdamW, ``--steps`` batches scaled down for the heaviest networks
   (at most ``--train-gmacs`` GMACs of forward work in all), so the logits have real margins
   and the INT8 check means something (an untrained network's near-equal logits make
   agreement a coin toss). Digits by default: 200 steps take every network there to 80-100%
   top-1, while on CIFAR-10 most stay at 20-40%, and a network that barely beats chance turns
   the +-1-code differences any two INT8 runtimes have into different predictions (measured:
   an EfficientNet-B0 at 21% top-1 on CIFAR-10 agreed 82% with its own ONNX file, at 95%
   top-1 on digits 98.7%). A network below 50% top-1 trains again, up to twice more (at 0.3
   times the learning rate after a round that gained under 5 points, from its first weights
   if that round ended near chance);
2. ``distill``: a few KD steps (20) from a frozen copy of the trained network;
3. ``prune``: ``compress.prune`` to 1.5x fewer MACs, BatchNorm re-estimated, 60 CE steps (the
   giants, whose training the work cap cuts below that, as many as they trained), twice more
   below 50% top-1;
4. ``quantize``: ``compress.quantize`` (PTQ, percentile calibration, portable weights);
5. ``export``: ``compress.export`` of the INT8 network (the float one where quantize did not
   give one) with its checks: ONNX Runtime against PyTorch, INT8 portability;
6. ``bench``: ``compress.bench``, one process, batch 1 and 8.

A row whose export fails keeps the pruned float network it quantized (``files/<model>/float.pt``,
with its layer widths: ``compress.nets.weights.load_weights``) to look into; every other file is
deleted. Each stage is ``ok``, ``refused`` (a one-line ``CompressError`` that is not a failed
check: a documented refusal) or ``crash`` (a raw exception, a failed export check, a timeout). A
stage that fails hands the network it was given to the next one. Each model's row is kept in
``exported/architecture_coverage/rows/`` (a rerun skips finished models: ``--redo`` runs them
again, and so does moving a row to ``rows_superseded/``; a row deleted comes back from the
result) and all rows go to ``benchmarks/results/architecture_coverage.json``, from which a sweep on
a machine without them (exported/ is not in git) brings them back. Several sweeps may
share the rows folder (two cores, two sweeps over one list in opposite orders): a model being run
is claimed by a ``<row>.running`` file holding the sweep's process id, and a claim whose process
is gone (a sweep killed at a session's end) is taken over.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from compress.core.fileio import write_json_atomic
from compress.core.machine import machine_info

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROWS = ROOT / "exported" / "architecture_coverage" / "rows"
RESULT = HERE / "results" / "architecture_coverage.json"
STAGES = ("distill", "prune", "quantize", "export", "bench")
# tried in this order; 56: ViT-H/14's patches of 14 (4x4 of them, a sixteenth of 224 px's work)
SIZES = (64, 56, 96, 112, 128, 160, 224)
# The heaviest (HEAVY) try 32 px first and train under a larger cap: at 64 px and 2,000 GMACs Wide
# ResNet-101-2 and ResNeXt-101 32x8d got 20 steps a round, ended at 8% top-1, and their INT8
# files could not be proven. The digits are 8x8 images: 32 px loses nothing, costs a quarter of
# 64 px's work a step, and with the cap at HEAVY_TRAIN_GMACS gives them ~130 steps a round.
HEAVY_SIZES = (32, *SIZES)
HEAVY_TRAIN_GMACS = 6000.0
# Not heavy, yet near chance at 64 px under the default cap (60-84 steps: VGG-11 16.5%, VGG-13
# 18.2%, VGG-13-BN 20.2%, ViT-B/16 16.5% top-1): they start at 32 px too, four times the steps
# for the same work (the cap and the timeout stay the light models').
SMALL_FIRST = ("vgg11", "vgg13", "vgg13_bn", "vit_b_16")
# A network below this top-1 after training trains again, at most this many more times: a barely
# trained INT8 network is chaotic (one code rounded the other way flips its top-1), so its export
# proof means little (MobileOne-S0 stayed at 25-36% after 200 steps on digits; LCNet-050's logits
# moved by 5.47 at 40% top-1 on inputs changed by 1e-6).
WELL_TRAINED_TOP1 = 50.0
TRAIN_GMACS = 2000.0  # the training work cap's default (--train-gmacs)
EXTRA_TRAINING_ROUNDS = 2
# A round that gained less than STALLED_GAIN top-1 points has the next one at RETRY_LR_FACTOR of
# its learning rate: AdamW at 1e-3 left a ViT-Tiny at 20.5% (chance is 10%) after 200 steps at
# 64 px however often it was repeated, at 3e-4 it reached 67.0%; while MobileOne-S0 went 25% ->
# 36% -> 56.9% in rounds at 1e-3, and to 46% only when every retry lowered it.
STALLED_GAIN = 5.0
# Ten classes: a network trained to under twice chance gives its INT8 check little to compare
# (near-equal logits, often one class for every image); the table says so.
NEAR_CHANCE_TOP1 = 20.0
RETRY_LR_FACTOR = 0.3
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10's

# One or two models per timm family the issue names (the smallest of each family).
TIMM_MODELS = (
    "resnet18", "resnext26ts", "regnetx_002", "regnety_002", "efficientnet_b0",
    "mobilenetv3_large_100", "convnext_atto", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224", "mobilevit_xxs", "efficientformer_l1", "fastvit_t8",
    "repvgg_a0", "mobileone_s0", "ghostnet_100", "lcnet_050", "mixnet_s", "dla34",
    "hrnet_w18_small", "cspresnet50", "resnest14d", "levit_128s", "edgenext_xx_small",
    "ghostnetv2_100", "tinynet_e", "rexnet_100", "inception_v3", "densenet121",
    # and the families deployers bring beyond the list (the edge networks of 2022-2024,
    # MetaFormers, pyramid transformers)
    "mobilenetv4_conv_small", "repvit_m0_9", "efficientvit_b0", "tiny_vit_5m_224",
    "efficientformerv2_s0", "hgnetv2_b0", "pvt_v2_b0", "poolformerv2_s12", "res2net50_14w_8s",
    "ese_vovnet19b_dw", "repghostnet_050", "mobilevitv2_050", "starnet_s1", "nf_resnet26",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, help="CIFAR-10 (train.npz, test.npz); default: digits")
    parser.add_argument("--only", nargs="*", help="models to run (torchvision:NAME, timm:NAME)")
    parser.add_argument("--source", choices=("torchvision", "timm"), help="one source only")
    parser.add_argument("--steps", type=int, default=200, help="training batches (default 200)")
    parser.add_argument(
        "--train-gmacs",
        type=float,
        help=f"training work cap (default {TRAIN_GMACS:g}; the heaviest {HEAVY_TRAIN_GMACS:g})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="CPU seconds per model and thread (x3 for the heaviest)",
    )
    parser.add_argument("--redo", action="store_true", help="run finished models again")
    parser.add_argument("--report", action="store_true", help="only the table of the rows kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        restore_rows()
        write_result()
        return
    if args.child:
        row = run_chain(args.child, args)
        print("ROW " + json.dumps(row))
        return
    models = args.only or all_models(args.source)
    commit = source_commit()
    cpu = machine_info()["cpu"]
    ROWS.mkdir(parents=True, exist_ok=True)
    restore_rows()
    for index, name in enumerate(models, 1):
        path = ROWS / (name.replace(":", "__") + ".json")
        if path.exists() and not args.redo:
            continue
        claim = path.with_suffix(".running")
        if not claimed(claim):
            print(f"[{index}/{len(models)}] {name}: another sweep runs it", flush=True)
            continue
        try:
            if name.split(":")[-1] in HUGE:
                wait_for(ROWS / "huge.running", name)
            started = time.perf_counter()
            row = run_child(name, args)
            row["seconds"] = round(time.perf_counter() - started, 1)
            row["commit"] = commit  # rows of a long sweep come from several versions of the chain
            row["cpu"] = cpu  # and, across sessions, from several machines
            write_json_atomic(path, row)  # a sweep killed mid-write leaves no half row
        finally:
            for held in (claim, ROWS / "huge.running"):
                release(held)
        print(f"[{index}/{len(models)}] {summary(row)}", flush=True)
    write_result()


def source_commit() -> str | None:
    """The commit of the ``compress`` checkout imported (a sweep's PYTHONPATH may name a
    worktree, an A/B run another checkout)."""
    import compress

    folder = Path(compress.__file__).resolve().parent.parent
    result = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True
    )
    return result.stdout.strip() or None


def restore_rows() -> None:
    """Write back the rows of :data:`RESULT` (in git) that the rows folder lacks: exported/ is not
    kept from one machine to the next, and a sweep of the heaviest networks spans sessions. A
    restored row without a ``cpu`` gets the one the result was written on (every row was, up to
    the first sweep that recorded it per row)."""
    if not RESULT.exists():
        return
    kept = json.loads(RESULT.read_text())
    for row in kept["rows"]:
        path = ROWS / f"{row['source']}__{row['model']}.json"
        if not path.exists() and not (ROWS.parent / "rows_superseded" / path.name).exists():
            write_json_atomic(path, {"cpu": kept["machine"]["cpu"]} | row)


def claimed(claim: Path) -> bool:
    """Claim one model for this sweep; False while another live sweep holds it."""
    for _ in range(2):
        try:
            with open(claim, "x") as file:  # exclusive: of two sweeps, one wins
                file.write(str(os.getpid()))
            return True
        except FileExistsError:
            try:
                holder = int(claim.read_text() or 0)
            except (OSError, ValueError):
                holder = 0
            if not holder or process_alive(holder):  # no id yet: being written this instant
                return False
            claim.unlink(missing_ok=True)  # its sweep is gone: take the model over
    return False


def release(claim: Path) -> None:
    """Give up ``claim`` if this sweep holds it."""
    try:
        if claim.read_text() == str(os.getpid()):
            claim.unlink()
    except FileNotFoundError:
        pass


def wait_for(claim: Path, name: str) -> None:
    """Hold ``claim`` for this sweep, waiting while another sweep holds it."""
    while not claimed(claim):
        print(f"{name}: waits for the other sweep's {claim.stem} model", flush=True)
        time.sleep(60)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


# The heaviest torchvision classifiers (hundreds of MB, minutes per stage): run last, so that a
# sweep cut short by a session's end has covered the most models.
HEAVY = (
    "densenet161", "densenet201", "resnet152", "efficientnet_b4", "efficientnet_b5", "vgg16",
    "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet101_2", "resnext101_32x8d", "resnext101_64x4d",
    "convnext_base", "convnext_large", "maxvit_t", "swin_s", "swin_v2_s", "swin_b", "swin_v2_b",
    "vit_b_32", "vit_l_32", "vit_l_16", "vit_h_14", "regnet_x_16gf", "regnet_x_32gf",
    "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf", "efficientnet_v2_m", "efficientnet_v2_l",
    "efficientnet_b6", "efficientnet_b7",
)  # fmt: skip
HEAVY_TIMEOUT_FACTOR = 3  # their --timeout is this many times longer
# 12-15 GB each at the peak of their chain (the two over 600M parameters; MaxViT-T, which runs only
# at 224 px, reached 14.7 GB before the OOM killer took it beside the test suite; ViT-L/32 peaked
# at 13 GB, and ViT-L/16 beside RegNetY-128GF left 4 GB free), so two sweeps on a 24 GiB machine
# run one of them at a time (the second waits for ``huge.running``, see :func:`claimed`).
HUGE = ("vit_h_14", "regnet_y_128gf", "maxvit_t", "vit_l_16")


def all_models(source: str | None) -> list[str]:
    """torchvision's classifiers but the heaviest, timm's, then the heaviest (lightest first)."""
    from compress.core.compat import torchvision

    listed = sorted(torchvision.models.list_models(torchvision.models))
    light = [f"torchvision:{n}" for n in listed if n not in HEAVY]
    heavy = [f"torchvision:{n}" for n in HEAVY if n in listed]
    timm = [f"timm:{n}" for n in TIMM_MODELS]
    if source == "torchvision":
        return light + heavy
    return timm if source == "timm" else light + timm + heavy


def run_child(name: str, args) -> dict:
    command = [sys.executable, __file__, "--child", name]
    command += ["--data", str(args.data)] if args.data else []
    command += ["--steps", str(args.steps)]
    command += ["--train-gmacs", str(args.train_gmacs)] if args.train_gmacs else []
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    timeout = args.timeout * (HEAVY_TIMEOUT_FACTOR if name.split(":")[-1] in HEAVY else 1)
    done = run_limited(command, env, timeout * int(env["OMP_NUM_THREADS"]))
    if isinstance(done, str):
        return empty_row(name) | {"error": done}
    for line in done.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return empty_row(name) | {"error": f"child died (exit {done.returncode}): {tail[0][:300]}"}


# A model's limit is CPU time (RLIMIT_CPU: past it the kernel ends the child with SIGXCPU), not
# the wall clock: a child starved by other work on the machine, or stopped for a timing, keeps
# its budget (EfficientNet-B7 ran out of wall time twice while tests and timings took the two
# cores). The wall clock only catches a child that hangs without computing, at this many times
# the CPU limit.
WALL_CLOCK_FACTOR = 4


def run_limited(command: list[str], env: dict, cpu_seconds: float):
    """``command``'s ``CompletedProcess``, or the error line when it ran past ``cpu_seconds``
    of CPU time (or hung for WALL_CLOCK_FACTOR times that)."""
    limit = math.ceil(cpu_seconds)

    def limit_cpu() -> None:  # in the child, before it runs
        resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 60))

    wall = WALL_CLOCK_FACTOR * cpu_seconds
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=wall, env=env, preexec_fn=limit_cpu
        )
    except subprocess.TimeoutExpired:
        return f"hung: no result after {wall:.0f} s"
    if done.returncode == -signal.SIGXCPU:
        return f"ran past its {limit} CPU-seconds"
    return done


def empty_row(name: str) -> dict:
    source, model = name.split(":", 1)
    return {
        "source": source,
        "model": model,
        "image_size": None,
        "params": None,
        "stages": dict.fromkeys(STAGES, "crash"),
        "macs_ratio": None,
        "int8_max_diff_ratio": None,
        "int8_agreement": None,
        "portable": None,
        "error": None,
    }


# --- the child: one model through the chain ---------------------------------------------------


def run_chain(name: str, args) -> dict:
    import torch

    import compress
    from compress.nets.models import build_model, count_params_macs
    from compress.nets.weights import save_weights, structure_of

    torch.manual_seed(0)
    row = empty_row(name)
    row["stages"] = {}
    row["stage_seconds"] = {}  # where a model's time goes (training: "train")
    errors = []

    def stage(label: str, work):
        started = time.perf_counter()
        try:
            result = work()
        except Exception as exc:  # the verdict is the point: every exception is recorded
            row["stages"][label] = verdict(exc)
            errors.append(f"{label}: {type(exc).__name__}: {first_line(exc)}")
            if row["stages"][label] == "crash":
                traceback.print_exc()
            return None
        finally:
            row["stage_seconds"][label] = round(time.perf_counter() - started, 1)
        row["stages"][label] = "ok"
        return result

    short_name = name.split(":")[-1]
    heavy = short_name in HEAVY
    small_first = heavy or short_name in SMALL_FIRST
    size, model = fitting_size(name, build_model, HEAVY_SIZES if small_first else SIZES)
    row["image_size"] = size
    row["data"] = "cifar10" if args.data else "digits"
    params, macs = count_params_macs(model, size)
    row["params"] = params
    train, test = cifar(args.data, size) if args.data else digits(size)
    cap = args.train_gmacs or (HEAVY_TRAIN_GMACS if heavy else TRAIN_GMACS)
    steps = training_steps(macs, args.steps, cap)
    ce = [compress.loss("ce")]
    started = time.perf_counter()
    row["top1_trained"], rounds = train_well(compress, model, train, test, steps, ce, lr=1e-3)
    row["train_steps"] = rounds * steps
    row["train_gmacs"] = cap  # the cap it ran under (raised for a few re-runs)
    row["stage_seconds"]["train"] = round(time.perf_counter() - started, 1)

    teacher = copy.deepcopy(model).eval()
    kd = [compress.loss("kd", temperature=4, alpha=0.9)]
    # the giants' training is capped (--train-gmacs): their KD and fine-tuning steps too
    stage(
        "distill", lambda: fit(compress, model, train, min(20, steps), kd, teacher=teacher, lr=2e-4)
    )
    teacher = None  # its memory, for the stages that follow

    example = test[0][0][:2]
    calibration = [images for images, _ in batches(train, 4)]

    def prune():
        pruned = copy.deepcopy(model)
        compress.prune(
            pruned, example, compress.PruneSpec(speedup=1.5), calibration_data=calibration
        )
        train_well(compress, pruned, train, test, min(60, steps), ce, lr=5e-4)  # as quantized
        return pruned

    pruned = stage("prune", prune)
    if pruned is not None:
        row["macs_ratio"] = round(macs / count_params_macs(pruned, size)[1], 3)
        model = pruned
    row["top1_float"] = top1(model, test)
    out = ROWS.parent / "files" / name.replace(":", "__")
    out.mkdir(parents=True, exist_ok=True)
    qmodel = stage("quantize", lambda: compress.quantize(model, calibration))
    network = qmodel if qmodel is not None else model
    check = torch.cat([images for images, _ in test])[:300]
    record = stage(
        "export", lambda: compress.export(network, out / "model.onnx", check_inputs=check)
    )
    if record is not None:
        describe_export(row, record, qmodel is not None)
    else:  # to look into (quantize worked on a copy); written only then: GBs for the giants
        save_weights(model, out / "float.pt", structure=structure_of(model))
    if row["stages"].get("export") == "ok":
        stage(
            "bench",
            lambda: compress.bench(
                {"model": out / "model.onnx"},
                processes=1,
                batch_size=8,
                iterations=20,
                warmup=2,
                time_budget_s=3,
            ),
        )
    for label in STAGES:
        row["stages"].setdefault(label, "crash")
    row["error"] = "; ".join(errors) or None
    for path in out.glob("*"):  # the files are not kept: hundreds of MB across models
        if path.name != "float.pt" or record is not None:  # a failed export's network stays
            path.unlink()
    return row


def fitting_size(name: str, build_model, sizes: tuple[int, ...] = SIZES):
    """The first of ``sizes`` the network's forward accepts in eval and in training mode
    (Inception's auxiliary head runs only in training, and at 96 px its pooling has nothing left
    to pool), and the network built for it (a ViT's position embedding is sized to it)."""
    import torch

    last = None
    for size in sizes:
        try:
            model = build_model(name, num_classes=10, image_size=size)
            with torch.no_grad():
                model.eval()(torch.zeros(2, 3, size, size))
                model.train()(torch.zeros(2, 3, size, size))
            return size, model.train()
        except Exception as exc:  # too small for its pooling or patches: try the next size
            last = exc
    raise last


def digits(size: int):
    """scikit-learn's digits as 3-channel images in [-1, 1] resized to ``size``: training batches
    (1,500 images, 32 a batch) and one test batch (297 images)."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1).repeat(1, 3, 1, 1)
    images = F.interpolate(images / 8 - 1, size=(size, size), mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target).long()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    train = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 1500, 32)]
    return train, [(images[1500:], labels[1500:])]


def cifar(folder: Path, size: int):
    """Training batches (6,400 images, 32 a batch) and test batches (512 images), resized to
    ``size`` and normalised as CIFAR-10."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    def load(split: str, count: int, batch: int):
        with np.load(folder / f"{split}.npz") as archive:
            images, labels = archive["x"][:count], archive["y"][:count]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        out = []
        for start in range(0, len(x), batch):
            chunk = (x[start : start + batch] - mean) / std
            if size != 32:
                chunk = F.interpolate(
                    chunk, size=(size, size), mode="bilinear", align_corners=False
                )
            out.append((chunk, torch.from_numpy(labels[start : start + batch]).long()))
        return out

    return load("train", 6400, 32), load("test", 512, 64)


def batches(data: list, count: int):
    for index in range(count):
        yield data[index % len(data)]


def training_steps(macs: int, steps: int, train_gmacs: float) -> int:
    """``steps`` batches of 32, fewer where their forward and backward work (3x the forward's
    MACs) would pass ``train_gmacs`` GMACs; at least 20."""
    return max(20, min(steps, int(train_gmacs * 1e9 / (3 * macs * 32))))


def train_well(compress, model, data, test, steps, losses, *, lr) -> tuple[float, int]:
    """Train ``steps`` batches, and again (at most :data:`EXTRA_TRAINING_ROUNDS` more times) while
    top-1 is below :data:`WELL_TRAINED_TOP1`: a weak network's INT8 proof means little. A round
    that gained less than :data:`STALLED_GAIN` points is followed by one at
    :data:`RETRY_LR_FACTOR` of its learning rate, from the weights it started from where it
    ended near chance (:data:`NEAR_CHANCE_TOP1`): SqueezeNet and VGG (no BatchNorm) answered one
    class for every image after a round at 1e-3, and rounds at lower rates could not revive
    them. Returns the top-1 and the rounds trained."""
    import torch

    with tempfile.TemporaryDirectory() as folder:  # on disk: a giant's weights are GBs
        start = Path(folder) / "start.pt"
        torch.save(model.state_dict(), start)
        before, rounds = top1(model, test), 0
        while True:
            fit(compress, model, data, steps, losses, lr=lr)
            rounds += 1
            accuracy = top1(model, test)
            if accuracy >= WELL_TRAINED_TOP1 or rounds > EXTRA_TRAINING_ROUNDS:
                return accuracy, rounds
            if accuracy - before < STALLED_GAIN:
                lr *= RETRY_LR_FACTOR  # stuck at this learning rate
                if accuracy < NEAR_CHANCE_TOP1:  # and nothing learnt worth keeping
                    model.load_state_dict(torch.load(start, weights_only=True))
                    accuracy = top1(model, test)
            before = accuracy


def fit(compress, model, data, steps, losses, *, teacher=None, lr):
    compress.distill(
        model.train(),
        teacher,
        list(batches(data, steps)),
        losses=losses,
        epochs=1,
        optimizer="adamw",
        lr=lr,
        weight_decay=0.0,
    )


def top1(model, data) -> float:
    import torch

    model.eval()
    right = total = 0
    with torch.no_grad():
        for images, labels in data:
            right += int((model(images).argmax(1) == labels).sum())
            total += len(labels)
    return round(100 * right / total, 2)


def describe_export(row: dict, record: dict, int8: bool) -> None:
    if not int8:
        return
    row["int8_max_diff_ratio"] = round(record["max_rel_diff"], 4)  # of the largest logit
    row["int8_agreement"] = round(record["top1_agreement"], 4)
    row["portable"] = record.get("portability", {}).get("portable")
    row["int8_float_ops"] = record.get("qdq", {}).get("float_ops")  # where INT8 may not pay
    row["int8_proof"] = record.get("proof", "images")  # "reference noise": only to its own noise


def verdict(exc: BaseException) -> str:
    """``refused``: the product's own one-line refusal with its workaround, including an INT8
    file it cannot prove because the network is too little trained (the sweep's training cap:
    "train the network further"); ``crash``: any other export failure (a file that does not
    reproduce its network) or an exception from inside a library."""
    from compress.errors import CompressError, ExportError, UnprovableNetworkError

    if isinstance(exc, UnprovableNetworkError):
        return "refused"
    if isinstance(exc, ExportError) or not isinstance(exc, CompressError):
        return "crash"
    return "refused"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "")[:300]


def summary(row: dict) -> str:
    stages = " ".join(f"{k}={v}" for k, v in row["stages"].items())
    extra = ""
    if row.get("int8_agreement") is not None:
        extra = f" agree={row['int8_agreement']} diff={row['int8_max_diff_ratio']}"
    error = f" | {row['error'][:160]}" if row.get("error") else ""
    return f"{row['source']}:{row['model']} {row.get('image_size')}px {stages}{extra}{error}"


def write_result() -> None:
    from compress.core.machine import versions

    rows = [json.loads(p.read_text()) for p in sorted(ROWS.glob("*.json"))]
    write_json_atomic(RESULT, {"machine": machine_info() | {"versions": versions()}, "rows": rows})
    print(markdown_table(rows))
    for source in ("torchvision", "timm"):
        mine = [r for r in rows if r["source"] == source]
        verdicts = [set(r["stages"].values()) for r in mine]
        ok = sum(v == {"ok"} for v in verdicts)
        crashed = sum("crash" in v for v in verdicts)
        print(f"{source}: {ok} of {len(mine)} whole chain ok, {crashed} with a crash")
    print(f"written {RESULT}")


def markdown_table(rows: list[dict]) -> str:
    """The RESULTS.md table: one line per model, its stages' verdicts and INT8 numbers."""
    lines = [
        "| model | px | params | " + " | ".join(STAGES) + " | MACs ratio | INT8 agreement "
        "| INT8 max diff | portable | top-1 trained / quantized | commit |",
        "|---|---:|---:|" + "---|" * len(STAGES) + "---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r["params"] else "-"
        cells = [f"{r['source']}:{r['model']}", r["image_size"], params]
        cells += [r["stages"][stage] for stage in STAGES]
        agreement = r["int8_agreement"]
        if agreement is not None and r.get("int8_proof") == "reference noise":
            agreement = f"{agreement} (own noise)"
        cells += [r["macs_ratio"], agreement, r["int8_max_diff_ratio"], r["portable"]]
        trained, quantized = r.get("top1_trained"), r.get("top1_float")
        top1 = f"{trained} / {quantized}" if trained is not None else None
        if top1 is not None and quantized is not None and quantized < NEAR_CHANCE_TOP1:
            top1 += " (near chance: a weak proof)"
        cells += [top1, r.get("commit")]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
