"""Build the demo engine for each case with DeepSpeed's capability answers forced, take one step, and
print one JSON line: the dtypes of every parameter (and ZeRO-3 partition), of the optimizer's fp32
master copy and of the loss, or the error the build raised. Run by tests/test_hardware.py.

argv[1]: JSON list of {"config": "zero3.json", "precision": "fp32", "fp16": true|false|null,
"bf16": true|false}; a world of one, gloo.
"""

import json
import sys

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator

from mae_scale.config import Config
from mae_scale.train import dist as D
from mae_scale.train.batch import normalize_clips
from mae_scale.train.engine import PRECISION_DTYPES, build_engine


def master_dtypes(optimizer) -> list[str]:
    """The fp32 master copy: ZeRO-3 (offload too) keeps flat partitions per group, ZeRO-1/2 its own."""
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None) or getattr(
        optimizer, "single_partition_of_fp32_groups", None
    )
    if not flats:
        raise SystemExit(f"no fp32 master copy found on {type(optimizer).__name__}")
    return sorted({str(t.dtype) for t in flats})


D.init_distributed()
accelerator = get_accelerator()
results = []
for case in json.loads(sys.argv[1]):
    # what DeepSpeed (zero.Init, the engine's sanity check) and our resolve_precision will be told
    accelerator.is_fp16_supported = lambda answer=case["fp16"]: answer
    accelerator.is_bf16_supported = lambda answer=case["bf16"]: answer
    cfg = Config.load(
        "demo",
        [
            f"train.precision={case['precision']}",
            f"deepspeed.config={case['config']}",
            "schedule.warmup_steps=1",
        ],
    )
    try:
        built = build_engine(cfg, world_size=1)
    except Exception as exc:  # noqa: BLE001 - the test checks which error, and its message
        results.append({**case, "error": f"{type(exc).__name__}: {exc}"})
        continue
    engine = built.engine
    params = {str(p.dtype) for p in engine.module.parameters()}
    params |= {str(p.ds_tensor.dtype) for p in engine.module.parameters() if hasattr(p, "ds_tensor")}
    clips = torch.randint(
        0, 256, (4, 3, cfg.data.num_frames, cfg.data.size, cfg.data.size), dtype=torch.uint8
    )
    x = normalize_clips(clips, cfg.data.mean, cfg.data.std, PRECISION_DTYPES[built.precision])
    loss, _, _ = engine(x)
    engine.backward(loss)
    engine.step()
    results.append(
        {
            **case,
            "resolved": built.precision,
            "params": sorted(params),
            "masters": master_dtypes(engine.optimizer),
            "loss": str(loss.dtype),
            "loss_finite": bool(torch.isfinite(loss)),
            "input": str(x.dtype),
        }
    )
    del engine, built
shm_op = deepspeed.comm.comm.cdb.shm_comm_op  # what init_distributed built for CPU all-reduce
D.shutdown()
print(json.dumps({"cases": results, "shm_comm_op_built": shm_op is not None}))
