#!/usr/bin/env bash
# The test command: sets up .venv if missing, then runs the whole CPU test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/python -m pytest -q "$@"
