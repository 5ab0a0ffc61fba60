#!/usr/bin/env python
"""Training-step throughput through DeepSpeed vs the same model in plain PyTorch, side by side.

    DS_ACCELERATOR=cpu python tools/bench_train.py --preset tiny --batch 4 --frames 8 --size 64 \
        --ds-config zero3.json --steps 20
    deepspeed --num_gpus 1 tools/bench_train.py --preset vit_l --batch 8 --ds-config zero3.json

Measures steps/s, clips/s, TFLOP/s and MFU of the real step (forward, backward, optimizer; clips
are synthetic uint8, normalized on the device, so the data loader is not part of it). The plain
PyTorch step uses the same model, AdamW and precision (bf16 autocast with fp32 weights) without
DeepSpeed; the ratio is DeepSpeed's overhead (or gain) on this machine. `--baseline mae_st` times
instead the step as the official mae_st code runs it (tools/gpu/mae_st_way.py: eager, fp32 weights,
autocast, naive attention, separate q/k/v, torch AdamW). `--json` writes the results to a file,
`--profile` a torch.profiler table of one DeepSpeed step (top kernels by device time), `--set k=v`
passes config overrides (e.g. `--set model.decoder_mask_ratio=0.5` where the model has it).
`bench()` runs the same in-process, for tools/gpu/check.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mae_scale.config import Config  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=4, help="clips per step per device")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--ds-config", default="zero3.json")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--ckpt", type=int, default=0, help="activation checkpointing: every k-th block")
    p.add_argument("--attention", default="auto")
    p.add_argument("--mask-ratio", type=float, default=None, help="default: the config's (0.9)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument(
        "--baseline",
        default="plain",
        choices=["plain", "mae_st", "none"],
        help="plain: the same model without DeepSpeed; mae_st: the official code's way; none: skip",
    )
    p.add_argument("--skip-plain", action="store_true", help="same as --baseline none")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--profile", default=None, metavar="PATH", help="profiler table of one DeepSpeed step")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.skip_plain:
        args.baseline = "none"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from mae_scale.train import dist as D

    rank, _, world = D.init_distributed()
    results = bench(args, world)
    if rank == 0:
        print(json.dumps(results, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    D.shutdown()
    return 0


def bench_config(args) -> Config:
    pred_t = max(2, args.frames // 2)
    overrides = [
        f"model.preset={args.preset}",
        f"data.num_frames={args.frames}",
        f"data.size={args.size}",
        "data.repeats=1",
        f"train.batch_size={args.batch}",
        f"deepspeed.config={args.ds_config}",
        f"train.precision={args.precision}",
        f"model.checkpoint_activations={args.ckpt}",
        f"model.attention={args.attention}",
        f"model.pred_t_dim={pred_t}",
        "train.grad_clip=1.0",
        f"train.steps={args.steps + args.warmup}",
        "schedule.warmup_steps=1",
        "log.wandb=off",
    ]
    if args.mask_ratio is not None:
        overrides.append(f"model.mask_ratio={args.mask_ratio}")
    cfg = Config.load("demo", overrides + list(args.set))
    cfg.validate(check_paths=False)
    return cfg


def bench(args, world: int = 1) -> dict:
    """DeepSpeed step, then the baseline (world size 1 only); the process group must be up."""
    from mae_scale.model.flops import train_step_flops
    from mae_scale.train.engine import model_kwargs

    cfg = bench_config(args)
    flops = train_step_flops(model_kwargs(cfg), batch_size=args.batch, mask_ratio=cfg.model.mask_ratio)
    d = cfg.data
    clips = torch.randint(0, 256, (args.batch, 3, d.num_frames, d.size, d.size), dtype=torch.uint8)
    if torch.cuda.is_available():
        clips = clips.pin_memory()
    results, dtype, peak = bench_deepspeed(cfg, args, world, clips, flops)
    results["overrides"] = list(args.set)
    if args.baseline != "none" and world == 1:
        t_base, mem = bench_baseline(cfg, args, clips, dtype)
        key = {"plain": "plain_pytorch", "mae_st": "mae_st_way"}[args.baseline]
        results[key] = _summary(t_base, args.batch, flops, peak, mem)
        results[f"deepspeed_over_{key}_speed"] = round(t_base / results["deepspeed"]["s_per_step"], 3)
        if args.baseline == "plain":  # the key earlier results used
            results["deepspeed_over_plain_speed"] = results["deepspeed_over_plain_pytorch_speed"]
        if torch.cuda.is_available():  # CPU peak RSS is the process's: the baseline inherits DeepSpeed's
            results[f"{key}_over_deepspeed_memory"] = round(mem / results["deepspeed"]["peak_mem_gb"], 3)
    return results


def bench_baseline(cfg, args, clips: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds per step and peak memory of the same step without DeepSpeed (fp32 weights, autocast)."""
    from mae_scale.model.checkpointing import apply_activation_checkpointing
    from mae_scale.model.mae import MaskedAutoencoderViT
    from mae_scale.train import dist as D
    from mae_scale.train.batch import normalize_clips
    from mae_scale.train.engine import model_kwargs, param_groups
    from mae_scale.train.metrics import peak_memory_gb

    d = cfg.data
    _free_device_memory()
    dev = D.device()
    with torch.device(dev):
        model = MaskedAutoencoderViT(**model_kwargs(cfg))
        if args.baseline == "mae_st":
            sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
            from mae_st_way import OfficialWayMAE

            official = OfficialWayMAE(**model_kwargs(cfg))
            official.load_state_dict(model.state_dict())  # the same weights, the official names
            model = official
            _free_device_memory()  # the peak counts the official model's step, not the copy
    if args.ckpt and args.baseline == "plain":
        apply_activation_checkpointing(model, every=args.ckpt)
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))

    def plain_step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, _, _ = model(normalize_clips(clips, d.mean, d.std, torch.float32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(plain_step, args.steps, args.warmup)
    mem = peak_memory_gb()
    model = opt = None  # noqa: F841 (frees them before the next measurement in this process)
    _free_device_memory()
    return t, mem


def _free_device_memory() -> None:
    """Between measurements in one process: drop cached blocks and restart the peak counter."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def bench_deepspeed(cfg, args, world: int, clips: torch.Tensor, flops: float):
    """The real training step through DeepSpeed; the engine is freed on return."""
    from mae_scale.train.batch import normalize_clips
    from mae_scale.train.engine import build_engine
    from mae_scale.train.metrics import device_peak_tflops, peak_memory_gb

    _free_device_memory()
    built = build_engine(cfg, world)
    engine, d = built.engine, cfg.data
    dtype = torch.bfloat16 if built.precision == "bf16" else torch.float32

    def ds_step():
        loss, _, _ = engine(normalize_clips(clips, d.mean, d.std, dtype))
        engine.backward(loss)
        engine.step()

    peak, source = device_peak_tflops(built.precision, args.peak_tflops)
    results = {
        "preset": args.preset,
        "clips_per_step": args.batch,
        "frames": args.frames,
        "size": args.size,
        "ds_config": args.ds_config,
        "precision": built.precision,
        "ckpt": args.ckpt,
        "attention": engine.module.attention_backend(),
        "world_size": world,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "peak_tflops": float(f"{peak:.4g}"),
        "peak_source": source,
        "gflop_per_step": flops / 1e9,
    }
    t = timed(ds_step, args.steps, args.warmup)
    results["deepspeed"] = _summary(t, args.batch, flops, peak, peak_memory_gb())
    if args.profile:
        results["profile"] = profile_step(ds_step, args.profile)
    engine.destroy()
    engine = built = None  # noqa: F841
    _free_device_memory()
    return results, dtype, peak


def profile_step(step, path: str, rows: int = 15) -> dict:
    """One step under torch.profiler (after the timed ones): the top kernels by device time, as a table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=rows)
    Path(path).write_text(
        f"torch.profiler, one step after the timed ones; top {rows} by {sort}"
        f" ({'CUDA kernels and ops' if cuda else 'CPU ops: no CUDA here'})\n{table}\n"
    )
    return {"path": str(path), "sort_by": sort, "rows": rows}


def _summary(seconds: float, clips: int, flops: float, peak: float, mem_gb: float) -> dict:
    tflops = flops / seconds / 1e12
    return {
        "s_per_step": round(seconds, 4),
        "steps_per_s": round(1 / seconds, 3),
        "clips_per_s": round(clips / seconds, 2),
        "tflops": round(tflops, 4),
        "mfu": round(tflops / peak, 4) if peak else None,
        "peak_mem_gb": round(mem_gb, 3),
    }


if __name__ == "__main__":
    sys.exit(main())
