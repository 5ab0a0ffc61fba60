#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with every wheel the GPU device lacks, for CPython 3.12 manylinux x86_64,
# pinned in tools/gpu/wheels.txt, then checks them (tools/gpu/wheels_check.py verify): no wheel may
# pull or replace the image's torch/CUDA, every Requires-Dist must be met there, and wheels + working
# tree must fit the 64 MiB a device call carries. Idempotent: wheels already there are kept, wheels
# not pinned are removed. Run it in the checkout that makes the device call (that checkout travels).
#
#   bash tools/gpu/wheels.sh              # the default set (no xformers: none is built for torch 2.11 + CUDA 13)
#   bash tools/gpu/wheels.sh --xformers   # also PyPI's xformers 0.0.35 (torch 2.10 + CUDA 12.8) + libcudart 12
set -euo pipefail
cd "$(dirname "$0")/../.."
XF=()
[ "${1:-}" = "--xformers" ] && XF=(--xformers)
bash tools/setup_env.sh
PY=.venv/bin/python
WHL=.whl
mkdir -p "$WHL/fallback" "$WHL/cu12"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
start=$(date +%s)
want=()
while read -r how spec; do
  name=${spec%%==*}
  version=${spec#*==}
  case "$how" in
    fallback) dest="$WHL/fallback" ;;
    xformers) [ "$name" = nvidia-cuda-runtime-cu12 ] && dest="$WHL/cu12" || dest="$WHL" ;;
    *) dest="$WHL" ;;
  esac
  file_glob="$(echo "$name" | tr '-' '_')-${version}-*.whl"
  want+=("$dest/$file_glob")
  # shellcheck disable=SC2086
  if compgen -G "$dest/$file_glob" >/dev/null; then
    continue
  fi
  if [ "$how" = sdist ]; then
    echo "[wheels] building $spec from its sdist (pure Python)" >&2
    "$PY" -m pip wheel -q --no-deps --no-binary "$name" -w "$dest" "$spec"
  else
    echo "[wheels] downloading $spec" >&2
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$dest" "$spec"
  fi
done < <("$PY" tools/gpu/wheels_check.py plan "${XF[@]}")
# keep one version of each: drop what the plan does not name (an older pin, xformers when not asked)
for f in "$WHL"/*.whl "$WHL"/fallback/*.whl "$WHL"/cu12/*.whl; do
  [ -e "$f" ] || continue
  keep=0
  for g in "${want[@]}"; do
    # shellcheck disable=SC2053
    [[ "$f" == $g ]] && keep=1 && break
  done
  [ "$keep" = 1 ] || { echo "[wheels] removing $f (not in the plan)" >&2; rm -f "$f"; }
done
echo "[wheels] fetched in $(( $(date +%s) - start )) s" >&2
"$PY" tools/gpu/wheels_check.py verify "${XF[@]}"
