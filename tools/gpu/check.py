#!/usr/bin/env python
"""The GPU check (issue #17): proves and measures mae-scale on one GPU in one call, within 5 minutes.

    bash tools/gpu/check.sh              # on the device: installs .whl/, then runs this
    bash tools/gpu/check.sh --dry-run    # here, on CPU: the same code paths at tiny sizes
    python tools/gpu/check.py --dry-run --only steps,encoder   # a subset of the parts

Parts, in the order they run (each with a time budget; a part whose budget is spent stops and
records what it skipped and why; the whole run has a deadline):

  env        nvidia-smi, driver, Python, torch, CUDA, cuDNN, DeepSpeed, xformers, PyAV, webdataset;
             whether xformers imports and agrees with math attention on the GPU (in a child process,
             so a broken build cannot take the rest down: without it, attention auto -> sdpa)
  gpu_tests  `pytest -m gpu` (tests/test_gpu.py, tests/test_model.py): attention kernels vs math in
             bf16, outputs and gradients; a 30-step ZeRO-3 run of the main job on the demo shards
  matmul     an 8192^3 bf16 matmul: the measured ceiling for MFU
  steps      tools/bench_train.py's DeepSpeed ZeRO-3 step, bf16, 8 clips of 16x224, mask 0.9:
             vit_l (attention auto, the other kernels, activation checkpointing on), vit_b (and math
             attention), vit_h: s/step, clips/s, TFLOP/s, MFU vs 989 TFLOP/s and vs the matmul, memory
  profile    torch.profiler table of one vit_l step (top 15 kernels), written to $OUT
  baseline   vit_l through DeepSpeed against the same step written the way mae_st runs it
             (tools/gpu/mae_st_way.py), side by side; then against our model without DeepSpeed
  encoder    the encoder alone (forward + backward) at mask 0.9 vs mask 0, vit_l
  data       tools/bench_data.py at 224 px (R=4): clips/s per core against what vit_l consumes
  largest    the largest preset that trains at 8 clips with ZeRO-3 (vit_2b, vit_g, vit_h, first fit)
  offload    vit_g and vit_2b with zero3_offload.json: peak memory and step time

Writes $OUT/gpu_check.json (every number with its unit and the command or config that made it;
every part with its results or the reason it has none), $OUT/profile_vit_l.txt; check.sh tees the
console into $OUT/check.log.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"
SCHEMA = "mae-scale gpu check, schema 1"
PARTS = (
    "env",
    "gpu_tests",
    "matmul",
    "steps",
    "profile",
    "baseline",
    "encoder",
    "data",
    "largest",
    "offload",
)
WORKERS = {  # parts that run in one child process each (CUDA state and OOMs stay inside it)
    "bench": ("matmul", "steps", "profile", "baseline", "encoder"),
    "largest": ("largest",),
    "offload": ("offload",),
}
# Budgets in seconds. GPU: 275 s of parts + about 20 s of installing in check.sh <= 5 minutes.
GPU = {
    "total_s": 275,
    "budgets": {
        "env": 20,
        "gpu_tests": 60,
        "matmul": 6,
        "steps": 50,
        "profile": 0,  # taken inside steps (its first measurement profiles one extra step)
        "baseline": 25,
        "encoder": 10,
        "data": 15,
        "largest": 40,
        "offload": 45,  # cpu_adam is JIT-built in the background from the start (prebuild_cpu_adam)
    },
    "roles": {"vit_b": "vit_b", "vit_l": "vit_l", "vit_h": "vit_h", "vit_g": "vit_g", "vit_2b": "vit_2b"},
    "step_roles": ("vit_l", "vit_b", "vit_h"),
    "clips": 8,
    "frames": 16,
    "size": 224,
    "steps": 10,
    "warmup": 5,
    "big_steps": 3,
    "big_warmup": 1,
    "matmul_n": 8192,
    "matmul_reps": 10,
    "encoder_steps": 10,
    "encoder_warmup": 3,
    "data_args": ["--short-side", "256", "--size", "224", "--epochs", "3", "--rounds", "2"],
}
# CPU, tiny: every code path above, with each GPU preset played by `tiny` (config records it).
DRY = {
    "total_s": 420,
    "budgets": {  # generous: a loaded 2-core CI machine runs this 3x slower than an idle one
        "env": 45,
        "gpu_tests": 90,
        "matmul": 15,
        "steps": 90,
        "profile": 0,
        "baseline": 45,
        "encoder": 25,
        "data": 60,
        "largest": 60,  # the first try in a fresh worker also pays DeepSpeed's and dynamo's imports
        "offload": 150,  # cold: DeepSpeed's cpu_adam is JIT-built first (46 s on 2 idle cores; more loaded)
    },
    "roles": {"vit_b": "tiny", "vit_l": "tiny", "vit_h": "tiny", "vit_g": "tiny", "vit_2b": "tiny"},
    "step_roles": ("vit_l", "vit_b"),  # vit_h would repeat vit_b's code path
    "clips": 2,
    "frames": 8,
    "size": 32,
    "steps": 2,
    "warmup": 1,
    "big_steps": 1,
    "big_warmup": 1,
    "matmul_n": 256,
    "matmul_reps": 3,
    "encoder_steps": 2,
    "encoder_warmup": 1,
    "data_args": ["--size", "64", "--epochs", "1", "--rounds", "1"],
}
SUMMARY_KEYS = ("step_time", "clips_per_s", "mfu_vs_peak", "peak_mem", "speed_ratio", "tflops_median")
SUMMARY_KEYS += ("speedup_of_mask_0.9", "pipeline_per_core", "passed", "skipped")
OOM_MARKERS = ("out of memory", "OutOfMemoryError", "CUDA_ERROR_OUT_OF_MEMORY")


def now() -> float:
    return time.time()


def val(x: float | int, unit: str) -> dict:
    """Every number in the results carries its unit."""
    return {"value": round(float(x), 6), "unit": unit}


# --------------------------------------------------------------------------------------------------
# Recording


class Part:
    """One part's record: budget, timing, measurements (each ok / skipped / failed / oom)."""

    def __init__(self, name: str, budget: float, deadline: float, store: Recorder):
        self.name, self.budget, self.deadline, self.store = name, budget, deadline, store
        self.start = now()
        self.rec = {"status": "running", "reason": None, "budget_s": budget, "measurements": []}
        store.parts[name] = self.rec
        store.save()

    def left(self) -> float:
        return min(self.budget - (now() - self.start), self.deadline - now())

    def skip(self, name: str, reason: str, config: dict | None = None, na: bool = False) -> None:
        """A measurement not made: `na` when it does not apply here (no CUDA, no xformers, not needed),
        else "skipped" (the budget was spent)."""
        status = "n/a" if na else "skipped"
        self.rec["measurements"].append({"name": name, "status": status, "reason": reason, "config": config})
        self.store.save()

    def attempt(self, name: str, config: dict, command: str, fn) -> dict | None:
        """Run fn() -> values (dict of val()) unless the budget is spent; record what happened."""
        if self.left() <= 0:
            self.skip(name, f"part budget ({self.budget:g} s) or the run's deadline spent", config)
            return None
        m = {"name": name, "config": config, "command": command}
        t0 = now()
        print(f"[check] {self.name}: {name} ...", flush=True)
        try:
            m["values"] = fn()
            m["status"] = "ok"
        except Exception as e:  # each try stands alone: record it and go on
            text = f"{type(e).__name__}: {e}"
            m["status"] = "oom" if any(k in text for k in OOM_MARKERS) else "failed"
            m["reason"] = text[:600]
            m["traceback"] = traceback.format_exc()[-2000:]
        if m["status"] != "ok":  # out here: the traceback's frames (an engine, its tensors) are gone
            _free()
        m["elapsed_s"] = round(now() - t0, 2)
        print(f"[check] {self.name}: {name}: {m['status']} in {m['elapsed_s']} s", flush=True)
        self.rec["measurements"].append(m)
        self.store.save()
        return m if m["status"] == "ok" else None

    def finish(self, status: str | None = None, reason: str | None = None) -> None:
        ms = self.rec["measurements"]
        if status is None:  # "oom" is a finding (that size does not fit), "n/a" does not apply here
            states = [m["status"] for m in ms]
            done = [s for s in states if s != "n/a"]
            if done and all(s in ("ok", "oom") for s in done):
                status = "ok"
            elif "ok" in done or "oom" in done:
                status = "partial"
            elif not done or all(s == "skipped" for s in done):
                status = "skipped"
            else:
                status = "failed"
        if reason is None and status != "ok":
            reasons = [m.get("reason") for m in ms if m["status"] not in ("ok", "n/a") and m.get("reason")]
            reasons = reasons or [m.get("reason") for m in ms if m.get("reason")]
            reason = "; ".join(dict.fromkeys(reasons))[:800] or "no measurement"
        self.rec.update(status=status, reason=reason, elapsed_s=round(now() - self.start, 2))
        self.store.save()


