"""The ``compress`` command: parses arguments and calls the library; no logic of its own.

Errors a user can fix print one line and exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import click

from compress.benchmark.spec import BenchConfig
from compress.core import distributed
from compress.core.fields import is_utf8, printable
from compress.data.spec import DATASET_KINDS
from compress.errors import CompressError, output_error
from compress.exporters.spec import EXPORTERS, ExportConfig
from compress.pipeline.config import GATE_LATENCY_MODES, GatesConfig
from compress.pruning.spec import PRUNING_CRITERIA


def default(cls: type, name: str):
    """The default of a config field: the CLI shows and uses the recipe's defaults, declared
    once in the specs (importing them costs no torch)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def percent(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def user_errors(fn):
    """The exit code contract (README): 0 success, 1 only for a regression a gate found, 2 for
    bad input or any error, 130 for Ctrl-C. CompressError (and a failed write: full disk,
    read-only folder) prints its one line; any other exception is a bug in compress, printed as
    one line with a hint (the traceback with --debug), and also exits 2: a crash must never
    read as exit 1, "regression", to a CI step."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.pop("debug", False)
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: it prints them and knows their codes
        except (CompressError, OSError) as exc:
            error = exc if isinstance(exc, CompressError) else output_error(exc)
            if error is None:  # an OSError that is not about writing: a bug
                unexpected(exc, debug)
            if debug:
                traceback.print_exc()
            click.echo(
                "error: "
                f"{'' if distributed.is_main() else f'(process {distributed.rank()}) '}{error}",
                err=True,
            )
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            if distributed.is_main():  # Ctrl-C reaches every process of a torchrun: one message
                click.echo(
                    "interrupted: completed stages are kept; run the same command to resume",
                    err=True,
                )
            sys.exit(130)
        except Exception as exc:  # click would print only "Aborted!" for an EOFError
            unexpected(exc, debug)

    return click.option("--debug", is_flag=True, help="Show the full traceback on errors.")(wrapper)


def unexpected(exc: BaseException, debug: bool) -> NoReturn:
    """A bug in compress: one line naming the exception (its traceback with ``debug``), exit 2."""
    if debug:
        traceback.print_exception(exc)
    first = next((line for line in str(exc).splitlines() if line.strip()), "")[:300]
    click.echo(
        f"error: unexpected {type(exc).__name__}: {first or '(no message)'} (a bug in compress: "
        "run the same command with --debug for the traceback, and report it)",
        err=True,
    )
    sys.exit(2)


class TextPath(click.Path):
    """A path argument that must be valid UTF-8: one with another byte would be used for the
    work and then fail to print in the first message that names it (issue 28)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not is_utf8(value):
            self.fail(f"the path {printable(value)!r} is not valid UTF-8; rename it", param, ctx)
        return super().convert(value, param, ctx)


def recipe_options(fn):
    """The overrides shared by ``run`` and ``validate``."""
    options = [
        click.argument("recipe_path", metavar="RECIPE", type=TextPath(dir_okay=False)),
        click.option("--data", help="Dataset path (overrides data.path)."),
        click.option(
            "--epochs", type=click.IntRange(min=0), help="Epochs of every training section."
        ),
        click.option("--subset", help="Use N training (and M test) images: N or N,M."),
        click.option("--device", help="auto, cpu, cuda or cuda:N (overrides device)."),
        click.option("--out", help="Output root folder (overrides out; default exported)."),
        click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="KEY.PATH=VALUE",
            help="Override any recipe field; repeatable.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _load(recipe_path, data, epochs, subset, device, out, overrides, *, warn: bool = True):
    from compress.pipeline.recipe.checks import recipe_warnings
    from compress.pipeline.recipe.load import load_recipe
    from compress.pipeline.recipe.overrides import parse_subset

    recipe = load_recipe(
        recipe_path,
        list(overrides),
        data=data,
        epochs=epochs,
        subset=parse_subset(subset),
        device=device,
        out=out,
    )
    for warning in recipe_warnings(recipe) if warn and distributed.is_main() else ():
        click.echo(f"warning: {warning}", err=True)
    return recipe


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compress")
def cli():
    """Teacher -> distilled, pruned, INT8 student -> ONNX -> benchmark, from one YAML recipe."""


@cli.command()
@recipe_options
@click.option("--force", is_flag=True, help="Re-run every stage even if its inputs are unchanged.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Say which stages would be reused and which would run (and lose their old result); "
    "run nothing.",
)
@click.option(
    "--wait",
    is_flag=True,
    help="If another run is writing the same run folder, wait for it instead of refusing.",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    metavar="N",
    help=(
        "Train data-parallel (DDP) in N processes on this machine: runs this command under "
        "torchrun --standalone --nproc_per_node=N."
    ),
)
@user_errors
def run(recipe_path, data, epochs, subset, device, out, overrides, force, dry_run, wait, nproc):
    """Run RECIPE's stages into <out>/<name>/, skipping stages already done."""
    from compress.pipeline.report import summary_table
    from compress.pipeline.runner import plan
    from compress.pipeline.runner import run as run_pipeline

    if dry_run:
        recipe = _load(recipe_path, data, epochs, subset, device, out, overrides)
        folder = Path(recipe.out) / recipe.name
        for stage, done in plan(recipe).items():
            reused = done and not force
            click.echo(f"{stage}: {'reused (unchanged)' if reused else 'would run'}")
        click.echo(f"run folder: {folder}")
        return

    if nproc is not None:
        if distributed.launched():
            raise click.UsageError(
                "--nproc starts torchrun; a process torchrun started runs without it"
            )
        # a bad recipe: one message, not one per process
        recipe = _load(recipe_path, data, epochs, subset, device, out, overrides, warn=False)
        distributed.per_process_batch(recipe.data.batch_size, nproc)
        sys.exit(
            distributed.launch(nproc, ["run", *_run_arguments(click.get_current_context().params)])
        )
    recipe = _load(recipe_path, data, epochs, subset, device, out, overrides)
    artifacts = run_pipeline(recipe, force=force, wait=wait)
    if not distributed.is_main():
        return
    click.echo(summary_table(artifacts))
    if "bench" in artifacts:
        click.echo("")
        click.echo(artifacts["bench"].files["table"].read_text())
    if recipe.gates.active:
        from compress.pipeline.gates import gate_run, gates_table

        results = gate_run(recipe.gates, Path(recipe.out) / recipe.name)
        click.echo(gates_table(results), nl=False)
        if not all(r.passed for r in results):
            sys.exit(1)


def _run_arguments(params: dict) -> list[str]:
    """The ``compress run`` arguments that give ``params`` again, without ``--nproc``."""
    args = [params["recipe_path"]]
    for name in ("data", "epochs", "subset", "device", "out"):
        if params[name] is not None:
            args += [f"--{name}", str(params[name])]
    for override in params["overrides"]:
        args += ["--set", override]
    return args + [f"--{flag}" for flag in ("force", "wait", "debug") if params.get(flag)]


@cli.command()
@recipe_options
@user_errors
def validate(recipe_path, data, epochs, subset, device, out, overrides):
    """Check RECIPE (and the files it names) without running anything."""
    import yaml

    from compress.pipeline.recipe.serialise import recipe_to_dict

    recipe = _load(recipe_path, data, epochs, subset, device, out, overrides)
    click.echo(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False).rstrip())
    data = (
        f"; data at {recipe.data.path} is readable (its content is read when the run loads it)"
        if recipe.data.path
        else ""
    )
    click.echo(
        f"ok: {recipe_path} is valid ({len(recipe.stages)} stages: "
        f"{', '.join(s.name for s in recipe.stages)}){data}",
        err=True,
    )


def _backends() -> list[str]:
    from compress.benchmark.backend_table import BACKENDS

    return BACKENDS.names()


@cli.command()
@click.argument("model", type=TextPath())
@click.option("--against", type=TextPath(), help="A reference model (the teacher) to compare with.")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    default=list(default(BenchConfig, "backends")),
    show_default=True,
    metavar="NAME",
    help=(
        "Where to measure (repeatable; `compress list backends`): onnxruntime or "
        "onnxruntime-cuda, or openvino for .onnx; torch, torch-compile, torch-cuda or "
        "torch-compile-cuda for a stage folder, tensorrt for .engine."
    ),
)
@click.option(
    "--data",
    type=TextPath(),
    help="Test data for accuracy: a dataset folder (kind detected) or omitted for latency only.",
)
@click.option(
    "--data-kind",
    type=click.Choice(list(DATASET_KINDS)),
    help="Dataset kind when detection is not enough.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=default(BenchConfig, "batch_size"),
    show_default=True,
    help="Throughput batch size (batch 1 is always measured).",
)
@click.option(
    "--iterations",
    type=click.IntRange(min=1),
    default=default(BenchConfig, "iterations"),
    show_default=True,
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=default(BenchConfig, "warmup"),
    show_default=True,
)
@click.option(
    "--time-budget",
    type=click.FloatRange(min=0, min_open=True),
    default=default(BenchConfig, "time_budget_s"),
    show_default=True,
    help="Seconds per measurement at most, split among the processes.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    default=default(BenchConfig, "threads"),
    help="ONNX Runtime intra-op threads (0: its default).",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=default(BenchConfig, "processes"),
    show_default=True,
    help=(
        "Fresh processes per model, interleaved between the models; the p50 is the median of "
        "theirs (1: one process, as before)."
    ),
)
@click.option(
    "--eval-samples",
    type=click.IntRange(min=1),
    help="Test images for accuracy (default: the whole split).",
)
@click.option(
    "--out",
    type=TextPath(file_okay=False),
    help="Folder for bench.json/bench.md (default: next to MODEL).",
)
@user_errors
def bench(
    model,
    against,
    backends,
    data,
    data_kind,
    batch_size,
    iterations,
    warmup,
    time_budget,
    threads,
    processes,
    eval_samples,
    out,
):
    """Benchmark MODEL (an .onnx, a TensorRT .engine or a run's stage folder), and --against OTHER
    side by side."""
    from compress.pipeline.stages.bench import bench_files

    cfg = BenchConfig(
        backends=tuple(backends),
        batch_size=batch_size,
        iterations=iterations,
        warmup=warmup,
        time_budget_s=time_budget,
        threads=threads,
        processes=processes,
        eval_samples=eval_samples,
    )
    result, table_path = bench_files(
        model, against=against, data=data, data_kind=data_kind, cfg=cfg, out=out
    )
    click.echo(table_path.read_text())
    click.echo(f"written: {table_path} and {table_path.with_suffix('.json')}", err=True)
    failed = [row for row in result.rows if row.status != "ok"]
    if result.rows and len(failed) == len(result.rows):
        # nothing was measured: a CI step reading the exit code must not pass
        click.echo(
            f"error: every model failed to bench ({failed[0].role}: {failed[0].error}); see the "
            "table above",
            err=True,
        )
        sys.exit(2)


