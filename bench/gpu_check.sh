#!/usr/bin/env bash
# The GPU check, for a machine with one CUDA GPU and torch, transformers and peft (no vLLM, no network): every part of
# the GPU path that a tiny model trained from scratch can prove, in one run of under 8 minutes on one H200.
#   1. the seed model: SFT from scratch on the built-in task (one process, CUDA)
#   2. sampling with the transformers engine on CUDA, then exact labels
#   3. step-kto under torchrun: NCCL, FSDP2 with its bf16 MixedPrecisionPolicy, gradient checkpointing, the sharded
#      resume state: the worker is killed (-9) after the first state, the rerun resumes, and its losses are compared
#      with an uninterrupted run's
#   4. evaluate.py on CUDA
#   5. MFU and peak GPU memory of the training loop (bench/bench_train_efficiency.py --device cuda)
#
#   bash bench/gpu_check.sh                  # writes $OUT (default /tmp/gpu_check): gpu_check.log and the results
#   SMOKE=1 bash bench/gpu_check.sh          # the same steps at toy sizes on a CPU (gloo): checks the script itself
#
# The grader's pure-Python dependencies travel with the checkout when the machine lacks them:
#   pip install --no-deps --target .gpu_deps math-verify==0.9.0 latex2sympy2_extended==1.10.2 antlr4-python3-runtime==4.13.2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/.gpu_deps${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
W=$OUT/work
rm -rf "$W" && mkdir -p "$W"
exec > >(tee "$OUT/gpu_check.log") 2>&1
if [ -n "${SMOKE:-}" ]; then
    SIZES=(--num_train 16 --num_test 16 --num_sft 256); SFT=(--hidden_size 64 --num_layers 1 --intermediate_size 128)
    BATCH=8; STEPS=6
else
    SIZES=(--num_train 512 --num_test 500 --num_sft 40000); SFT=(--hidden_size 256 --num_layers 4 --intermediate_size 768)
    BATCH=32; STEPS=16
fi
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
stage() { echo "== $1 ($(date +%T))"; }

stage "machine"
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"| transformers", transformers.__version__, "| peft", peft.__version__,
"|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

stage "1. seed model: SFT from scratch"
"$PY" -m stepkto.arith_task --output_dir "$W/data" "${SIZES[@]}" --seed 0
"$PY" train.py --objective sft --model scratch "${SFT[@]}" --data "$W/data/sft.jsonl" --output_dir "$W/M0" --lr 2e-3 \
    --per_device_batch_size 64 --prompt_style minimal --optim adamw_fused

stage "2. sampling on the transformers engine, exact labels"
"$PY" generate.py --model "$W/M0" --problems "$W/data/train.jsonl" --output "$W/samples.jsonl" --engine transformers \
    --prompt_style minimal --max_new_tokens 96 --num_samples 4 --chunk_size 256
"$PY" label.py --input "$W/samples.jsonl" --output "$W/labels.jsonl" --prm check

stage "3. step-kto under torchrun: FSDP2, bf16 mixed precision, checkpointing, killed and resumed"
KTO=(train.py --objective step-kto --model "$W/M0" --data "$W/labels.jsonl" --per_device_batch_size "$BATCH"
     --max_steps "$STEPS" --mixed_precision bfloat16 --gradient_checkpointing true --optim adamw_fused --log_every 1)
"${TORCHRUN[@]}" "${KTO[@]}" --output_dir "$W/M1_uninterrupted" --save_every 0
"${TORCHRUN[@]}" "${KTO[@]}" --output_dir "$W/M1" --save_every 2 &
job=$!
until [ -f "$W/M1.resume/state.json" ] || ! kill -0 "$job" 2>/dev/null; do sleep 0.2; done
pkill -9 -f -- "--output_dir $W/M1 --save_every 2" || true
wait "$job" || echo "   the killed job ended with status $? (expected)"
ls -la "$W/M1.resume"/state-* || true
"${TORCHRUN[@]}" "${KTO[@]}" --output_dir "$W/M1" --save_every 2
"$PY" - "$W" <<'EOF'
import json, sys
w = sys.argv[1]
log = lambda name: [json.loads(line)["loss/total"] for line in open(f"{w}/{name}/train_log.jsonl")]
resumed, uninterrupted = log("M1"), log("M1_uninterrupted")
print("losses resumed      ", [round(x, 6) for x in resumed])
print("losses uninterrupted", [round(x, 6) for x in uninterrupted])
print("max difference", max(abs(a - b) for a, b in zip(resumed, uninterrupted)))
EOF

stage "4. evaluate on the GPU"
"$PY" evaluate.py --model "$W/M1" --benchmark "$W/data/test.jsonl" --engine transformers --prompt_style minimal \
    --max_new_tokens 96 --output_dir "$W/eval_M1"
cp "$W/eval_M1/result.json" "$OUT/result_M1.json"

stage "5. MFU and peak GPU memory of the training loop"
if [ -n "${SMOKE:-}" ]; then
    "$PY" bench/bench_train_efficiency.py --device cpu --only step-kto --work "$W/efficiency"
else
    "$PY" bench/bench_train_efficiency.py --device cuda --only step-kto,step-kto_ckpt --work "$W/efficiency"
fi
stage "done"