class Recorder:
    def __init__(self, path: Path):
        self.path = path
        self.parts: dict[str, dict] = {}
        self.extra: dict = {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.extra, "parts": self.parts}, indent=1, default=str))
        tmp.replace(self.path)


def _free() -> None:
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


# --------------------------------------------------------------------------------------------------
# Parts that run in a worker process (CUDA)


def bench_argv(plan: dict, role: str, **kw) -> list[str]:
    """tools/bench_train.py arguments for one measurement (the same list makes its `command`)."""
    argv = [
        "--preset", plan["roles"][role], "--batch", str(plan["clips"]), "--frames", str(plan["frames"]),
        "--size", str(plan["size"]), "--precision", "bf16", "--ds-config", kw.get("ds_config", "zero3.json"),
        "--attention", kw.get("attention", "auto"), "--ckpt", str(kw.get("ckpt", 0)),
        "--steps", str(kw.get("steps", plan["steps"])), "--warmup", str(kw.get("warmup", plan["warmup"])),
        "--baseline", kw.get("baseline", "none"),
    ]  # fmt: skip
    for item in kw.get("sets", ()):
        argv += ["--set", item]
    if kw.get("profile"):
        argv += ["--profile", kw["profile"]]
    return argv


def command_of(argv: list[str], script: str = "tools/bench_train.py") -> str:
    prefix = "DS_ACCELERATOR=cpu " if os.environ.get("DS_ACCELERATOR") == "cpu" else ""
    return prefix + "python " + script + " " + " ".join(shlex.quote(a) for a in argv)


