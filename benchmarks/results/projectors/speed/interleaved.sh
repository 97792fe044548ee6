#!/bin/bash
# Interleaved speed check of two checkouts (before and after a change) on gpt2-v8k: the default flag (Sketch) and
# the paper's rule (Dense). Usage: bash interleaved.sh BEFORE_DIR AFTER_DIR OUT_DIR
before=$1; after=$2; out=$3
for i in 1 2; do
  for pair in "before:$before" "after:$after"; do
    name=${pair%%:*}; tree=${pair#*:}
    (cd "$tree" && OMP_NUM_THREADS=1 PYTHONPATH=$tree python -m benchmarks.speed --models gpt2-v8k --arms "dfa,dfa paper" \
      --warmup 2 --repeats 5 --proj-repeats 5 --threads 1 --out "$out" --tag ${name}_$i)
  done
done
