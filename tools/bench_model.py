"""Benchmark one MAE-ST training step (forward + backward) of a preset: time, memory, FLOP/s, MFU.

    python tools/bench_model.py --preset vit_b --batch 2 --precision bf16 --backend sdpa
    python tools/bench_model.py --preset vit_l --batch 16 --ckpt 1 --device cuda   # MFU vs 989 on H100
    python tools/bench_model.py --preset vit_l --batch 8 --precision bf16 --device cuda \
        --decoder-mask-ratio 0 0.5 0.75                          # dual masking, side by side
    python tools/bench_model.py --preset vit_b --batch 1 --precision fp32 bf16-weights bf16

Several `--decoder-mask-ratio` values, or several `--precision` values, are timed side by side
(variants of the same weights): the timed steps take turns, one per variant, so a change of machine
load hits every variant alike; the last lines give each variant's median step time and FLOPs
relative to the first one's. Precisions: `fp32`; `bf16-weights`, parameters and activations in bf16
as DeepSpeed's bf16 mode trains them (what `train.precision=bf16` runs); `bf16`, fp32 weights under
bf16 autocast (as mae_st trains). On CPU they
also give the process's CPU time per step (all threads), which other jobs on a shared machine
disturb less than the wall clock (they take cores away, not work); `--threads` sets torch's threads.

Synthetic normalized clips (the model's speed does not depend on pixel values); no optimizer step.
FLOPs come from `mae_scale.model.flops.train_step_flops` (3 x analytic forward). MFU = achieved
FLOP/s / peak: `--peak-tflops`, or the table below for known GPUs in bf16; otherwise "n/a".
Peak memory: CUDA max allocated on GPU; on CPU the process's peak RSS (everything, not just tensors).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mae_scale.model import MaskedAutoencoderViT, apply_activation_checkpointing, arch, train_step_flops  # noqa: E402
from mae_scale.model.presets import ARCHS  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring; SXM parts (PCIe H100: 756).
KNOWN_BF16_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.float32, "bf16-weights": torch.bfloat16}  # weight dtype


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=list(ARCHS))
    ap.add_argument("--batch", type=int, default=2, help="clips per step")
    ap.add_argument("--backend", default="auto", choices=["auto", "sdpa", "math", "xformers"])
    ap.add_argument(
        "--precision",
        nargs="+",
        default=["fp32"],
        choices=list(PRECISIONS),
        help="several: side by side (bf16: autocast; bf16-weights: as the engine trains)",
    )
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--pred-t-dim", type=int, default=None, help="default: frames / 2, as mae_st")
    ap.add_argument("--mask-type", default="random", choices=["random", "tube", "frame", "cube"])
    ap.add_argument("--mask-ratio", type=float, default=0.9)
    ap.add_argument(
        "--decoder-mask-ratio",
        type=float,
        nargs="+",
        default=[0.0],
        help="dual masking; several: side by side",
    )
    ap.add_argument("--decoder-mask-type", default="running_cell", choices=["running_cell", "random"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--ckpt", type=int, default=0, help="activation checkpointing: every k-th block, 0 none")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)"
    )
    return ap.parse_args(argv)


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cuda" and args.precision[0] != "fp32":
        name = torch.cuda.get_device_name(device)
        for key, peak in KNOWN_BF16_PEAKS.items():
            if key in name:
                return peak, f"{name} dense bf16"
    return None, "unknown: pass --peak-tflops"


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = args.decoder_mask_ratio
    precisions = args.precision
    if len(ratios) > 1 and len(precisions) > 1:
        raise SystemExit("compare several decoder mask ratios or several precisions, not both at once")
    kwargs = dict(
        arch(args.preset), img_size=args.size, num_frames=args.frames,
        pred_t_dim=args.pred_t_dim or args.frames // 2, mask_type=args.mask_type,
        mask_ratio=args.mask_ratio, attention=args.backend,
        decoder_mask_ratio=ratios[0], decoder_mask_type=args.decoder_mask_type,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**kwargs, device=device)
    apply_activation_checkpointing(model, args.ckpt)
    imgs = torch.randn(args.batch, 3, args.frames, args.size, args.size, device=device)
    models = {torch.float32: model}
    for precision in precisions:  # a bf16-weights copy of the same weights
        models.setdefault(PRECISIONS[precision], copy.deepcopy(model).to(PRECISIONS[precision]))
    # (label, precision, decoder ratio): one side-by-side variant each
    variants = [(f"decoder_mask_ratio {r:g}", precisions[0], r) for r in ratios]
    if len(precisions) > 1:
        variants = [(f"precision {p}", p, ratios[0]) for p in precisions]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(precision: str, ratio: float) -> None:
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        dtype = PRECISIONS[precision]
        with autocast:
            loss, _, _ = models[dtype](imgs.to(dtype), decoder_mask_ratio=ratio)
        loss.backward()
        models[dtype].zero_grad(set_to_none=True)

    for _, precision, ratio in variants:
        for _ in range(args.warmup):
            step(precision, ratio)
    sync()
    labels = [v[0] for v in variants]
    times = {v: [] for v in labels}
    cpu_times = {v: [] for v in labels}  # process CPU time, all threads
    peak_mem = dict.fromkeys(labels, 0)
    for _ in range(args.steps):
        for label, precision, ratio in variants:  # interleaved: every variant sees the same machine load
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step(precision, ratio)
            sync()
            times[label].append(time.perf_counter() - start)
            cpu_times[label].append(time.process_time() - cpu_start)
            if device.type == "cuda":
                peak_mem[label] = max(peak_mem[label], torch.cuda.max_memory_allocated(device))

    peak, peak_src = peak_tflops(args, device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    params = sum(p.numel() for p in model.parameters())
    print(
        f"preset={args.preset} params={params / 1e6:.1f}M clip={args.frames}x{args.size} batch={args.batch} "
        f"precision={','.join(precisions)} attention={model.attention_backend()} ckpt={args.ckpt} "
        f"mask={args.mask_type}:{args.mask_ratio} decoder_mask={args.decoder_mask_type}:"
        f"{','.join(f'{r:g}' for r in ratios)} device={where} torch={torch.__version__}"
    )
    flops = {
        label: train_step_flops(model.config, batch_size=args.batch, decoder_mask_ratio=ratio)
        for label, _, ratio in variants
    }
    for label in labels:
        sec = statistics.median(times[label])
        achieved = flops[label] / sec / 1e12
        if device.type == "cuda":
            mem = f"{peak_mem[label] / 2**30:.2f} GiB (CUDA max allocated)"
        else:
            mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"
        mfu = f"{100 * achieved / peak:.1f}% of {peak:g} ({peak_src})" if peak else f"n/a ({peak_src})"
        head = f"{label}: " if len(variants) > 1 else ""
        print(
            f"{head}step {sec * 1e3:.1f} ms (median of {args.steps}; min {min(times[label]) * 1e3:.1f}, "
            f"max {max(times[label]) * 1e3:.1f}) | {args.batch / sec:.2f} clips/s | "
            f"{flops[label] / args.batch / 1e9:.1f} GFLOP/clip | {achieved:.3f} TFLOP/s | MFU {mfu} | "
            f"peak mem {mem}"
        )
    base = labels[0]
    for label in labels[1:]:
        # per round: this variant's step over the first variant's step right before it
        rel = statistics.median(t / t0 for t, t0 in zip(times[label], times[base], strict=True))
        fastest = min(times[label]) / min(times[base])  # the least disturbed steps, on a shared machine
        print(
            f"{label} vs {base.split()[-1]}: step time x{rel:.3f} (median of {args.steps} "
            f"side-by-side rounds; speed-up {1 / rel:.2f}x; fastest steps x{fastest:.3f}), "
            f"FLOPs x{flops[label] / flops[base]:.3f}"
        )
        if device.type == "cpu":
            cpu_rel = statistics.median(
                t / t0 for t, t0 in zip(cpu_times[label], cpu_times[base], strict=True)
            )
            print(
                f"{label} vs {base.split()[-1]}: CPU time per step x{cpu_rel:.3f} (median; "
                f"{statistics.median(cpu_times[label]):.2f} s vs {statistics.median(cpu_times[base]):.2f} s)"
            )


if __name__ == "__main__":
    main()
