#!/usr/bin/env bash
# One Step-KTO / KTO iteration from the same seed model under several settings: the experiment behind the
# README's "Results so far" table. Every variant starts from the same M0, trains on the same labelled
# samples and is evaluated on the same 300 held-out problems.
#   bash bench/iteration_sweep.sh            # ~45 min on 2 cores (1 thread per process)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
W=${WORK:-runs/sweep}
T=(--num_threads 1 --prompt_style minimal)
# M0: 1 epoch of SFT from scratch on 30k flawed solutions (seed 0), then 1 epoch on 30k more (seed 1)
$PY arith_task.py --output_dir $W/d0 --num_train 2000 --num_test 500 --num_sft 30000 --seed 0
$PY arith_task.py --output_dir $W/d1 --num_train 1000 --num_test 500 --num_sft 30000 --seed 1
$PY train.py --objective sft --model scratch --data $W/d0/sft.jsonl --output_dir $W/M0a --hidden_size 128 \
    --num_layers 2 --intermediate_size 384 --lr 2e-3 --epochs 1 --per_device_batch_size 32 "${T[@]}"
$PY train.py --objective sft --model $W/M0a --data $W/d1/sft.jsonl --output_dir $W/M0 --lr 2e-3 --epochs 1 \
    --per_device_batch_size 32 "${T[@]}"
EVAL=(--benchmark $W/d0/test.jsonl --max_new_tokens 160 --max_problems 300 --sample_k 4 "${T[@]}")
$PY evaluate.py --model $W/M0 --output_dir $W/eval_M0 --name M0 "${EVAL[@]}"
$PY generate.py --model $W/M0 --problems $W/d0/train.jsonl --output $W/samples.jsonl --num_samples 4 \
    --temperature 1.0 --max_new_tokens 160 --seed 1 --max_problems 1000 "${T[@]}"
$PY label.py --input $W/samples.jsonl --output $W/labels.jsonl --prm check
$PY generate.py --model $W/M0 --problems $W/d0/train.jsonl --output $W/samples_t07.jsonl --num_samples 4 \
    --temperature 0.7 --max_new_tokens 160 --seed 1 --max_problems 1000 "${T[@]}"
$PY label.py --input $W/samples_t07.jsonl --output $W/labels_t07.jsonl --prm check
variant() {  # name objective lr beta epochs w_outcome [labels file [extra train.py arguments]]
    $PY train.py --objective $2 --model $W/M0 --data ${7:-$W/labels.jsonl} --output_dir $W/$1 --lr $3 --beta $4 \
        --epochs $5 --w_outcome $6 --per_device_batch_size 32 --save_every 0 "${T[@]}" "${@:8}"
    $PY evaluate.py --model $W/$1 --output_dir $W/eval_$1 --name $1 "${EVAL[@]}"
}
variant step-kto_1e-5 step-kto 1e-5 0.1 1 1
variant kto_1e-5 kto 1e-5 0.1 1 1
variant step-only_1e-5 step-kto 1e-5 0.1 1 0
variant step-only_2e-5 step-kto 2e-5 0.1 1 0
variant step-kto_2e-5_2ep step-kto 2e-5 0.1 2 1
variant step-kto_5e-5_beta1 step-kto 5e-5 1.0 1 1
variant step-kto_5e-5 step-kto 5e-5 0.1 1 1
variant kto_5e-5 kto 5e-5 0.1 1 1
variant step-kto_2e-5_t07 step-kto 2e-5 0.1 1 1 $W/labels_t07.jsonl
variant kto_2e-5_t07 kto 2e-5 0.1 1 1 $W/labels_t07.jsonl
variant step-kto_2e-5_desirable_only step-kto 2e-5 0.1 1 1 $W/labels.jsonl --balance_lambdas false --lambda_u 0
$PY -c "import json,sys; [print(l, end='') for l in open(sys.argv[1]) if json.loads(l)['outcome']]" $W/labels.jsonl > $W/right.jsonl
for lr in 2e-5 2e-4; do  # rejection sampling: sft on the right-answer samples
    $PY train.py --objective sft --model $W/M0 --data $W/right.jsonl --output_dir $W/rft_$lr --lr $lr --epochs 1 \
        --per_device_batch_size 32 --save_every 0 "${T[@]}"
    $PY evaluate.py --model $W/rft_$lr --output_dir $W/eval_rft_$lr --name rft_$lr "${EVAL[@]}"
done
for f in $W/eval_*/result.json; do
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1], r['pass@1'], r['stepwise_error_rate'], r['mean_pass@1_over_4'], r['stepwise_error_rate_sampled'])" $f
done
