"""Build the tiny MAE under ZeRO-3 (world of one) and plainly; compare the initial weights.

Prints one JSON line. Run by tests/test_train.py.
"""

import json
import math

import deepspeed
import torch

from mae_scale.config import Config
from mae_scale.train import dist as D
from mae_scale.train.engine import build_ds_config, build_model

cfg = Config.load("demo", ["train.precision=fp32", "model.preset=tiny"])
D.init_distributed()
ds3 = build_ds_config(cfg, world_size=1)
zero3 = build_model(cfg, ds3, seed=123)
partitioned = all(hasattr(p, "ds_id") for p in zero3.parameters())
with deepspeed.zero.GatheredParameters(list(zero3.parameters())):
    sd3 = {k: v.detach().clone() for k, v in zero3.named_parameters()}
plain = build_model(cfg, {**ds3, "zero_optimization": {"stage": 0}}, seed=123)
sd0 = dict(plain.named_parameters())
mismatched = [k for k in sd0 if sd0[k].shape != sd3[k].shape or not torch.equal(sd0[k].detach(), sd3[k])]

linears = {k: v for k, v in sd3.items() if k.endswith("weight") and v.dim() == 2}
within = all(v.abs().max() <= math.sqrt(6 / (v.shape[0] + v.shape[1])) + 1e-7 for v in linears.values())
biases = [v for k, v in sd3.items() if k.endswith("bias") and "norm" not in k]
norms = [v for k, v in sd3.items() if "norm" in k and k.endswith("weight")]
pos = torch.cat([v.flatten() for k, v in sd3.items() if "pos_embed" in k])
D.shutdown()
print(
    json.dumps(
        {
            "partitioned": partitioned,
            "tensors": len(sd0),
            "mismatched": mismatched,
            "linear_within_xavier_bound": bool(within) and len(linears) > 5,
            "biases_zero": all(bool((b == 0).all()) for b in biases),
            "layernorm_ones": all(bool((w == 1).all()) for w in norms),
            "pos_embed_std": float(pos.std()),
        }
    )
)
