"""Measuring a model in a child process per backend: ONNX Runtime, PyTorch (eager or compiled),
TensorRT. The table of backends is :data:`compress.benchmark.backend_table.BACKENDS`."""