def step_values(r: dict, key: str, matmul_tflops: float | None) -> dict:
    s = r[key]
    cuda = r["device"] != "cpu"
    mem_unit = "GiB (torch.cuda.max_memory_allocated)" if cuda else "GiB (process peak RSS)"
    out = {
        "step_time": val(s["s_per_step"], "s"),
        "clips_per_s": val(s["clips_per_s"], "clips/s"),
        "tflops": val(s["tflops"], "TFLOP/s"),
        "peak_mem": val(s["peak_mem_gb"], mem_unit),
    }
    if s.get("mfu") is not None:
        out["mfu_vs_peak"] = val(s["mfu"], f"fraction of {r['peak_tflops']:g} TFLOP/s ({r['peak_source']})")
    if matmul_tflops:
        out["mfu_vs_matmul"] = val(
            s["tflops"] / matmul_tflops, f"fraction of the measured matmul, {matmul_tflops:.1f} TFLOP/s"
        )
    return out


def run_worker(worker: str, plan: dict, out_dir: Path, result: Path, deadline: float) -> int:
    import torch

    sys.path.insert(0, str(TOOLS))
    import bench_train

    from mae_scale.train import dist as D

    store = Recorder(result)
    D.init_distributed()
    ctx: dict = {"matmul_tflops": None, "cuda": torch.cuda.is_available()}
    for name in WORKERS[worker]:
        if name not in plan["parts"]:
            continue
        part = Part(name, plan["budgets"][name], deadline, store)
        try:
            globals()[f"part_{name}"](part, plan, ctx, bench_train, torch, out_dir)
            part.finish(**ctx.pop("finish", {}))
        except Exception as e:
            part.rec["traceback"] = traceback.format_exc()[-3000:]
            part.finish("failed", f"{type(e).__name__}: {e}")
    D.shutdown()
    return 0


def part_matmul(part, plan, ctx, bench_train, torch, out_dir):
    n, reps = plan["matmul_n"], plan["matmul_reps"]
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"

    def measure():
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)  # random: zeros run faster
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(reps):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                a @ b
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
        times.sort()
        med = times[len(times) // 2]
        ctx["matmul_tflops"] = 2 * n**3 / med / 1e12
        return {
            "tflops_median": val(ctx["matmul_tflops"], "TFLOP/s"),
            "tflops_best": val(2 * n**3 / times[0] / 1e12, "TFLOP/s"),
            "time_median": val(med, "s"),
        }

    config = {"n": n, "dtype": "bf16", "warmup": 3, "timed": reps, "data": "torch.randn", "device": dev}
    part.attempt(
        f"matmul {n}^3 bf16", config, f"tools/gpu/check.py --only matmul ({n}^3, median of {reps})", measure
    )


def with_peak(argv: list[str], ctx: dict) -> list[str]:
    """On CPU the MFU peak is the matmul part's rate (bench_train would time a 1024^3 bf16 matmul
    itself: 25 s on a CPU without bf16 units); on a GPU the datasheet peak (metrics.KNOWN_PEAKS)."""
    if ctx.get("matmul_tflops") and not ctx.get("cuda"):
        return argv + ["--peak-tflops", f"{ctx['matmul_tflops']:.6g}"]
    return argv


def _bench(part, plan, ctx, bench_train, name: str, argv: list[str], key: str = "deepspeed") -> dict | None:
    holder = {}
    argv = with_peak(argv, ctx)

    def run():
        r = bench_train.bench(bench_train.parse_args(argv))
        holder["r"] = r
        vals = step_values(r, key, ctx["matmul_tflops"])
        vals["gflop_per_step"] = val(r["gflop_per_step"], "GFLOP (flops.train_step_flops)")
        return vals

    config = {"argv": argv, "role": name.split()[0]}
    m = part.attempt(name, config, command_of(argv), run)
    if m is not None:
        m["config"]["attention_resolved"] = holder["r"]["attention"]
        m["config"]["precision"] = holder["r"]["precision"]
        m["config"]["device"] = holder["r"]["device"]
        part.store.save()
        return holder["r"]
    return None


def _kernels_to_compare(torch) -> tuple[str, list[str]]:
    """The kernel `auto` picks on this device, and the other explicit ones worth timing."""
    from mae_scale.model.attention import resolve_backend

    auto = resolve_backend("auto", "cuda" if torch.cuda.is_available() else "cpu")
    return auto, [k for k in ("xformers", "sdpa") if k != auto]


def part_steps(part, plan, ctx, bench_train, torch, out_dir):
    from mae_scale.config import ModelConfig
    from mae_scale.model.attention import xformers_available

    auto, others = _kernels_to_compare(torch)
    ctx["auto"] = auto
    cuda = torch.cuda.is_available()
    profile = str(out_dir / "profile_vit_l.txt")
    for role in plan["step_roles"]:
        first = role == "vit_l"
        r = _bench(
            part, plan, ctx, bench_train, f"{role} auto ckpt0",
            bench_argv(plan, role, attention="auto", profile=profile if first else None),
        )  # fmt: skip
        if first:
            ctx["vit_l"] = r
        for kernel in others:
            if kernel == "xformers" and not (cuda and xformers_available()):
                why = "no CUDA" if not cuda else "xformers is not importable here (see env)"
                part.skip(f"{role} xformers ckpt0", f"{why}: auto runs {auto}", na=True)
                continue
            _bench(
                part,
                plan,
                ctx,
                bench_train,
                f"{role} {kernel} ckpt0",
                bench_argv(plan, role, attention=kernel),
            )
        if role == "vit_b":
            _bench(
                part, plan, ctx, bench_train, f"{role} math ckpt0", bench_argv(plan, role, attention="math")
            )
        if first:
            _bench(part, plan, ctx, bench_train, f"{role} auto ckpt1", bench_argv(plan, role, ckpt=1))
    # Dual masking (#19): bench_train counts FLOPs with the run's model kwargs, which carry
    # decoder_mask_ratio (vit_l: 489.7 -> 383.3 GFLOP per clip at 0.5), so this row's MFU is honest.
    if hasattr(ModelConfig(), "decoder_mask_ratio"):
        _bench(
            part, plan, ctx, bench_train, "vit_l auto ckpt0 decoder_mask_ratio=0.5",
            bench_argv(plan, "vit_l", sets=["model.decoder_mask_ratio=0.5"]),
        )  # fmt: skip
    else:
        part.skip(
            "vit_l auto ckpt0 decoder_mask_ratio=0.5",
            "model.decoder_mask_ratio is not in this tree (dual masking, issue #19): runs once it is",
            na=True,
        )


def part_profile(part, plan, ctx, bench_train, torch, out_dir):
    """The table was written by the first vit_l step measurement (one more step under the profiler)."""
    path = out_dir / "profile_vit_l.txt"
    r = ctx.get("vit_l")
    if r is None or not path.is_file():
        ctx["finish"] = {"status": "skipped", "reason": "the vit_l step measurement did not run (see steps)"}
        return
    part.rec["measurements"].append(
        {
            "name": "profile vit_l auto ckpt0",
            "status": "ok",
            "config": {
                "argv": bench_argv(plan, "vit_l", profile=str(path)),
                "sort_by": r["profile"]["sort_by"],
            },
            "command": command_of(bench_argv(plan, "vit_l", profile="profile_vit_l.txt")),
            "values": {
                "rows": val(r["profile"]["rows"], "kernels"),
                "bytes": val(path.stat().st_size, "bytes"),
            },
            "file": path.name,
        }
    )


def part_baseline(part, plan, ctx, bench_train, torch, out_dir):
    for baseline, key in (("mae_st", "mae_st_way"), ("plain", "plain_pytorch")):
        argv = with_peak(bench_argv(plan, "vit_l", baseline=baseline), ctx)
        holder = {}

        def run(argv=argv, key=key, holder=holder):
            r = bench_train.bench(bench_train.parse_args(argv))
            holder["r"] = r
            vals = {f"deepspeed_{k}": v for k, v in step_values(r, "deepspeed", ctx["matmul_tflops"]).items()}
            vals.update({f"{key}_{k}": v for k, v in step_values(r, key, ctx["matmul_tflops"]).items()})
            vals["speed_ratio"] = val(
                r[f"deepspeed_over_{key}_speed"], f"x ({key} s/step over DeepSpeed s/step)"
            )
            if f"{key}_over_deepspeed_memory" in r:
                vals["memory_ratio"] = val(
                    r[f"{key}_over_deepspeed_memory"], f"x ({key} peak over DeepSpeed peak)"
                )
            return vals

        part.attempt(f"vit_l deepspeed vs {key}", {"argv": argv, "role": "vit_l"}, command_of(argv), run)


def encode_all(model, imgs):
    """The encoder on every token (mask 0: the model's masking needs one token hidden): patch embedding,
    position tables, class token, blocks, norm; the same modules forward_encoder runs."""
    import torch

    from mae_scale.model.mae import _separable

    x = model.patch_embed(imgs) + _separable(model.pos_embed_spatial, model.pos_embed_temporal)
    cls = (model.cls_token + model.pos_embed_class).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1)
    for blk in model.blocks:
        x = blk(x)
    return model.norm(x)[:, 1:]


