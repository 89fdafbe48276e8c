#!/usr/bin/env bash
# One KTO / Step-KTO iteration from run.sh's seed-0 model M0 under several settings: the experiment behind
# docs/experiments.md's "What it took" table (measured with SCRATCH_TOKENIZER=char: such an M0, 160 tokens).
# Every variant starts from the same M0, trains on the same 4,000
# labelled samples (run.sh's iteration-1 samples: 1,000 problems x 4, temperature 1, seed 1) and is
# evaluated greedily on the same 500 held-out problems.
#   bash run.sh && bash bench/iteration_sweep.sh     # ~25 min on 2 cores after run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
S=runs/seed0                      # run.sh's seed-0 data and M0
W=${WORK:-runs/sweep}
T=(--num_threads 2 --prompt_style minimal)
mkdir -p $W
[ -f $W/labels.jsonl ] || {
    $PY generate.py --model $S/M0 --problems $S/data/train.jsonl --output $W/samples.jsonl --num_samples 4 \
        --temperature 1.0 --max_new_tokens 160 --seed 1 "${T[@]}"
    $PY label.py --input $W/samples.jsonl --output $W/labels.jsonl --prm check
}
variant() {  # name objective lr [extra train.py arguments]; no NLL anchor unless a variant adds one
    [ -d $W/$1 ] || $PY train.py --objective $2 --model $S/M0 --data $W/labels.jsonl --output_dir $W/$1 --lr $3 \
        --epochs 1 --per_device_batch_size 32 --save_every 0 --nll_weight 0 "${T[@]}" "${@:4}"
    [ -f $W/eval_$1/result.json ] || $PY evaluate.py --model $W/$1 --output_dir $W/eval_$1 \
        --benchmark $S/data/test.jsonl --max_new_tokens 160 "${T[@]}"
}
variant kto_1e-5 kto 1e-5
variant step-kto_1e-5 step-kto 1e-5
variant kto_5e-5 kto 5e-5
variant step-kto_5e-5 step-kto 5e-5
variant step-kto_1e-5_3epochs step-kto 1e-5 --epochs 3
variant step-kto_3e-5_beta0.5 step-kto 3e-5 --beta 0.5
variant kto_1e-5_nll kto 1e-5 --nll_weight 1
variant step-kto_1e-5_nll step-kto 1e-5 --nll_weight 1
variant step-kto_2e-5_nll step-kto 2e-5 --nll_weight 1
variant step-kto_1e-5_3epochs_nll step-kto 1e-5 --epochs 3 --nll_weight 1
for f in $W/eval_*/result.json; do
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[1].split('/')[-2][5:]:28s} Pass@1 {100*r['pass@1']:5.1f}  wrong-step share {100*r['stepwise_error_rate']:5.1f}\")" $f
done
