#!/usr/bin/env bash
# Language-model sweep on a GPU: how many steps (and which schedule) DFA's recipe needs on the language-model
# example, every arm a separate `python -m examples.demo` process sharing the one GPU.
# Needs the Austen data in $LIGHTNING_DFA_DATA (a copy of a local cache) and `rdata` importable.
set -u
OUT=${OUT:-/tmp/lm_sweep}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
common="--accelerator gpu --no-progress --eval-every 1000 --curve-chars 10000 --test-chars 50000 --source debian --sample-chars 200"
run() {  # name steps arm-spec
  python3 -m examples.demo $common --steps "$2" --json "$OUT/$1.json" --arm "$1:$3" > "$OUT/$1.log" 2>&1 &
}
run bp3k 3000 "mode=bp,lr_decay=cosine"
run shallow3k 3000 "mode=shallow,lr_decay=cosine"
run nj3k 3000 "mode=dfa,norm_jacobian=true,lr_decay=cosine"
run nj5k 5000 "mode=dfa,norm_jacobian=true,lr_decay=cosine"
run nj5k-const 5000 "mode=dfa,norm_jacobian=true"
run nj5k-headin 5000 "mode=dfa,norm_jacobian=true,error_at=head_input,lr_decay=cosine"
run nj5k-lr1e-3 5000 "mode=dfa,norm_jacobian=true,lr_decay=cosine,lr=0.001"
wait
true
for f in "$OUT"/*.log; do echo "== $f"; grep -E "step [0-9]+:|\| " "$f" | head -30; done