def encoder_flops(kw: dict, mask_ratio: float, clips: int) -> float:
    """3 x forward FLOPs of patch embedding + encoder blocks (mask 0: every token) for `clips` clips."""
    from mae_scale.model.flops import _block_flops, forward_flops, model_kwargs

    if mask_ratio > 0:
        f = forward_flops(kw, mask_ratio=mask_ratio)
        return 3 * clips * (f["patch_embed"] + f["encoder"])
    k = model_kwargs(kw)
    p, tp = k["patch_size"], k["t_patch_size"]
    n = (k["num_frames"] // tp) * (k["img_size"] // p) ** 2
    patch = 2 * n * (k["in_chans"] * tp * p * p) * k["embed_dim"]
    return 3 * clips * (patch + k["depth"] * _block_flops(n + 1, k["embed_dim"], k["mlp_ratio"]))


def part_encoder(part, plan, ctx, bench_train, torch, out_dir):
    """Forward + backward of the encoder alone at mask 0.9 (the visible 10%) and on every token."""
    from mae_scale.model.mae import MaskedAutoencoderViT
    from mae_scale.model.presets import arch

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    preset = plan["roles"]["vit_l"]
    kw = dict(arch(preset), img_size=plan["size"], num_frames=plan["frames"], pred_t_dim=plan["frames"] // 2)
    times = {}
    for ratio in (0.9, 0.0):

        def run(ratio=ratio):
            _free()
            torch.manual_seed(0)
            model = MaskedAutoencoderViT(**kw, device=dev)
            x = torch.randn(plan["clips"], 3, plan["frames"], plan["size"], plan["size"], device=dev)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    latent = model.forward_encoder(x, ratio)[0] if ratio else encode_all(model, x)
                latent.float().square().mean().backward()
                model.zero_grad(set_to_none=True)

            for _ in range(plan["encoder_warmup"]):
                step()
            sync()
            t0 = time.perf_counter()
            for _ in range(plan["encoder_steps"]):
                step()
            sync()
            t = (time.perf_counter() - t0) / plan["encoder_steps"]
            times[ratio] = t
            flops = encoder_flops(kw, ratio, plan["clips"])
            out = {
                "step_time": val(t, "s"),
                "clips_per_s": val(plan["clips"] / t, "clips/s"),
                "tflops": val(flops / t / 1e12, "TFLOP/s (3 x analytic forward: patch embedding + encoder)"),
                "tokens_encoded": val(latent_tokens(kw, ratio), "tokens per clip (+ class token)"),
            }
            if cuda:
                out["peak_mem"] = val(torch.cuda.max_memory_allocated() / 2**30, "GiB (max allocated)")
            if ratio == 0.0 and 0.9 in times:
                out["speedup_of_mask_0.9"] = val(t / times[0.9], "x (all-token time over mask-0.9 time)")
                ratio_flops = flops / encoder_flops(kw, 0.9, plan["clips"])
                out["flop_ratio"] = val(ratio_flops, "x (all-token encoder FLOPs over mask-0.9 FLOPs)")
            return out

        config = {"preset": preset, "clips": plan["clips"], "frames": plan["frames"], "size": plan["size"]}
        config.update(mask_ratio=ratio, precision="bf16 autocast", attention="auto", deepspeed=False)
        name = "vit_l encoder mask 0.9" if ratio else "vit_l encoder mask 0 (every token)"
        part.attempt(name, config, "python tools/gpu/check.py --only encoder", run)


def latent_tokens(kw: dict, ratio: float) -> int:
    from mae_scale.model.flops import model_kwargs
    from mae_scale.model.masking import num_visible

    k = model_kwargs(kw)
    grid = (
        k["num_frames"] // k["t_patch_size"],
        k["img_size"] // k["patch_size"],
        k["img_size"] // k["patch_size"],
    )
    return num_visible(k["mask_type"], grid, ratio) if ratio else grid[0] * grid[1] * grid[2]


def _largest_try(part, plan, ctx, bench_train, role, ds_config):
    argv = bench_argv(
        plan, role, ds_config=ds_config, ckpt=1, steps=plan["big_steps"], warmup=plan["big_warmup"]
    )
    return _bench(part, plan, ctx, bench_train, f"{role} {ds_config} ckpt1", argv)


def part_largest(part, plan, ctx, bench_train, torch, out_dir):
    """Largest first: the first preset that trains is the answer (every smaller one then fits too)."""
    order = ["vit_2b", "vit_g", "vit_h"]
    for i, role in enumerate(order):
        if _largest_try(part, plan, ctx, bench_train, role, "zero3.json") is not None:
            part.rec["largest_that_trains"] = {"preset": role, "of": order}
            for smaller in order[i + 1 :]:
                part.skip(f"{smaller} zero3.json ckpt1", f"not needed: {role} already trains", na=True)
            return


def part_offload(part, plan, ctx, bench_train, torch, out_dir):
    for role in ("vit_g", "vit_2b"):
        if plan["mode"] == "dry-run" and not plan.get("with_offload"):
            why = (
                "dry run: zero3_offload.json first JIT-builds DeepSpeed's cpu_adam (46 s on 2 idle cores, "
                "again for every checkout path, and a build killed half-way leaves a lock that stalls every "
                "later load); --with-offload runs it. The engine with this config is tested by "
                "tests/test_hardware.py; this part's code is the `largest` part's with another config"
            )
            part.skip(f"{role} zero3_offload.json ckpt1", why, na=True)
            continue
        _largest_try(part, plan, ctx, bench_train, role, "zero3_offload.json")


# --------------------------------------------------------------------------------------------------
# Parts that the driver runs itself (subprocesses with a timeout)


def probe() -> dict:
    """Versions and what the GPU can run; run in a child process (a broken xformers crashes only it)."""
    import importlib.metadata as md
    import platform

    info: dict = {"python": platform.python_version(), "executable": sys.executable}
    for name in ("torch", "deepspeed", "xformers", "av", "webdataset", "pydantic", "numpy", "triton"):
        try:
            info[f"{name}_version"] = md.version(name)
        except md.PackageNotFoundError:
            info[f"{name}_version"] = None
    import torch

    info["torch_file"] = torch.__file__
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory": val(p.total_memory / 2**30, "GiB"),
        }
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_file"] = deepspeed.__file__
        info["deepspeed_accelerator"] = get_accelerator().device_name()
    except Exception as e:
        info["deepspeed_error"] = f"{type(e).__name__}: {e}"
    from mae_scale.model.attention import _xformers_import_error, attention, math_attention, resolve_backend

    info["xformers_import_error"] = _xformers_import_error()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info["attention_auto"] = resolve_backend("auto", dev)
    if info["xformers_import_error"] is None and dev == "cuda":
        try:
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (
                torch.randn(2, 157, 16, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3)
            )
            ref = math_attention(q.double(), k.double(), v.double())
            out = attention(q, k, v, "xformers").double()
            err = ((out - ref).norm() / ref.norm()).item()
            info["xformers_check"] = {
                "rel_error_vs_fp64_math": val(err, "relative Frobenius error"),
                "ok": err < 1e-2,
            }
        except Exception as e:
            info["xformers_check"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return info


def part_env(part: Part, plan: dict, env: dict) -> dict:
    """Versions; returns the environment for the children (xformers on the path only if it works)."""
    smi = {}
    try:
        q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        smi = {
            "query": q,
            "rc": proc.returncode,
            "out": proc.stdout.strip(),
            "err": proc.stderr.strip()[-300:],
        }
    except (OSError, subprocess.TimeoutExpired) as e:
        smi = {"error": f"{type(e).__name__}: {e}"}
    part.rec["nvidia_smi"] = smi
    xf_site = os.environ.get("MAE_SCALE_XFORMERS_SITE")
    child_env = dict(env)
    trial_env = dict(env)
    if xf_site:
        trial_env["PYTHONPATH"] = xf_site + os.pathsep + env.get("PYTHONPATH", "")

    def run_probe():
        proc = subprocess.run(
            [sys.executable, __file__, "--probe"], cwd=REPO, env=trial_env, capture_output=True, text=True,
            timeout=max(5.0, part.left()),
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"probe exited {proc.returncode}: {proc.stderr[-1500:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        part.rec["versions"] = info
        return {
            "cuda_available": val(int(info["cuda_available"]), "1 = yes"),
            "xformers_usable": val(int(bool(info.get("xformers_check", {}).get("ok"))), "1 = yes"),
        }

    m = part.attempt(
        "versions and kernels", {"xformers_site": xf_site}, "python tools/gpu/check.py --probe", run_probe
    )
    usable = bool(m and part.rec["versions"].get("xformers_check", {}).get("ok"))
    if xf_site and usable:
        child_env = trial_env
    part.rec["xformers_in_use"] = usable
    part.rec["xformers_note"] = (
        "xformers 0.0.35 from PyPI (torch 2.10 + CUDA 12.8 build) imported and agreed with math attention"
        if usable
        else (
            "not carried: no xformers wheel for torch 2.11 + CUDA 13 on PyPI "
            "(wheels.sh --xformers carries the CUDA 12.8 build)"
            if not xf_site
            else "carried but not usable here (see versions.xformers_*): attention auto runs sdpa"
        )
    )
    return child_env


def part_gpu_tests(part: Part, plan: dict, env: dict) -> None:
    files = ["tests/test_gpu.py", "tests/test_model.py"]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        argv = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-m",
            "gpu",
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
        ]
        argv += files
        command = "python -m pytest -q -m gpu " + " ".join(files)

        def run():
            try:
                proc = subprocess.run(
                    argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(5.0, part.left())
                )
            except subprocess.TimeoutExpired as e:
                raise TimeoutError(f"pytest ran past the part's budget: {(e.stdout or '')[-800:]}") from None
            print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n", flush=True)
            if not junit.is_file():
                raise RuntimeError(f"pytest exited {proc.returncode} without a report: {proc.stderr[-1500:]}")
            tests, counts = read_junit(junit)
            part.rec["tests"] = tests
            part.rec["pytest_rc"] = proc.returncode
            values = {k: val(v, "tests") for k, v in counts.items()}
            if counts["failed"] or counts["errors"]:
                bad = [t["name"] for t in tests if t["outcome"] in ("failed", "error")]
                raise AssertionError(f"GPU tests failed: {bad}")
            return values

        m = part.attempt("pytest -m gpu", {"files": files}, command, run)
    if m is not None and m["values"]["passed"]["value"] == 0:
        skipped = [t for t in part.rec.get("tests", []) if t["outcome"] == "skipped"]
        why = "; ".join(dict.fromkeys(t["message"] for t in skipped)) or "none collected"
        part.finish("skipped", f"every GPU test skipped ({len(skipped)}): {why}")
    else:
        part.finish()


def read_junit(path: Path) -> tuple[list[dict], dict]:
    root = ET.parse(path).getroot()
    tests, counts = [], {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = (child.get("message") or child.text or "")[:400]
        counts[{"error": "errors"}.get(outcome, outcome)] += 1
        tests.append(
            {
                "name": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "message": message,
                "time": val(float(case.get("time") or 0), "s"),
            }
        )
    return tests, counts


def part_data(part: Part, plan: dict, env: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "data.json"
        argv = plan["data_args"] + ["--repeats", "4", "--repeat-span", "clip", "--json", str(out)]
        data_env = {k: v for k, v in env.items() if k != "DS_ACCELERATOR"}

        def run():
            try:
                proc = subprocess.run(
                    [sys.executable, str(TOOLS / "bench_data.py"), *argv], cwd=REPO, env=data_env,
                    capture_output=True, text=True, timeout=max(5.0, part.left()),
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise TimeoutError("bench_data ran past the part's budget") from None
            print(proc.stdout[-1500:], flush=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench_data exited {proc.returncode}: {proc.stderr[-1500:]}")
            res = json.loads(out.read_text())
            row = res["rows"]["span=clip R=4"]
            part.rec["setting"] = res["setting"]
            return {
                "pipeline_per_core": val(row["pipeline_clips_per_s"], "clips/s (1 worker process, 1 thread)"),
                "raw_decode_per_core": val(row["raw_decode_clips_per_s"], "clips/s (R=4 from one window)"),
                "decode_augment_per_core": val(row["decode_augment_clips_per_s"], "clips/s (1 thread)"),
            }

        part.attempt(
            "bench_data 224 px R=4 clip", {"argv": argv}, command_of(argv[:-2], "tools/bench_data.py"), run
        )


def derive_cores(parts: dict, plan: dict) -> dict:
    """Cores per GPU so the loader keeps up with vit_l: GPU clips/s over one worker's clips/s."""
    try:
        steps = parts["steps"]["measurements"]
        gpu = next(m for m in steps if m["name"] == "vit_l auto ckpt0" and m["status"] == "ok")
        data = next(m for m in parts["data"]["measurements"] if m["status"] == "ok")
    except (KeyError, StopIteration):
        return {"reason": "needs both the vit_l step (steps) and the data rate (data)"}
    need = gpu["values"]["clips_per_s"]["value"]
    per_core = data["values"]["pipeline_per_core"]["value"]
    return {
        "gpu_clips_per_s": val(need, f"clips/s (vit_l, auto, {plan['clips']} clips/step, synthetic uint8)"),
        "per_core_clips_per_s": val(per_core, "clips/s per loader worker (one core)"),
        "cores_for_no_wait": val(need / per_core, "cores (loader workers) per GPU"),
        "cores_for_5pct_wait": val(0.95 * need / per_core, "cores per GPU: supply 95% of the demand"),
        "assumes": "workers scale linearly (one core each, as hardware.py pins them); the main process, "
        "the host-to-device copy and the GPU step need cores of their own beyond these",
    }


# --------------------------------------------------------------------------------------------------
# The driver


def run_child_worker(
    name: str, plan: dict, env: dict, out_dir: Path, store: Recorder, deadline: float
) -> None:
    parts = [p for p in WORKERS[name] if p in plan["parts"]]
    if not parts:
        return
    budget = sum(plan["budgets"][p] for p in parts)
    timeout = max(1.0, min(budget + 30, deadline - now()))  # + start-up: imports, process group
    if deadline - now() < 5:
        for p in parts:
            store.parts[p] = {
                "status": "skipped",
                "reason": "the run's deadline was reached",
                "measurements": [],
            }
        store.save()
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "worker.json"
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps({**plan, "worker_deadline": now() + timeout - 5}))
        cmd = [sys.executable, __file__, "--worker", name, "--plan", str(plan_file), "--result", str(result)]
        cmd += ["--out", str(out_dir)]
        print(f"[check] worker {name}: parts {parts}, {timeout:.0f} s at most", flush=True)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            killed = None
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc, killed = proc.returncode, f"worker killed at its hard time limit ({timeout:.0f} s)"
        got = json.loads(result.read_text())["parts"] if result.is_file() else {}
    for p in parts:
        rec = got.get(p)
        if rec is None:
            why = killed or f"worker exited {rc} before this part"
            rec = {"status": "skipped", "reason": why, "measurements": []}
        elif rec.get("status") == "running":
            rec["status"] = "partial" if any(m["status"] == "ok" for m in rec["measurements"]) else "failed"
            rec["reason"] = killed or f"worker exited {rc} inside this part (a crash: see check.log)"
        store.parts[p] = rec
    store.save()


def prebuild_cpu_adam(plan: dict, env: dict) -> subprocess.Popen | None:
    """On the GPU machine, JIT-build DeepSpeed's cpu_adam (offload needs it; 30-60 s of one compiler)
    in the background while the other parts run: the offload worker then loads it, or waits on its lock."""
    if plan["mode"] != "gpu" or "offload" not in plan["parts"]:
        return None
    code = "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()"
    print("[check] building DeepSpeed's cpu_adam in the background (for the offload part)", flush=True)
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a worker and everything it started. Its process group is not enough: ninja (DeepSpeed's
    JIT builds) puts each compiler in a group of its own. A build killed half-way leaves its
    torch-extensions `lock` file behind, and every later load of that op waits on it: say so."""
    try:
        import psutil

        kids = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing, or the worker already gone
        kids = []
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    for kid in kids:
        try:
            kid.kill()
        except Exception:
            pass
    proc.wait()
    ext = os.environ.get("TORCH_EXTENSIONS_DIR")
    if kids and ext:
        locks = [str(p) for p in Path(ext).glob("*/lock")]
        if locks:
            print(f"[check] killed a worker that may have been JIT-building: check these locks {locks}")


def drive(args) -> int:
    plan_base = DRY if args.dry_run else GPU
    only = set(args.only.split(",")) if args.only else set(PARTS)
    unknown = only - set(PARTS)
    if unknown:
        raise SystemExit(f"--only: unknown parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
    plan = {
        **plan_base,
        "parts": [p for p in PARTS if p in only],
        "mode": "dry-run" if args.dry_run else "gpu",
    }
    plan["with_offload"] = args.with_offload
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = now()
    deadline = start + plan["total_s"]
    store = Recorder(out_dir / "gpu_check.json")
    store.extra = {
        "schema": SCHEMA,
        "mode": plan["mode"],
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
        "command": "bash tools/gpu/check.sh" + (" --dry-run" if args.dry_run else ""),
        "total_budget_s": plan["total_s"],
        "plan": {k: v for k, v in plan.items() if k != "parts"},
        "wheels": _wheels_summary() if not args.dry_run else {"reason": "the dry run uses .venv's packages"},
    }
    from mae_scale import hardware

    hardware.pin_extension_cache()  # the workers' TORCH_EXTENSIONS_DIR, known here too (kill_tree)
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    if str(REPO) not in env["PYTHONPATH"].split(os.pathsep):
        env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + str(REPO)
    env.update(PYTHONUNBUFFERED="1", MAE_SCALE_NO_BAR="1", WANDB_MODE="offline", WANDB_SILENT="true")
    for name in PARTS:
        if name not in plan["parts"]:
            store.parts[name] = {
                "status": "skipped",
                "reason": f"not in --only {args.only}",
                "measurements": [],
            }
    if "env" in plan["parts"]:
        part = Part("env", plan["budgets"]["env"], deadline, store)
        env = part_env(part, plan, env)
        part.finish()
    prebuild = prebuild_cpu_adam(plan, env)
    if "gpu_tests" in plan["parts"]:
        part = Part("gpu_tests", plan["budgets"]["gpu_tests"], deadline, store)
        part_gpu_tests(part, plan, env)
    run_child_worker("bench", plan, env, out_dir, store, deadline)
    if "data" in plan["parts"]:
        part = Part("data", plan["budgets"]["data"], deadline, store)
        part_data(part, plan, env)
        part.finish()
    run_child_worker("largest", plan, env, out_dir, store, deadline)
    if plan["mode"] == "dry-run" and not plan["with_offload"] and "offload" in plan["parts"]:
        part = Part("offload", plan["budgets"]["offload"], deadline, store)  # records why not, no child
        part_offload(part, plan, None, None, None, out_dir)
        part.finish()
    else:
        run_child_worker("offload", plan, env, out_dir, store, deadline)
    if prebuild is not None:
        rc = prebuild.poll()
        if rc is None:
            kill_tree(prebuild)
        store.parts["offload"]["cpu_adam_prebuild"] = {"rc": rc, "note": "None: still building at the end"}
    if "data" in store.parts:
        store.parts["data"]["cores_per_gpu"] = derive_cores(store.parts, plan)
    store.extra["goals"] = goals(store.parts, plan["mode"])
    store.extra["elapsed_s"] = round(now() - start, 1)
    store.save()
    print_summary(store, out_dir)
    return 0


def _wheels_summary() -> dict:
    path = REPO / ".whl" / "wheels.json"
    if not path.is_file():
        return {
            "reason": "no .whl/wheels.json (the dry run uses .venv; the device needs tools/gpu/wheels.sh)"
        }
    w = json.loads(path.read_text())
    return {
        "total": val(w["total_bytes"] / 2**20, "MiB"),
        "wheels": [f"{r['name']}=={r['version']} ({r['group']})" for r in w["wheels"]],
    }


def goals(parts: dict, mode: str) -> dict:
    """The issue's goals, read off the measurements (absent numbers say why)."""

    def find(part, name):
        for m in parts.get(part, {}).get("measurements", []):
            if m["name"] == name and m["status"] == "ok":
                return m
        return None

    out = {}
    if mode == "dry-run":
        out["note"] = "dry run: tiny models on CPU; these prove the code path, they are not readings"
    m = find("steps", "vit_l auto ckpt0")
    if m and "mfu_vs_peak" in m["values"]:
        mfu = m["values"]["mfu_vs_peak"]
        out["vit_l_mfu_auto"] = {**mfu, "goal": 0.45, "met": mfu["value"] >= 0.45}
    else:
        out["vit_l_mfu_auto"] = {"reason": "no vit_l step measurement with a peak"}
    m = find("baseline", "vit_l deepspeed vs mae_st_way")
    if m:
        r = m["values"]["speed_ratio"]
        out["vit_l_speed_vs_mae_st_way"] = {**r, "goal": 2.0, "met": r["value"] >= 2.0}
    else:
        out["vit_l_speed_vs_mae_st_way"] = {"reason": "no baseline measurement"}
    tests = parts.get("gpu_tests", {})
    out["gpu_tests"] = {"status": tests.get("status"), "reason": tests.get("reason")}
    return out


def print_summary(store: Recorder, out_dir: Path) -> None:
    print("\n[check] summary (all numbers: gpu_check.json)", flush=True)
    for name, rec in store.parts.items():
        took = rec.get("elapsed_s", "-")
        print(f"  {name:<10} {rec['status']:<8} {took!s:>6} s  {(rec.get('reason') or '')[:150]}")
        for m in rec.get("measurements", []):
            vals = m.get("values") or {}
            short = ", ".join(
                f"{k} {v['value']:.4g}"
                for k, v in vals.items()
                if k in SUMMARY_KEYS
            )  # fmt: skip
            print(f"      {m['status']:<7} {m['name']:<42} {short or (m.get('reason') or '')[:100]}")
    print(f"  goals: {json.dumps(store.extra.get('goals'))}")
    print(f"[check] wrote {out_dir / 'gpu_check.json'} in {store.extra.get('elapsed_s')} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the same code paths")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu_check"))
    ap.add_argument("--only", default=None, help=f"comma-separated parts of: {', '.join(PARTS)}")
    ap.add_argument("--with-offload", action="store_true", help="dry run: also the offload part (cpu_adam)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.probe:
        print(json.dumps(probe(), default=str))
        return 0
    if args.worker:
        plan = json.loads(Path(args.plan).read_text())
        return run_worker(args.worker, plan, Path(args.out), Path(args.result), plan["worker_deadline"])
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