@cli.command(name="export")
@click.argument("source", type=TextPath())
@click.option(
    "--format",
    "fmt",
    required=True,
    help=(
        "onnx (from a stage folder), onnx-fp16 or tensorrt (from a stage folder or an .onnx); "
        "`compress list formats`."
    ),
)
@click.option(
    "--out", type=TextPath(dir_okay=False), help="The file to write (default: next to SOURCE)."
)
@click.option(
    "--opset", type=click.IntRange(7, 23), default=default(ExportConfig, "opset"), show_default=True
)
@click.option(
    "--exporter",
    type=click.Choice(EXPORTERS),
    default=default(ExportConfig, "exporter"),
    show_default=True,
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    help="A static batch size (default: a dynamic batch axis).",
)
@click.option(
    "--simplify",
    is_flag=True,
    help="Simplify the graph with onnxslim (verified not to change outputs).",
)
@click.option(
    "--data",
    type=TextPath(),
    help=(
        "Dataset for the metadata and check images (default: the data of the recipe that made the "
        "stage)."
    ),
)
@click.option(
    "--engine-fp16/--no-engine-fp16",
    default=default(ExportConfig, "engine_fp16"),
    show_default=True,
    help="TensorRT: allow FP16 kernels.",
)
@click.option(
    "--engine-batch",
    default=",".join(map(str, default(ExportConfig, "engine_batch"))),
    show_default=True,
    help="TensorRT optimisation profile: min,opt,max batch.",
)
@user_errors
def export_(source, fmt, out, opset, exporter, batch, simplify, data, engine_fp16, engine_batch):
    """Export SOURCE (a run's stage folder, or an .onnx file) to one format, verified, outside a
    run."""
    import json

    from compress.pipeline.stages.export import export_file

    try:
        profile = tuple(int(b) for b in engine_batch.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected three integers like 1,32,64, got {engine_batch!r}",
            param_hint="--engine-batch",
        ) from None
    cfg = ExportConfig(
        opset=opset,
        exporter=exporter,
        batch=batch,
        simplify=simplify,
        engine_fp16=engine_fp16,
        engine_batch=profile,
    )
    path, record = export_file(source, fmt, out, cfg, data=data)
    click.echo(json.dumps(record, indent=2, default=str))
    click.echo(f"written: {path}", err=True)


