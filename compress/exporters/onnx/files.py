"""ONNX files of any size as one unit. A file is one protobuf message, which cannot exceed 2 GiB:
a larger network (ViT-H/14 and RegNetY-128GF in float: 2.5 GB) keeps its weights in a sidecar
beside the graph, ONNX's external data, here always ``<name>.onnx.data``
(:func:`compress.core.fileio.sidecar`, which also sizes and hashes the pair as one file). ONNX
Runtime, OpenVINO and TensorRT's parser read the pair from the graph's path; this module writes,
checks and moves the two as one file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from compress.core.fileio import sidecar, write_bytes_atomic
from compress.errors import ExportError, first_line

PROTOBUF_LIMIT = 2**31 - 1  # bytes: the largest message protobuf serialises
# tensors at least this large go to the sidecar when there is one (ONNX's own default)
SIDECAR_MIN_BYTES = 1024


def over_limit(proto: onnx.ModelProto) -> bool:
    """Whether ``proto`` is too large for one file (protobuf cannot even size it then)."""
    try:
        return proto.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # google.protobuf.message.EncodeError: over 2 GiB
        return True


def write_onnx(proto: onnx.ModelProto, path: Path | str) -> Path:
    """Check ``proto`` with ``onnx.checker`` and write it to ``path``, atomically: one file, or
    over the limit, the graph and its sidecar (:func:`sidecar`), written in a hidden folder
    beside ``path`` and moved into place once checked. A sidecar left by an earlier, larger file
    is removed. Over the limit, ``proto``'s weights are moved to the file (it refers to them).

    Raises:
        ExportError: the checker rejects the model (nothing at ``path`` is changed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not over_limit(proto):
        _check(proto, path)
        write_bytes_atomic(path, proto.SerializeToString())
        sidecar(path).unlink(missing_ok=True)
        return path
    folder = path.parent / f".{path.name}.writing"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        pending = folder / path.name
        onnx.save_model(
            proto,
            pending,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=sidecar(path).name,
            size_threshold=SIDECAR_MIN_BYTES,
        )
        _check(str(pending), path)  # the checker reads a model over 2 GiB from its path only
        move_onnx(pending, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def move_onnx(source: Path, target: Path) -> None:
    """Rename a file and its sidecar (the graph names its sidecar, so both keep their name: only
    the folder may change); a sidecar at ``target`` that the moved file does not have is
    removed. The sidecar moves first: the graph never points at a missing one."""
    source, target = Path(source), Path(target)
    if sidecar(source).is_file():
        if source.name != target.name:
            raise ValueError(f"{source.name} has a sidecar: it can move, not be renamed")
        os.replace(sidecar(source), sidecar(target))
    else:
        sidecar(target).unlink(missing_ok=True)
    os.replace(source, target)


def remove_onnx(path: Path | str) -> None:
    """Remove a file and its sidecar, whichever exist."""
    for part in (Path(path), sidecar(path)):
        part.unlink(missing_ok=True)


def _check(model: onnx.ModelProto | str, path: Path) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(
            f"{path.name}: the ONNX checker rejected the export: {first_line(exc)}"
        ) from exc
