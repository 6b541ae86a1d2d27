"""The typed records stages hand each other and write to disk: which network a stage holds
(:class:`NetworkSpec`) and what a finished stage left behind (:class:`StageRecord`).

``stage.json`` is read and written here and nowhere else, so a field is renamed in one place
and every reader (resume, reload, ``compress export``, the torch bench worker, the report)
follows. Records written before :class:`NetworkSpec` existed kept the network's identity in
their metrics; :meth:`StageRecord.from_json` still reads them, so old run folders resume.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.core.fileio import UnreadableFile, content_sha256, read_json
from compress.errors import ModelError

STAGE_RECORD = "stage.json"


@dataclass(frozen=True)
class QuantSpec:
    """How a quantized network's fake-quantized graph is rebuilt: the runtime it targets, the
    layers left in float, and the integer weight range it was trained and exported with."""

    target: str
    skip: tuple[str, ...] = ()
    weight_range: str = "full"  # stages quantized before weight ranges existed used the full range
    # activation products quantized (QLinearMul); networks quantized before it existed: not
    integer_products: bool = False
    # the activations written as products to quantize (compress.quantization.fake_quant.
    # PRODUCT_ACTIVATIONS); networks quantized before SiLU was one: the hard-swish alone
    product_activations: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, raw: dict) -> QuantSpec:
        products = bool(raw.get("integer_products", False))
        return cls(
            target=raw["target"],
            skip=tuple(raw.get("skip", ())),
            weight_range=raw.get("weight_range", "full"),
            integer_products=products,
            product_activations=tuple(
                raw.get("product_activations", ("hardswish",) if products else ())
            ),
        )


@dataclass(frozen=True)
class PruneStep:
    """One cut of :func:`compress.prune` and what it cost: the MACs (one image) and parameters
    it left, top-1 right after the cut, after the BatchNorm re-estimation and after fine-tuning
    (None where not measured or not done), and for a latency target the measured cut."""

    target_macs: int | None
    macs: int
    params: int
    top1_pruned: float | None = None
    top1_recalibrated: float | None = None
    top1: float | None = None
    latency: dict | None = None  # compress.pruning.latency.LatencyCut.to_json()

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NetworkSpec:
    """Everything needed to rebuild a stage's network from its weights file, besides the input
    (channels, image size) which comes from the data. A pruned network's layer widths live in
    its weights file (:func:`compress.nets.models.load_weights` resizes before loading)."""

    model: str
    num_classes: int
    cifar_stem: bool = False
    quantization: QuantSpec | None = None

    @property
    def quantized(self) -> bool:
        return self.quantization is not None

    def to_json(self) -> dict:
        raw = asdict(self)
        if self.quantization is not None:
            raw["quantization"]["skip"] = list(self.quantization.skip)
            raw["quantization"]["product_activations"] = list(self.quantization.product_activations)
        return raw

    @classmethod
    def from_json(cls, raw: dict) -> NetworkSpec:
        quantization = raw.get("quantization")
        return cls(
            model=raw["model"],
            num_classes=int(raw["num_classes"]),
            cifar_stem=bool(raw.get("cifar_stem", False)),
            quantization=QuantSpec.from_json(quantization) if quantization else None,
        )


@dataclass(frozen=True)
class FileRecord:
    """One file a stage wrote: its path relative to the run folder (the folder can move), and
    the sha256 and size that prove it is the file the stage wrote."""

    path: str
    sha256: str
    bytes: int


@dataclass
class StageRecord:
    """``<run>/<stage>/stage.json``: a finished stage's files, results, network and inputs.

    Written last and atomically by the pipeline, so its presence with a matching ``key`` and
    matching file hashes is what "this stage is complete" means.
    """

    stage: str
    kind: str
    key: str
    role: str | None = None
    finished: str = ""
    seconds: float = 0.0
    peak_rss_mb: float | None = None  # see compress.pipeline.memory.stage_peak_rss
    files: dict[str, FileRecord] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    network: NetworkSpec | None = None
    config: Any = None
    recipe: dict = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    folder: Path | None = field(default=None, compare=False)  # where it was read from

    @property
    def run_dir(self) -> Path:
        assert self.folder is not None, "a record that was not read from a run folder"
        return self.folder.parent

    def path(self, role: str) -> Path:
        """The absolute path of the file recorded for ``role``, proven to be that file.

        Raises:
            ModelError: the record points outside its run folder (directly, through ``..`` or a
                link), or the file is missing or is not the one the stage wrote (sha256).
        """
        entry = self.files[role]
        path = self.run_dir / entry.path
        where = self.folder / STAGE_RECORD if self.folder else self.stage
        if not path.resolve().is_relative_to(self.run_dir.resolve()):
            raise ModelError(
                f"{where}: its {role} file {entry.path} lies outside the run folder; refusing to "
                "load it"
            )
        if not path.is_file():
            raise ModelError(f"{where}: its {role} file {entry.path} is missing")
        if content_sha256(path) != entry.sha256:
            raise ModelError(
                f"{where}: its {role} file {entry.path} is not the file the stage wrote (sha256 "
                "differs); re-run the stage"
            )
        return path

    @property
    def image_size(self) -> int:
        """The input size the stage's network was trained at (its resolved recipe's data)."""
        return int(self.recipe["data"]["image_size"])

    def to_json(self) -> dict:
        raw = {
            "stage": self.stage,
            "kind": self.kind,
            "key": self.key,
            "role": self.role,
            "finished": self.finished,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "files": {role: asdict(entry) for role, entry in self.files.items()},
            "metrics": self.metrics,
            "config": self.config,
            "recipe": self.recipe,
            "versions": self.versions,
        }
        if self.network is not None:
            raw["network"] = self.network.to_json()
        return raw

    @classmethod
    def from_json(cls, raw: dict, folder: Path | None = None) -> StageRecord:
        """Raises KeyError, TypeError or ValueError on a malformed record (:meth:`read` words
        them)."""
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        metrics = raw.get("metrics") or {}
        _check_metrics(metrics)
        # records before NetworkSpec
        network = raw.get("network") or (
            metrics if "model" in metrics and "num_classes" in metrics else None
        )
        return cls(
            stage=str(raw["stage"]),
            kind=str(raw.get("kind") or raw["stage"]),
            key=str(raw.get("key", "")),
            role=raw.get("role"),
            finished=str(raw.get("finished", "")),
            seconds=float(raw.get("seconds", 0.0)),
            peak_rss_mb=None if raw.get("peak_rss_mb") is None else float(raw["peak_rss_mb"]),
            files={
                role: FileRecord(str(e["path"]), str(e["sha256"]), int(e.get("bytes", 0)))
                for role, e in (raw.get("files") or {}).items()
            },
            metrics=metrics,
            network=NetworkSpec.from_json(network) if network else None,
            config=raw.get("config"),
            recipe=raw.get("recipe") or {},
            versions=raw.get("versions") or {},
            folder=folder,
        )

    @classmethod
    def read(cls, path: str | Path, *, expected: str = "a finished stage") -> StageRecord:
        """The record of a stage folder (or of its ``stage.json`` given directly); ``expected``
        words the error for the caller's purpose.

        Raises:
            ModelError: no such file, not JSON, or not a stage record (one line, naming the file).
        """
        path = Path(path)
        record_path = path if path.name == STAGE_RECORD else path / STAGE_RECORD
        try:
            return cls.from_json(read_json(record_path), folder=record_path.parent)
        except (FileNotFoundError, NotADirectoryError):
            raise ModelError(f"{record_path}: not {expected} (no such file)") from None
        except OSError as exc:  # a read error, never "cannot write"
            raise ModelError(
                f"{record_path}: not {expected} (cannot read it: {exc.strerror or exc})"
            ) from None
        except UnreadableFile as exc:
            raise ModelError(f"{record_path}: not {expected} ({exc})") from None
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:  # a field of the wrong type
            what = (
                f"no {exc} recorded"
                if isinstance(exc, KeyError)
                else str(exc)
                if str(exc).startswith("metric")
                else "not a stage record"
            )
            raise ModelError(f"{record_path}: not {expected} ({what})") from None

    def network_file(self) -> Path:
        """The weights of the network this stage holds.

        Raises:
            ModelError: the stage holds no network (an export or bench stage, say).
        """
        if self.network is None or "model" not in self.files:
            raise ModelError(
                f"{self.folder / STAGE_RECORD if self.folder else self.stage}: not a finished "
                "stage holding a network (no network recorded)"
            )
        return self.path("model")


PERCENT_METRICS = ("top1", "fp32_top1", "ptq_top1", "teacher_top1", "top1_before", "top1_at_start")
COUNT_METRICS = ("params", "macs", "params_before", "macs_before", "teacher_params", "teacher_macs")


def _check_metrics(metrics: Any) -> None:
    """Numbers no stage can produce mean a hand-edited record: refuse it rather than report it."""
    if not isinstance(metrics, dict):
        raise TypeError("metrics is not a mapping")
    for name in PERCENT_METRICS:
        value = metrics.get(name)
        if value is not None and not (
            isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 100.0
        ):
            raise ValueError(f"metric {name} = {value!r} is not a percentage")
    for name in COUNT_METRICS:
        value = metrics.get(name)
        if value is not None and not (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        ):
            raise ValueError(f"metric {name} = {value!r} is not a count")
