"""Train a tiny MAE 2 steps under ZeRO-3 (world of one), checkpoint, export; compare losses on a fixed batch.

Prints one JSON line: {"live_loss", "exported_loss", ...}. Run by tests/test_resume.py.
"""

import json
import sys
from pathlib import Path

import torch

from mae_scale.config import Config
from mae_scale.export import export_run, load_exported
from mae_scale.train import dist as D
from mae_scale.train.batch import normalize_clips
from mae_scale.train.checkpoint import Checkpointer
from mae_scale.train.engine import build_engine

run = Path(sys.argv[1]) / "run"
cfg = Config.load("demo", [f"run.dir={run}", "train.precision=fp32", "train.steps=2"])
D.init_distributed()
cfg.save(run / "config.yaml")
built = build_engine(cfg, world_size=1)
engine, d = built.engine, cfg.data
gen = torch.Generator().manual_seed(0)


def clips(n):
    return torch.randint(0, 256, (n, 3, d.num_frames, d.size, d.size), generator=gen, dtype=torch.uint8)


for _ in range(2):
    loss, _, _ = engine(normalize_clips(clips(4), d.mean, d.std, torch.float32))
    engine.backward(loss)
    engine.step()
Checkpointer(run / "checkpoints", keep=2, rank=0, world_size=1).save(engine, 2, {"loader": {}})

imgs = normalize_clips(clips(3), d.mean, d.std, torch.float32)
noise = torch.rand(3, engine.module.mask_units(), generator=gen)
engine.module.eval()
with torch.no_grad():
    live = engine.module(imgs, noise=noise)[0].item()
out = export_run(run)
model = load_exported(out).eval()
with torch.no_grad():
    exported = model(imgs, noise=noise)[0].item()
from safetensors.torch import load_file  # noqa: E402

enc = load_file(str(out / "encoder.safetensors"))
D.shutdown()
print(
    json.dumps(
        {
            "live_loss": live,
            "exported_loss": exported,
            "encoder_keys": len(enc),
            "decoder_keys_in_encoder_file": sum(k.startswith("decoder") or k == "mask_token" for k in enc),
        }
    )
)
