#!/usr/bin/env bash
# Everything a session with a GPU should check, in one command that fits one device call
# (about 8 minutes on an H100): the CUDA tests (marked gpu/tensorrt), the distill-step
# throughput on CUDA, and the quickstart on CUDA benchmarked on every CUDA backend.
#
# Prepare here (the device has no network; torch-pruning and onnxslim are not in its image):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl torch-pruning==1.6.1 onnxslim==0.1.98
# then call the device tool's run with command "bash benchmarks/gpu_checks.sh", carry [".whl"],
# timeout_s 600. Results land in $OUT (the files come back) and are summarised in
# benchmarks/RESULTS.md by hand. The package runs from the source tree (PYTHONPATH), with the
# device's own torch, onnx and onnxruntime.
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install --no-deps --no-index -q .whl/*.whl > "$out/install.txt" 2>&1
{
    nvidia-smi
    python3 -c "import torch, onnxruntime as o; print('torch', torch.__version__, torch.cuda.get_device_name(), '| onnxruntime', o.__version__, o.get_available_providers())"
    python3 -c "import tensorrt; print('tensorrt', tensorrt.__version__)" || echo "no tensorrt"
} > "$out/env.txt" 2>&1

timeout 240 python3 -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" tests/test_gpu.py tests/test_tensorrt.py tests/test_backends.py \
    > "$out/pytest_gpu.txt" 2>&1
echo "pytest exit: $?" >> "$out/pytest_gpu.txt"

timeout 120 python3 benchmarks/train_throughput.py --device cuda --batches 40 --batch-size 256 --repeats 3 \
    --out "$out/train_throughput_cuda.json" > "$out/train_throughput_cuda.txt" 2>&1

timeout 200 python3 -m compress run recipes/quickstart.yaml --device cuda --out /tmp/gpu_run \
    --set "stages.export.formats=[onnx,onnx-fp16]" \
    --set "stages.bench.backends=[onnxruntime,torch-cuda,torch-compile-cuda,onnxruntime-cuda]" \
    > "$out/quickstart_cuda.txt" 2>&1
echo "compress run exit: $?" >> "$out/quickstart_cuda.txt"
cp /tmp/gpu_run/quickstart/bench/bench.json "$out/quickstart_cuda_bench.json" 2>/dev/null
tail -n 5 "$out"/*.txt
