"""Data-parallel training across processes: torch.distributed DDP, launched by torchrun.

``torchrun --nproc_per_node=N -m compress run RECIPE`` (or ``compress run RECIPE --nproc N``,
which calls torchrun) starts N copies of the run. :func:`process_group` joins them into one
process group (NCCL on CUDA, gloo on CPU) from the variables torchrun sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...); every rank then runs every training stage
on its share of each batch (:func:`compress.data.make_loaders` gives it a ``DistributedSampler``
and ``data.batch_size / N`` images per step) and :func:`compress.training.loop.fit` wraps the
trained network in ``DistributedDataParallel``, so the gradients are averaged and the weights
stay identical. Rank 0 alone writes files and prints progress; the others wait for it at the end
of each stage and take its artifact (:func:`on_main`).

Every rank is seeded alike, so random decisions outside the data (initialisation, random
pruning) agree everywhere and a checkpoint's random state (rank 0's) fits every rank; the
augmentation draws of a step repeat on each rank, each applied to its own images.

Without torchrun the helpers are no-ops (one process, ``world_size() == 1``) and torch is not
even imported by :func:`rank` / :func:`is_main`, which the CLI asks before printing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

from compress.errors import RecipeError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# how long the other ranks wait for rank 0's export and bench (a failed rank 0 ends them at once)
WAIT_FOR_RANK0_HOURS = 6
_wait_group = None  # a gloo group with that timeout: waiting blocks on a socket, never on a GPU


def launched() -> bool:
    """Whether this process was started by torchrun (its rank variables are set)."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def _dist():
    """``torch.distributed`` if a process group is up, else None (never imports torch itself)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def active() -> bool:
    """Whether a process group is initialised: training is data-parallel (even with one rank)."""
    return _dist() is not None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    """This process's rank: the group's, else torchrun's ``RANK`` (before or after the group),
    else 0."""
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return rank() == 0


@contextmanager
def process_group(device) -> Iterator:
    """Join torchrun's process group for the ``with`` block; yield this rank's device.

    Not under torchrun (or with a group someone else already created): nothing is set up and
    ``device`` is yielded as it is. On CUDA each rank takes the GPU of its ``LOCAL_RANK``
    (``device: cuda`` or ``auto``); the backend is NCCL there and gloo on CPU. The group is
    destroyed on the way out, also when a stage fails.

    Raises:
        RecipeError: ``device: cuda:N`` with more than one process (every rank would share
            GPU N), or more processes on this node than it has GPUs.
    """
    if not launched() or active():
        yield device
        return
    import torch
    import torch.distributed as dist

    global _wait_group
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        device_id=device if device.type == "cuda" else None,
    )
    try:
        _wait_group = dist.new_group(backend="gloo", timeout=timedelta(hours=WAIT_FOR_RANK0_HOURS))
        yield device
    finally:
        _wait_group = None
        dist.destroy_process_group()


def rank_device(device):
    """The device of this torchrun rank: ``cuda:LOCAL_RANK`` for a CUDA run, ``device``
    otherwise."""
    import torch

    if device.type != "cuda":
        return device
    size, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device.index is not None:
        if size > 1:
            raise RecipeError(
                f"device: {device} would put all {size} processes on one GPU; use cuda or auto "
                "(each process takes the GPU of its LOCAL_RANK)"
            )
        return device
    if local >= torch.cuda.device_count():
        raise RecipeError(
            f"device: process {local} of this node has no GPU ({torch.cuda.device_count()} "
            "visible); start at most that many processes per node"
        )
    return torch.device("cuda", local)


def per_process_batch(batch_size: int, processes: int | None = None) -> int:
    """Each rank's share of the global ``data.batch_size``.

    Raises:
        RecipeError: the batch does not split evenly (ranks would take different step sizes).
    """
    processes = world_size() if processes is None else processes
    if batch_size % processes:
        raise RecipeError(
            f"data.batch_size: {batch_size} does not split evenly over {processes} processes; use "
            f"a multiple of {processes} (it is the global batch)"
        )
    return batch_size // processes


def barrier() -> None:
    if (dist := _dist()) is not None:
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum ``tensor`` over the ranks, in place; returns it (unchanged with one process)."""
    if (dist := _dist()) is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its (picklable) result to every rank.

    The other ranks wait here until rank 0 is done (up to ``WAIT_FOR_RANK0_HOURS``), so this
    is also the barrier behind "rank 0 writes, the others read what it wrote". Without a group
    it simply calls ``fn``.
    """
    dist = _dist()
    if dist is None:
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=_wait_group)
    return box[0]


def sync_buffers(model) -> None:
    """Make every rank's buffers rank 0's after an epoch: BatchNorm running statistics are
    averaged over the ranks (each saw its own shard), everything else is copied from rank 0."""
    if (dist := _dist()) is None:
        return
    from torch.nn.modules.batchnorm import _BatchNorm

    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if isinstance(module, _BatchNorm) and name in ("running_mean", "running_var"):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(dist.get_world_size())
            else:
                dist.broadcast(buffer, src=0)


def average_gradients(params) -> None:
    """Average the ``.grad`` of ``params`` over the ranks (a missing gradient counts as zeros),
    so a decision taken from gradients (taylor pruning) is the same on every rank and is the
    one a single process would take on the same global batches."""
    if (dist := _dist()) is None:
        return
    import torch

    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(dist.get_world_size())


def data_parallel(module, device):
    """``module`` wrapped in ``DistributedDataParallel`` when a group is up, else ``module``.

    Buffers are not broadcast before every forward (``forward_sync_buffers=False``): each rank
    keeps BatchNorm statistics of its own shard, and :func:`sync_buffers` merges them after the
    epoch. The wrapper's construction copies rank 0's parameters and buffers to every rank.
    """
    if not active():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers;
    # older releases know the first only
    name = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else "broadcast_buffers"
    )
    return DistributedDataParallel(
        module, device_ids=[device] if device.type == "cuda" else None, **{name: False}
    )


def launch(nproc: int, args: list[str]) -> int:
    """Run ``python -m compress ARGS`` in ``nproc`` processes on this machine under torchrun
    (``torchrun --standalone --nproc_per_node=NPROC -m compress ARGS``); return its exit code.

    Unless ``OMP_NUM_THREADS`` is set, each process gets an equal share of this process's CPU
    cores as its thread count (torchrun alone would give each one thread).

    torchrun's own launcher is called in this process (same interpreter), so the exit code is
    the failed process's own (2 for a user error, 1 for a failed gate or a crash, 130 for
    Ctrl-C), not torchrun's generic 1. When one process fails torchrun stops the others; those
    blocked in a collective with it fail too ("Connection reset by peer", exit code 1), so a
    process that exited with another code is named as the cause.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun would give each process 1 thread: share the cores instead
    if "OMP_NUM_THREADS" not in os.environ:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "compress", *args]))
    except ChildFailedError as exc:
        # SIGTERM: stopped by torchrun
        failed = sorted(
            exc.failures.items(), key=lambda item: (item[1].exitcode in (1, -15), item[1].timestamp)
        )
        failed_rank, failure = failed[0]
        # killed by a signal: 128 + signal
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
        print(
            f"error: process {failed_rank} of {nproc} exited with code {code}; the others were "
            "stopped (see its message above)",
            file=sys.stderr,
        )
        return code
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
