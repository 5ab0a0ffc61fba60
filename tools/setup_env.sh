#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv with everything mae-scale needs.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build 2.13.0 in the same pip command,
# so no dependency can pull a CUDA build of several GB. Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MAE_SCALE_VENV:-.venv}
PY=${PYTHON:-python3}

source tools/host.sh
eval "$(host_plan)"
stamp_want="$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.mae_scale_stamp" 2>/dev/null)" = "$stamp_want" ]; then
  exit 0
fi
echo "[setup] creating $VENV ($TORCH_SPEC)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" -e ".[dev]"
echo "$stamp_want" > "$VENV/.mae_scale_stamp"
echo "[setup] done" >&2
