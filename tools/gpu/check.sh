#!/usr/bin/env bash
# The one device command (issue #17): installs the carried wheels (.whl/, made by tools/gpu/wheels.sh)
# into a private folder beside the image's torch, prints the GPU and versions, then runs
# tools/gpu/check.py: GPU tests and measurements in at most about 5 minutes, results in
# $OUT/gpu_check.json, the console in $OUT/check.log, the profile in $OUT/profile_vit_l.txt.
#
#   bash tools/gpu/check.sh               # on the GPU machine (the device call: README "Proving it on a GPU")
#   bash tools/gpu/check.sh --dry-run     # on CPU: .venv's packages, tiny sizes, the same code paths
# Extra arguments go to check.py (e.g. --only steps,baseline); --install-only stops after installing.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
INSTALL_ONLY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "${1:-}" = "--install-only" ]; then INSTALL_ONLY=1; shift; fi  # the install and versions, no check
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export OUT

main() {
t0=$(date +%s)
echo "[check.sh] $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname), $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true MAE_SCALE_NO_BAR=1
if [ "$DRY" = 1 ]; then
  bash tools/setup_env.sh || return 1
  PY=.venv/bin/python
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONPATH="$PWD"
  echo "[check.sh] dry run on CPU with .venv's packages (no wheels installed)"
  "$PY" tools/gpu/check.py --dry-run --out "$OUT" "$@"
  return
fi

PY=${MAE_SCALE_DEVICE_PY:-python3}  # the image's python3 (holds torch); overridable to try the install
SITE=/tmp/mae_scale_site
XSITE=/tmp/mae_scale_xformers
nvidia-smi || echo "[check.sh] nvidia-smi failed"
ls .whl/*.whl >/dev/null 2>&1 || { echo "[check.sh] no .whl/: run tools/gpu/wheels.sh here, carry .whl"; return 2; }
rm -rf "$SITE" "$XSITE"
main=()
for w in .whl/*.whl; do
  case "$(basename "$w")" in xformers-*) ;; *) main+=("$w") ;; esac
done
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${main[@]}" \
  || echo "[check.sh] pip install of the wheels FAILED: the parts that need them will say so"
# Fallbacks: packages the image has at a version not known beforehand; installed only if too old.
for w in .whl/fallback/*.whl; do
  [ -e "$w" ] || continue
  need=$("$PY" - "$w" "$SITE" <<'EOF'
import email.parser, importlib.metadata as md, sys, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
wheel, site = sys.argv[1], Path(sys.argv[2])
name = canonicalize_name(Path(wheel).name.split("-")[0])
specs = []
for dist in md.distributions(path=[str(site)]):
    for r in dist.requires or []:
        req = Requirement(r)
        if canonicalize_name(req.name) == name and (req.marker is None or req.marker.evaluate({"extra": ""})):
            specs.append(req.specifier)
try:
    have = md.version(name)
except md.PackageNotFoundError:
    have = None
ok = have is not None and all(s.contains(have, prereleases=True) for s in specs)
print(f"keep {name} {have}" if ok else f"install {name} (image: {have}; needed: {','.join(map(str, specs))})")
EOF
)
  echo "[check.sh] fallback: $need"
  case "$need" in install*) "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$w" ;; esac
done
if ls .whl/xformers-*.whl >/dev/null 2>&1; then
  # PyPI's xformers links libcudart.so.12; the image has CUDA 13. It goes to its own folder, and
  # check.py puts it on the path only after a child process showed that it imports and computes right.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$XSITE" .whl/xformers-*.whl
  for w in .whl/cu12/*.whl; do
    [ -e "$w" ] || continue
    mkdir -p "$XSITE/cu12" && "$PY" -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
[open(sys.argv[2] + '/' + n.rsplit('/', 1)[-1], 'wb').write(z.read(n)) for n in z.namelist() if '/lib/libcudart.so' in n]" \
      "$w" "$XSITE/cu12"
    export LD_LIBRARY_PATH="$XSITE/cu12${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  done
  export MAE_SCALE_XFORMERS_SITE="$XSITE"
fi
export PYTHONPATH="$SITE:$PWD"
echo "[check.sh] installed in $(( $(date +%s) - t0 )) s: $(ls "$SITE" | grep -c dist-info) distributions in $SITE"
"$PY" -m pip check 2>&1 | head -20 || true
"$PY" -c "import torch; print('[check.sh] torch', torch.__version__, 'from', torch.__file__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.is_available() and torch.cuda.get_device_name())"
"$PY" -c "import deepspeed, pydantic, webdataset, av, hjson; print('[check.sh] imports from the wheels: deepspeed', deepspeed.__version__, 'pydantic', pydantic.VERSION, 'webdataset', 'av', av.__version__)"
[ "$INSTALL_ONLY" = 1 ] && return 0
"$PY" tools/gpu/check.py --out "$OUT" "$@"
}

# A pipeline, not `exec > >(tee ...)`: the command returns only after tee has written the last line.
main "$@" 2>&1 | tee "$OUT/check.log"
exit "${PIPESTATUS[0]}"
