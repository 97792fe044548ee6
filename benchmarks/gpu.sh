#!/usr/bin/env bash
# The GPU speed run (one call on a GPU machine): environment, the CUDA-only tests, then
# python -m benchmarks.speed on GPT-2 small in fp32 and bf16-mixed, and where the time goes (benchmarks.gpu_breakdown).
# Usage: OUT=/some/dir bash benchmarks/gpu.sh   (results: $OUT/speed_cuda_*.json, $OUT/gpu_breakdown_*.json, $OUT/gpu.log)
set -u
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-}
ARMS=${ARMS:-dfa,dfa no ln1,dfa +ln2,dfa paper,dfa paper cut sketch}
REPEATS=${REPEATS:-12}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
log="$OUT/gpu.log"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, pytorch_lightning as pl; print(torch.__version__, transformers.__version__, pl.__version__)"
  python3 -m pytest -q -o addopts="" -p no:cacheprovider tests/test_speed_options.py tests/test_lightning_features.py \
    -k "cuda or gpu or 16_mixed" 2>&1 | tail -3
  for prec in 32 bf16-mixed; do
    python3 -m benchmarks.speed --device cuda --models gpt2-small --arms "$ARMS" --precision "$prec" \
      --repeats "$REPEATS" --out "$OUT" --tag "gpt2small_${prec}${TAG}" 2>&1 | grep -v USDT
  done
  if [ -z "${SKIP_BREAKDOWN:-}" ]; then
    for prec in 32 bf16-mixed; do
      python3 -m benchmarks.gpu_breakdown --precision "$prec" --out "$OUT" 2>&1 | grep -v USDT
    done
  fi
  date -u
} 2>&1 | tee "$log"