@cli.command()
@click.argument("run_dir", metavar="RUN_DIR", type=TextPath(file_okay=False))
@user_errors
def report(run_dir):
    """(Re)write RUN_DIR/report.md, report.json and report.png from the run's artifacts."""
    from compress.pipeline.report import write_report

    paths = write_report(run_dir)
    click.echo(paths["markdown"].read_text())
    click.echo(f"written: {', '.join(str(p) for p in paths.values())}", err=True)


def _fraction(ctx, param, value: str) -> float:
    """``10%`` -> 0.10; a plain number is a fraction (``0.1``)."""
    text = value.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise click.BadParameter(
            f"expected a percentage like 10% or a fraction like 0.1, got {value!r}"
        ) from None


@cli.command()
@click.argument("result", type=TextPath())
@click.option(
    "--baseline", type=TextPath(), help="The known-good bench.json (or its bench/ or run folder)."
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(min=0),
    default=default(GatesConfig, "max_accuracy_drop"),
    show_default=True,
    help="Top-1 points a model may lose.",
)
@click.option(
    "--max-latency-increase",
    default=percent(default(GatesConfig, "max_latency_increase")),
    show_default=True,
    callback=_fraction,
    help="Batch-1 p50 growth allowed (10% or 0.1).",
)
@click.option(
    "--max-size-increase",
    default=percent(default(GatesConfig, "max_size_increase")),
    show_default=True,
    callback=_fraction,
    help="File size growth allowed.",
)
@click.option(
    "--latency",
    type=click.Choice(GATE_LATENCY_MODES),
    default=default(GatesConfig, "latency"),
    show_default=True,
    help=(
        "relative: latency as a ratio to the run's reference model (machine-independent); auto: "
        "relative when both results have it."
    ),
)
@click.option(
    "--min-int8-agreement",
    callback=lambda ctx, param, value: None if value is None else _fraction(ctx, param, value),
    help=(
        "Floor on the INT8 student's top-1 agreement with its float version (99% or 0.99); needs "
        "no baseline."
    ),
)
@click.option(
    "--allow-missing",
    is_flag=True,
    default=default(GatesConfig, "allow_missing"),
    help="Accept gates the baseline cannot evaluate (metric absent or 0); by default they fail.",
)
@user_errors
def check(
    result,
    baseline,
    max_accuracy_drop,
    max_latency_increase,
    max_size_increase,
    latency,
    min_int8_agreement,
    allow_missing,
):
    """Gate RESULT (a bench.json, its bench/ folder or a run folder) against a baseline and floors;
    exit 1 on a regression."""
    from compress.errors import RecipeError
    from compress.pipeline.gates import check as check_gates
    from compress.pipeline.gates import different_networks, gates_table, load_bench_result

    if baseline is None and min_int8_agreement is None:
        raise RecipeError("nothing to check: give --baseline BASELINE and/or --min-int8-agreement")
    gates = GatesConfig(
        max_accuracy_drop=max_accuracy_drop,
        max_latency_increase=max_latency_increase,
        max_size_increase=max_size_increase,
        latency=latency,
        min_int8_agreement=min_int8_agreement,
        allow_missing=allow_missing,
    )
    current, reference = (
        load_bench_result(result),
        load_bench_result(baseline) if baseline else None,
    )
    for warning in different_networks(current, reference) if reference is not None else []:
        click.echo(warning, err=True)
    results = check_gates(current, reference, gates)
    click.echo(gates_table(results), nl=False)
    sys.exit(0 if all(r.passed for r in results) else 1)


