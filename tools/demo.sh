#!/usr/bin/env bash
# The main job on the embedded demo data: set up .venv if missing, build the demo shards from real
# clips, pretrain the `demo` preset with ZeRO-3 on 2 CPU ranks (or on every GPU); the run draws
# runs/demo/reconstruction.png and metrics.png and ends with its summary. Extra arguments are config
# overrides, e.g. `train.steps=50`. DEMO_DOCS=1 also writes the README's pictures under docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
source tools/host.sh
eval "$(host_plan)"
[ "$NGPU" -gt 0 ] || export DS_ACCELERATOR OMP_NUM_THREADS
export WANDB_MODE=${WANDB_MODE:-offline}
.venv/bin/python -c "from mae_scale.data.demo import ensure_demo_shards; print('[demo] shards:', ensure_demo_shards('shards/demo'))"
PORT=${MASTER_PORT:-$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
.venv/bin/deepspeed --num_gpus "$NPROC" --master_port "$PORT" --module mae_scale.pretrain --config demo "$@"
if [ "${DEMO_DOCS:-0}" = 1 ]; then  # the README's pictures: small copies of this run's own two
  .venv/bin/python - runs/demo docs <<'PY'
import sys
from pathlib import Path

from PIL import Image

run, docs = Path(sys.argv[1]), Path(sys.argv[2])
docs.mkdir(exist_ok=True)
recon = Image.open(run / "reconstruction.png").convert("RGB")
first_two = recon.crop((0, 0, recon.width, recon.height // 2))  # of the 4 clips: tens of KB, not hundreds
first_two.quantize(128).save(docs / "demo_reconstruction.png", optimize=True)
Image.open(run / "metrics.png").convert("RGB").quantize(32).save(docs / "demo_metrics.png", optimize=True)
print("[demo] README pictures:", docs / "demo_reconstruction.png", docs / "demo_metrics.png")
PY
fi
