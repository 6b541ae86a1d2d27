"""The typed records of a bench result: one :class:`BenchRow` per measured model, its
:class:`LatencyPoint` per batch size, the :class:`Ratios` against the reference model, and the
:class:`BenchResult` that holds them.

``bench.json`` is written (:meth:`BenchResult.to_json`) and read (:meth:`BenchResult.read`) here
and nowhere else, so a field is renamed in one place and every reader (the table, the gates, the
report, the run summary) follows, or fails at once (a type checker's error, an AttributeError)
instead of reading a silent None. The file keeps the shape CI jobs gate
on and committed baselines hold: a row writes the keys the measurement reached (a file that
could not be read has no size, a runtime that never started no memory), and reading tolerates
files from older versions (keys they lack read as None; keys a newer version added are ignored).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from compress.core.fileio import UnreadableFile, read_json
from compress.errors import DataError
from compress.exporters.formats import ONNX_FORMATS


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
    """Milliseconds per timed run at one batch size: percentiles, mean, spread and extremes
    (results written by older versions lack some, ``p95`` for one)."""

    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None

    def to_json(self) -> dict:
        return _present(self)

    @classmethod
    def from_json(cls, raw: dict) -> LatencyStats:
        return cls(**_known(cls, raw))


@dataclass(frozen=True, kw_only=True)
class ProcessLatency:
    """One fresh measuring process at one batch size: the median of its timed runs, its
    throughput and how many runs it timed, or why it measured nothing (``error``). A row's
    processes are listed in the order they ran: entry r of every row of a backend was measured
    in round r (see :mod:`compress.benchmark.latency`)."""

    p50_ms: float | None = None
    throughput_ips: float | None = None
    runs: int | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return _present(self)

    @classmethod
    def from_json(cls, raw: dict) -> ProcessLatency:
        return cls(**_known(cls, raw))


@dataclass(frozen=True, kw_only=True)
class LatencyPoint:
    """One batch size of a row: its timed runs summarised (``status`` "ok"), or why they failed
    (``status`` "error" and ``error``). ``compile_s`` is the first call of a ``torch.compile``d
    network, timed apart from the runs.

    Measured in several fresh processes (``bench.processes``), ``latency_ms.p50`` is the median
    of the processes' medians and ``throughput_ips`` the median of their throughputs;
    ``processes`` lists each process's own numbers, ``spread`` is (max - min) / median of their
    medians and ``unstable`` says it is over :data:`compress.benchmark.latency.NOISE_BAR`. The
    other percentiles, mean, std and ``cv`` are those of the median process, ``min``/``max``
    the extremes over all processes, ``runs``/``total_s`` the sums. Results written before
    processes (one process per model) lack the three fields.
    """

    batch_size: int
    compile_s: float | None = None
    status: str | None = None
    error: str | None = None
    latency_ms: LatencyStats | None = None
    cv: float | None = None  # coefficient of variation of the timed runs
    noisy: bool | None = None  # cv over compress.benchmark.backends.timing.NOISY_CV: a busy machine
    runs: int | None = None
    total_s: float | None = None
    throughput_ips: float | None = None
    processes: tuple[ProcessLatency, ...] = ()
    spread: float | None = None  # (max - min) / median of the processes' medians
    unstable: bool | None = None  # spread over the noise bar: the processes disagree

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        return _present(self)

    @classmethod
    def from_json(cls, raw: dict) -> LatencyPoint:
        """Raises KeyError without a ``batch_size``."""
        values = _known(cls, raw) | {"batch_size": raw["batch_size"]}
        if raw.get("latency_ms") is not None:
            values["latency_ms"] = LatencyStats.from_json(raw["latency_ms"])
        values["processes"] = tuple(
            ProcessLatency.from_json(entry) for entry in raw.get("processes") or []
        )
        return cls(**values)


_DESCRIBED = ("file_bytes", "params", "macs", "opset", "input_shape")  # describe_artifact's
_TIMED = ("latency", "peak_rss_mb", "model_rss_mb", "runtime")  # a backend's child process's


@dataclass(frozen=True, kw_only=True)
class BenchRow:
    """One model measured one way: its file, what the file holds, its latency per batch size,
    memory, and (ONNX files, with test data) its own top-1 accuracy.

    Fields a measurement did not reach stay None (``latency`` empty); ``status`` and ``error``
    say what failed, and what was measured before the failure is kept.

    Attributes:
        role: the row's name: the model (``"student"``), or ``"student [torch]"`` for a row
            outside the headline group.
        path: the measured file or stage folder.
        backend, format: what measured it, and the kind of artifact it is.
        file_bytes, params, macs, opset, input_shape: read from the ONNX graph (a checkpoint's
            stage record, only the size of an engine); MACs for one image.
        int8_portable: whether the file's integer layers compute alike on every x86 CPU (None:
            no integer layers); ONNX files only.
        warning: a non-portable INT8 file measured where it computes wrong sums.
        latency: one :class:`LatencyPoint` per batch size.
        peak_rss_mb, model_rss_mb, gpu_peak_mb: the measuring process's peak memory, the part
            the model added, and its GPU memory (None on CPU).
        runtime: what the backend reports of itself (providers, threads, versions, device).
        top1, eval_samples: percent correct on the test images, and how many.
        model, group: the model measured and the backend group it was measured in (results
            written before groups lack them).
        agreement_with_reference: fraction of images on which it predicts what the reference
            model of its group predicts.
    """

    role: str
    path: str | None = None
    status: str | None = None
    error: str | None = None
    backend: str | None = None
    format: str | None = None
    file_bytes: int | None = None
    params: int | None = None
    macs: int | None = None
    opset: int | None = None
    input_shape: tuple[int | str, ...] | None = None
    int8_portable: bool | None = None
    warning: str | None = None
    latency: tuple[LatencyPoint, ...] = ()
    peak_rss_mb: float | None = None
    model_rss_mb: float | None = None
    gpu_peak_mb: float | None = None
    runtime: dict[str, Any] | None = None
    top1: float | None = None
    eval_samples: int | None = None
    model: str | None = None
    group: str | None = None
    agreement_with_reference: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def model_name(self) -> str:
        """The model this row measures (its role in results written before groups)."""
        return self.model or self.role

    def latency_at(self, batch_size: int | None) -> LatencyPoint | None:
        """The successful measurement at ``batch_size``, if there is one."""
        return next((p for p in self.latency if p.batch_size == batch_size and p.ok), None)

    def p50_ms(self, batch_size: int) -> float | None:
        """Median latency (ms) at ``batch_size``; None when not measured."""
        point = self.latency_at(batch_size)
        return point.latency_ms.p50 if point and point.latency_ms else None

    def measured_batch_sizes(self) -> set[int]:
        return {p.batch_size for p in self.latency if p.ok}

    def widest(self) -> LatencyPoint | None:
        """The successful measurement at the largest batch size (the throughput figure)."""
        return max((p for p in self.latency if p.ok), key=lambda p: p.batch_size, default=None)

    def to_json(self) -> dict:
        """The row as ``bench.json`` holds it, key for key as compress has always written it:
        every field with a value, plus the null fields of each step the measurement reached
        (the file's facts once it was read, the memory once a backend ran: ``opset`` null for
        a checkpoint, ``gpu_peak_mb`` null on CPU, ``int8_portable`` null for a float ONNX
        file). Rows written before rows named their backend have no ``gpu_peak_mb``, before
        they named their format no ``int8_portable``."""
        described = any(getattr(self, name) is not None for name in _DESCRIBED)
        timed = bool(self.latency) or any(getattr(self, name) is not None for name in _TIMED[1:])
        written = {"role", "error"}
        written |= set(_DESCRIBED) if described else set()
        written |= set(_TIMED) if timed else set()
        if timed and self.backend is not None:
            written.add("gpu_peak_mb")
        if described and self.format in ONNX_FORMATS:
            written.add("int8_portable")
        return _present(self, always=written)

    @classmethod
    def from_json(cls, raw: dict) -> BenchRow:
        """Raises KeyError, TypeError or ValueError on a malformed row (ValueError names the
        field, for a number no measurement produces)."""
        _check_numbers(raw)
        values = _known(cls, raw)
        values["latency"] = tuple(LatencyPoint.from_json(e) for e in raw.get("latency") or [])
        if raw.get("input_shape") is not None:
            values["input_shape"] = tuple(raw["input_shape"])
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class Ratios:
    """A row against the reference model's row of its group; None where either side lacks the
    number. Reductions and speed-ups are > 1 when the row is smaller or faster.

    Attributes:
        speedup_b1: reference p50 / row p50 at batch 1; measured in several processes, the
            median over rounds of the reference's / the row's process median of the same round
            (:func:`compress.benchmark.latency.paired_ratio`).
        speedup_b1_spread: (max - min) / median of those per-round ratios (None with one round).
        speedup_throughput: row / reference images per second at ``throughput_batch_size``,
            the largest batch size both measured; paired by round like ``speedup_b1``.
        speedup_throughput_spread: likewise.
        size_reduction, params_reduction, macs_reduction: reference / row.
        accuracy_delta: row - reference top-1, in percentage points.
        agreement_with_reference: as :attr:`BenchRow.agreement_with_reference`.
    """

    speedup_b1: float | None = None
    speedup_throughput: float | None = None
    throughput_batch_size: int | None = None
    speedup_b1_spread: float | None = None
    speedup_throughput_spread: float | None = None
    size_reduction: float | None = None
    params_reduction: float | None = None
    macs_reduction: float | None = None
    accuracy_delta: float | None = None
    agreement_with_reference: float | None = None

    def to_json(self) -> dict:
        """Every ratio, null or not, as compress has always written them; the spreads (added
        with several processes per model) only when there are some."""
        return _present(self, always={f.name for f in fields(self)} - _SPREADS)

    @classmethod
    def from_json(cls, raw: dict) -> Ratios:
        return cls(**_known(cls, raw))


_SPREADS = {"speedup_b1_spread", "speedup_throughput_spread"}


@dataclass(frozen=True, kw_only=True)
class BenchResult:
    """Every row of one benchmark, the ratios of each row but the reference model's, and where
    they were measured.

    Attributes:
        reference: the model the ratios compare with.
        rows: one per (model, backend group), headline group first.
        ratios: row role -> :class:`Ratios`.
        agreement: row role -> {other row of its group: top-1 agreement}, for the rows with
            predictions.
        groups: the backend groups, headline first.
        config: the bench settings (:class:`compress.benchmark.spec.BenchConfig`).
        machine: :func:`compress.core.machine.machine_info`.
        versions: :func:`compress.core.machine.versions`.
    """

    reference: str | None
    rows: tuple[BenchRow, ...]
    ratios: dict[str, Ratios]
    agreement: dict[str, dict[str, float]] | None = None
    groups: tuple[str, ...] | None = None
    config: dict[str, Any] | None = None
    machine: dict[str, Any] | None = None
    versions: dict[str, str] | None = None

    def row(self, role: str) -> BenchRow | None:
        return next((row for row in self.rows if row.role == role), None)

    def to_json(self) -> dict:
        return _present(self, always={"reference", "rows", "ratios"})

    @classmethod
    def from_json(cls, raw: Any) -> BenchResult:
        """Raises TypeError (not a bench result), KeyError or ValueError (a malformed row)."""
        if (
            not isinstance(raw, dict)
            or not isinstance(raw.get("rows"), list)
            or not all(isinstance(row, dict) and "role" in row for row in raw["rows"])
            or not isinstance(raw.get("ratios") or {}, dict)
        ):
            raise TypeError("not a bench result")
        values = _known(cls, raw)
        values["rows"] = tuple(BenchRow.from_json(row) for row in raw["rows"])
        values["ratios"] = {
            role: Ratios.from_json(ratios) for role, ratios in (raw.get("ratios") or {}).items()
        }
        if raw.get("groups") is not None:
            values["groups"] = tuple(raw["groups"])
        return cls(**{"reference": None} | values)

    @classmethod
    def read(cls, path: str | Path) -> BenchResult:
        """A ``bench.json``.

        Raises:
            DataError: the file is missing, not JSON, or not a bench result (one line naming it).
        """
        path = Path(path)
        try:
            raw = read_json(path)
        except UnreadableFile as exc:
            raise DataError(f"{path}: not a JSON bench result ({exc})") from None
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: not a JSON bench result ({type(exc).__name__})") from None
        try:
            return cls.from_json(raw)
        except ValueError as exc:
            raise DataError(f"{path}: {exc}") from None
        except (TypeError, KeyError, AttributeError):  # a field missing or of the wrong type
            raise DataError(
                f"{path}: not a bench result (expected an object with a list of 'rows', as "
                "compress bench writes)"
            ) from None


def _present(record, always: Collection[str] = ()) -> dict:
    """The fields of a record that hold a value, plus those named in ``always``, in field order,
    as JSON values."""
    return {
        f.name: _plain(getattr(record, f.name))
        for f in fields(record)
        if f.name in always or getattr(record, f.name) not in (None, ())
    }


def _plain(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _known(cls, raw: dict) -> dict:
    """The entries of ``raw`` that are fields of ``cls``: keys from newer versions are ignored.

    Raises:
        TypeError: ``raw`` is not a JSON object.
    """
    if not isinstance(raw, dict):
        raise TypeError(f"{raw!r} is not a JSON object")
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in raw.items() if key in names}


def _check_numbers(row: dict) -> None:
    """Every number a gate reads must be a finite number or absent: a hand-edited ``"NaN"`` or
    ``"fast"`` is a one-line error, not a crash or a silent pass."""
    role = row["role"]
    values = {"top1": row.get("top1"), "file_bytes": row.get("file_bytes")}
    latency = row.get("latency")
    if latency is not None and not isinstance(latency, list):
        raise ValueError(f"rows[{role!r}].latency is not a list of batch entries")
    for entry in latency or []:
        if not isinstance(entry, dict):
            raise ValueError(f"rows[{role!r}].latency holds {entry!r}, not a batch entry")
        latency_ms = entry.get("latency_ms")
        if latency_ms is not None and not isinstance(latency_ms, dict):
            raise ValueError(
                f"rows[{role!r}].latency_ms is {latency_ms!r}, not a mapping of percentiles"
            )
        batch = entry.get("batch_size")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"rows[{role!r}].latency batch_size is {batch!r}, not a positive int")
        values[f"latency[batch {batch}].p50"] = (latency_ms or {}).get("p50")
        processes = entry.get("processes")
        if processes is not None and not (
            isinstance(processes, list) and all(isinstance(p, dict) for p in processes)
        ):
            raise ValueError(f"rows[{role!r}].processes is {processes!r}, not a list of processes")
        for index, process in enumerate(processes or []):
            name = f"latency[batch {entry.get('batch_size')}].processes[{index}].p50_ms"
            values[name] = process.get("p50_ms")
    for name, value in values.items():
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"rows[{role!r}].{name} is {value!r}, not a finite non-negative number"
            )
    top1 = values["top1"]
    if top1 is not None and top1 > 100:
        raise ValueError(f"rows[{role!r}].top1 is {top1!r}, not a percentage 0..100")
