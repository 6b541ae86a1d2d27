#!/usr/bin/env bash
# Everything a session with a GPU checks, in one command that fits one device call (7.4 min on
# an H200 on 2026-11-30, 10 at most; a session has 15 minutes of device time, start-up included):
#   1. the CUDA tests (marked gpu/tensorrt): the first thing, since CUDA code runs nowhere else;
#   2. the distill step's throughput on CUDA, ours vs a plain loop (host syncs show up here);
#   3. recipes/resnet18_to_mobile.yaml on CUDA on real CIFAR-10, every stage, with the epochs cut
#      so it fits: teacher and distill 10, prune 2 per step, QAT 1, on 17,000 training images
#      (what fits the 64 MiB transfer) and the full 10,000-image test split. Its per-epoch times
#      give the full schedule's GPU time; GPU utilisation is sampled once a second beside it.
#
# Prepare here (the device has no network; torch-pruning and onnxslim are not in its image):
#   echo /.whl/ >> .git/info/exclude; echo /.gpudata/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform any -d .whl torch-pruning==1.6.1 onnxslim==0.1.98
#   python benchmarks/pack_cifar10.py pack ../shared/data/cifar10 .gpudata --train 17000
# then call the device tool's run with command "bash benchmarks/gpu_checks.sh", carry
# [".whl", ".gpudata"], timeout_s 600 (it ran 443 s). The files come back from $OUT (8 at most);
# summarise them in benchmarks/RESULTS.md by hand. The package runs from the source tree with the device's own
# torch, onnx and onnxruntime (not our pins: record their versions, env.txt has them).
set -uo pipefail
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl > "$out/env.txt" 2>&1
export PYTHONPATH="$PWD:/tmp/site"
mark() { echo "$(date +%s) $1" >> "$out/env.txt"; }
{
    nvidia-smi
    nproc
    python3 -c "import torch, torchvision, onnx, onnxruntime as o; print('torch', torch.__version__, torch.cuda.get_device_name(), '| torchvision', torchvision.__version__, '| onnx', onnx.__version__, '| onnxruntime', o.__version__, o.get_available_providers())"
    python3 -c "import torch_pruning, onnxslim; print('torch-pruning', torch_pruning.__version__, '| onnxslim', onnxslim.__version__)"
} >> "$out/env.txt" 2>&1
mark "start pytest"

timeout 150 python3 -m pytest -q -p no:cacheprovider -m "gpu or tensorrt" --durations=10 \
    tests/test_gpu.py tests/test_tensorrt.py tests/test_backends.py > "$out/pytest_gpu.txt" 2>&1
echo "pytest exit: $?" >> "$out/pytest_gpu.txt"
mark "start unpack"

python3 benchmarks/pack_cifar10.py unpack .gpudata /tmp/cifar10 >> "$out/env.txt" 2>&1
mark "start throughput"

timeout 60 python3 benchmarks/train_throughput.py --device cuda --data /tmp/cifar10 --batches 30 \
    --batch-size 128 --repeats 3 --out "$out/train_throughput_cuda.json" \
    > "$out/train_throughput_cuda.txt" 2>&1
echo "throughput exit: $?" >> "$out/train_throughput_cuda.txt"
mark "start recipe"

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 \
    > "$out/gpu_util.csv" 2>&1 &
sampler=$!
timeout 360 python3 -m compress run recipes/resnet18_to_mobile.yaml --device cuda \
    --data /tmp/cifar10 --out /tmp/gpu_run \
    --set teacher.train.epochs=10 --set stages.distill.train.epochs=10 \
    --set stages.prune.train.epochs=2 --set stages.quantize.train.epochs=1 \
    --set stages.quantize.calibration_images=1024 \
    --set "stages.bench.backends=[onnxruntime,torch-cuda]" --set stages.bench.processes=3 \
    --set stages.bench.time_budget_s=3 --set stages.bench.eval_samples=5000 \
    > "$out/recipe_cuda.txt" 2>&1
echo "compress run exit: $?" >> "$out/recipe_cuda.txt"
kill "$sampler"
mark "end"
(cd /tmp/gpu_run && find . -name '*.json' -o -name '*.md' -o -name '*.yaml' -o -name '*.log' \
    | tar czf "$out/run.tgz" -T -)
tail -n 4 "$out"/*.txt
