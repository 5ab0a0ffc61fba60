#!/usr/bin/env bash
# The main job on the embedded demo data: set up .venv if missing, build the demo shards from real
# clips, pretrain the `demo` preset with ZeRO-3 on 2 CPU ranks (or on every GPU), then draw
# runs/demo/reconstruction.png. Extra arguments are config overrides, e.g. `train.steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
source tools/host.sh
eval "$(host_plan)"
[ "$NGPU" -gt 0 ] || export DS_ACCELERATOR OMP_NUM_THREADS
export WANDB_MODE=${WANDB_MODE:-offline}
.venv/bin/python -c "from mae_scale.data.demo import ensure_demo_shards; print('[demo] shards:', ensure_demo_shards('shards/demo'))"
PORT=${MASTER_PORT:-$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")}
exec .venv/bin/deepspeed --num_gpus "$NPROC" --master_port "$PORT" --module mae_scale.pretrain --config demo "$@"
