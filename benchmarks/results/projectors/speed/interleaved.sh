#!/bin/bash
# interleaved: main, branch, main, branch on gpt2-v8k (default flag = Sketch, paper = Dense)
for i in 1 2; do
  for tree in /work/main /work/wt-projectors; do
    name=$(basename $tree)
    (cd $tree && OMP_NUM_THREADS=1 PYTHONPATH=$tree nice -n 5 python -m benchmarks.speed --models gpt2-v8k --arms "dfa,dfa paper" --warmup 2 --repeats 5 --proj-repeats 5 --threads 1 --out /tmp/projcheck/speed --tag ${name}_$i > /tmp/projcheck/speed_${name}_$i.log 2>&1)
  done
done
