"""Running a TensorRT engine from PyTorch (TensorRT 10 name-based tensor API): load it, read its
I/O tensors and optimisation profile, bind PyTorch CUDA buffers, and run it on real inputs.

Shared by the export stage, which checks a built engine against its PyTorch network
(:func:`infer`), and the TensorRT bench worker, which times it. ``tensorrt`` is passed in or
imported inside the functions: importing this module needs neither TensorRT nor a GPU.

Unverified on real hardware until a GPU session runs the tests marked ``tensorrt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TORCH_DTYPES = {  # trt.DataType member name -> torch dtype
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}


def infer(path: str | Path, inputs: np.ndarray, chunk: int | None = None) -> np.ndarray:
    """Run an engine on real inputs (what the export stage checks it with): float32 NCHW in,
    the first output as float32 out, in chunks the engine's profile accepts.

    Raises:
        ImportError / RuntimeError / ValueError: no tensorrt, no GPU, an engine that cannot run.
    """
    import tensorrt as trt

    torch.cuda.init()
    runtime, engine = load_engine(trt, Path(path))
    context = engine.create_execution_context()
    io = io_tensors(trt, engine)
    low, _, high = profile_batch(engine, io)
    size = min(chunk or high, high)
    outputs = []
    stream = torch.cuda.Stream()
    for start in range(0, len(inputs), size):
        part = inputs[start : start + size]
        count = len(part)
        if count < low:  # pad up to the profile's smallest batch (a static-batch engine)
            part = np.concatenate([part, np.repeat(part[-1:], low - count, axis=0)])
        buffers = bind(context, io, len(part))
        name_in = next(name for name, (is_input, _, _) in io.items() if is_input)
        name_out = next(name for name, (is_input, _, _) in io.items() if not is_input)
        buffers[name_in].copy_(
            torch.from_numpy(np.ascontiguousarray(part)).to(buffers[name_in].dtype)
        )
        torch.cuda.synchronize()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("execute_async_v3 failed (see the TensorRT log)")
        stream.synchronize()
        outputs.append(buffers[name_out].float().cpu().numpy()[:count])
    del context, engine, runtime
    return np.concatenate(outputs)


def load_engine(trt, path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such engine file")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise RuntimeError(
            f"{path.name}: TensorRT {trt.__version__} could not deserialize the engine (built by "
            "another TensorRT version or for another GPU? see the TensorRT log); rebuild it on "
            "this machine"
        )
    return runtime, engine


def io_tensors(trt, engine) -> dict[str, tuple[bool, tuple[int, ...], torch.dtype]]:
    """name -> (is input, engine shape with -1 for dynamic axes, torch dtype)."""
    io = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        io[name] = (
            is_input,
            tuple(engine.get_tensor_shape(name)),
            torch_dtype(trt, engine.get_tensor_dtype(name), name),
        )
    if not any(is_input for is_input, _, _ in io.values()):
        raise ValueError("the engine has no inputs")
    return io


def torch_dtype(trt, dtype, name: str) -> torch.dtype:
    for member, torch_dtype in TORCH_DTYPES.items():
        if getattr(trt.DataType, member, None) == dtype:
            return torch_dtype
    raise ValueError(
        f"tensor {name!r} has TensorRT type {dtype}, which has no PyTorch buffer type here"
    )


def profile_batch(engine, io: dict) -> tuple[int, int, int]:
    """(min, opt, max) batch of optimisation profile 0 that every input accepts."""
    lows, opts, highs = [], [], []
    for name, (is_input, shape, _) in io.items():
        if not is_input:
            continue
        if shape[0] >= 0:  # a static batch: the only one it runs
            low = opt = high = shape
        else:
            low, opt, high = (tuple(dims) for dims in engine.get_tensor_profile_shape(name, 0))
        lows.append(low[0])
        opts.append(opt[0])
        highs.append(high[0])
    return max(lows), max(opts), min(highs)


def device_memory_bytes(engine) -> int:
    """Activation memory one execution context needs (TensorRT >= 10.1 names it ``_v2``)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


def bind(context, io: dict, batch_size: int) -> dict[str, torch.Tensor]:
    """Set every input's shape to ``batch_size``, allocate every I/O tensor on the GPU, bind it."""
    buffers = {}
    for name, (is_input, shape, dtype) in io.items():
        if not is_input:
            continue
        if any(d < 0 for d in shape[1:]):
            raise ValueError(f"input {name!r} has dynamic axes besides the batch: {list(shape)}")
        full = (batch_size, *shape[1:])
        if not context.set_input_shape(name, full):
            raise RuntimeError(f"TensorRT refused input {name!r} of shape {list(full)}")
        if not dtype.is_floating_point:
            raise ValueError(f"input {name!r} has type {dtype}; only float inputs are supported")
        buffers[name] = torch.randn(full, device="cuda").to(dtype)
    for name, (is_input, _, dtype) in io.items():
        if not is_input:
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(
                    f"output {name!r} has a shape TensorRT cannot know before running: "
                    f"{list(shape)}"
                )
            buffers[name] = torch.empty(shape, dtype=dtype, device="cuda")
    for name, tensor in buffers.items():
        if not context.set_tensor_address(name, tensor.data_ptr()):
            raise RuntimeError(f"TensorRT refused the buffer of tensor {name!r}")
    return buffers