@cli.command()
@click.option(
    "--markdown", is_flag=True, help="Print the recipe reference page (Markdown) instead."
)
@user_errors
def schema(markdown):
    """Print the recipe's JSON Schema (draft 2020-12): point your editor's YAML support at it
    (``# yaml-language-server: $schema=recipe.schema.json``) to complete and check recipes."""
    if markdown:
        from compress.pipeline.recipe.reference import recipe_reference

        click.echo(recipe_reference(), nl=False)
        return
    import json

    from compress.pipeline.recipe.schema import recipe_schema

    click.echo(json.dumps(recipe_schema(), indent=2))


@cli.command(name="list")
@click.argument(
    "what",
    type=click.Choice(
        [
            "stages",
            "losses",
            "criteria",
            "models",
            "datasets",
            "formats",
            "backends",
            "weight-ranges",
        ]
    ),
    required=False,
)
@user_errors
def list_(what):
    """Print what the registries hold (stages, losses, pruning criteria, models, datasets, export
    formats, bench backends, INT8 weight ranges)."""
    from compress.benchmark.backend_table import BACKENDS
    from compress.exporters.formats import FORMATS
    from compress.nets.models import TIMM_NAMES, model_names
    from compress.pipeline.config import STAGE_KINDS
    from compress.quantization.int8_kernels import WEIGHT_RANGES
    from compress.training.losses import LOSSES

    formats = [
        f"{f.name:<10} {f.suffix:<11} {'GPU' if f.needs_gpu else 'CPU'}  {f.options_doc}"
        for f in map(FORMATS.get, FORMATS.names())
    ]
    backends = [
        f"{b.name:<19} {b.artifact:<10} {b.description}"
        for b in map(BACKENDS.get, BACKENDS.names())
    ]
    ranges = [
        f"{r.name:<12} {'portable' if r.portable else 'VNNI only'}  {r.summary}"
        for r in WEIGHT_RANGES.values()
    ]
    tables = {
        "stages": list(STAGE_KINDS),
        "losses": LOSSES.names(),
        "criteria": list(PRUNING_CRITERIA),
        "models": [*model_names(), TIMM_NAMES],
        "datasets": list(DATASET_KINDS),
        "formats": formats,
        "backends": backends,
        "weight-ranges": ranges,
    }
    for name in [what] if what else tables:
        click.echo(f"{name}:")
        for entry in tables[name]:
            click.echo(f"  {entry}")


def main():
    cli(prog_name="compress")


if __name__ == "__main__":
    main()
