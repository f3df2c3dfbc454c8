#!/usr/bin/env bash
# The one command for a session with a GPU (device tool, `run`):
#   bash benchmarks/run_gpu.sh
# Runs the GPU tests and the GPU benchmark on the lent machine's preinstalled
# torch/cupy/pytest/hypothesis (no registry there) and writes logs to $OUT.
set -u
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The GPU image has no package registry: wheels fetched beforehand on the CPU machine
#   pip download --no-deps array-api-compat array-api-strict -d .gpu-wheels
# travel with `carry: [".gpu-wheels"]` and are installed here.
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels array-api-compat array-api-strict \
    2>&1 | tail -2 | tee "$OUT/gpu-env.txt"
fi
python3 -c "import array_api_compat" 2>/dev/null || echo "array-api-compat missing: carry a wheel" | tee -a "$OUT/gpu-env.txt"
nvidia-smi -L | tee "$OUT/gpu-device.txt"
python3 -m pytest tests/gpu/test_gpu.py tests/api/test_norms.py tests/api/test_clip_norm.py \
  tests/api/test_clip_global.py tests/api/test_clip_value.py tests/api/test_normalize.py \
  tests/routes/test_routes.py -q -p no:cacheprovider \
  -o addopts="" -k "cupy or torch_cuda or gpu or GPU" 2>&1 | tail -60 | tee "$OUT/gpu-tests.txt"
# fused optimizers and per-sample clipping on the GPU (issues 5 and 6)
python3 -m pytest tests/gpu/test_gpu_optim.py tests/gpu/test_gpu_per_sample.py -q -p no:cacheprovider \
  -o addopts="" 2>&1 | tail -60 | tee "$OUT/gpu-tests-optim-per-sample.txt"
# SPAM / Stable-SPAM CUDA kernels (issue 18), the norm during backward (16), CUDA graphs
# (15), NCCL groups with CPU-offloaded and CUDA gradients and the float64-accumulating
# local norm (19)
python3 -m pytest tests/gpu/test_gpu_spam.py tests/gpu/test_gpu_backward_norm.py \
  tests/gpu/test_gpu_distributed_nccl.py tests/gpu/test_gpu_wide_norm.py \
  "tests/integration/test_torch_compile.py::test_cuda_graph_capture_and_replay" -q \
  -p no:cacheprovider -o addopts="" -rs 2>&1 | tail -60 | tee "$OUT/gpu-tests-issues-15-19.txt"
python3 benchmarks/bench_gpu.py --json "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.txt"
# clip + AdamW step on GPT-2 small, fastclip's fused CUDA step against torch's
python3 -m fastclip bench --workloads adamw --backends fastclip-gpu,torch-cuda-foreach,torch-cuda-fused \
  --repeat 9 --json "$OUT/gpu-adamw.json" 2>&1 | tee "$OUT/gpu-adamw.txt"
