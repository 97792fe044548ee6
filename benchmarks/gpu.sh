#!/usr/bin/env bash
# The GPU speed run (one call on a GPU machine): environment, the CUDA-only tests, then
# python -m benchmarks.speed on GPT-2 small in bf16-mixed and fp32, and the smaller GPT-2 shapes.
# Usage: OUT=/some/dir bash benchmarks/gpu.sh   (results: $OUT/speed_cuda_*.json and $OUT/gpu.log)
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
log="$OUT/gpu.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pytorch_lightning as pl; print(torch.__version__, transformers.__version__, pl.__version__)"
  python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_speed_options.py tests/test_lightning_features.py \
    -k "cuda or gpu or 16_mixed" 2>&1 | tail -5
  for prec in bf16-mixed 32; do
    python3 -m benchmarks.speed --device cuda --models gpt2-small --precision "$prec" --repeats "${REPEATS:-10}" \
      --out "$OUT" --tag "gpt2small_${prec}" 2>&1 | grep -v USDT
  done
  python3 -m benchmarks.speed --device cuda --models gpt2-v8k,gpt2-v50k --precision bf16-mixed --repeats 10 \
    --out "$OUT" --tag "small_models_bf16-mixed" 2>&1 | grep -v USDT
  date -u
} 2>&1 | tee "$log"
