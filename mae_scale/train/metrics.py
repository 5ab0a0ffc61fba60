"""Training metrics: console progress bar, RUN/metrics.jsonl and wandb (offline unless configured)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense peak TFLOP/s by device name fragment and precision (vendor datasheets).
KNOWN_PEAKS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}


def device_peak_tflops(precision: str, override: float = 0.0) -> tuple[float, str]:
    """Peak TFLOP/s of this device for MFU: a given value, a datasheet value, or (CPU) a measured matmul."""
    if override > 0:
        return override, "given"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in KNOWN_PEAKS.items():
            if key in name:
                return peaks[precision], f"datasheet {key}"
        return measured_matmul_tflops(precision), f"measured matmul on {name}"
    return measured_matmul_tflops(precision), "measured matmul on CPU"


def measured_matmul_tflops(precision: str, n: int = 1024, repeats: int = 5) -> float:
    """Best of a few square matmuls: a CPU has no datasheet peak, so MFU there is vs this."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def peak_memory_gb() -> float:
    """Peak accelerator memory, or this process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Rank 0 writes; other ranks construct it with enabled=False and every call is a no-op."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        *,
        enabled: bool,
        wandb_mode: str,
        project: str,
        total_steps: int,
        start_step: int,
        resumed: bool,
    ):
        self.enabled = enabled
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if self.file.tell() > 0 and not _ends_with_newline(run_dir / "metrics.jsonl"):
            self.file.write("\n")  # a kill mid-write cut the last line: keep it off the resumed run's first
        if wandb_mode != "off":
            self.wandb = _start_wandb(run_dir, config, wandb_mode, project, resumed)
        from tqdm import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=1.0,
            disable=os.environ.get("MAE_SCALE_NO_BAR") == "1",
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(wandb_values(metrics), step=step)
        if self.bar is not None and "loss" in metrics:  # not for event records (no loss yet: no "nan")
            loss, lr = metrics["loss"], metrics.get("lr", 0)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def info(self, message: str) -> None:
        """A line for the console and the log file (rank 0 only)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def wandb_values(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row; a dict of counts (bad_by_reason) becomes `bad_by_reason/REASON`."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            out[key] = value
    return out


def _start_wandb(run_dir: Path, config: dict, mode: str, project: str, resumed: bool):
    """wandb through its normal API; offline by default so a missing network never blocks or fails a run."""
    try:
        import wandb

        settings = wandb.Settings(init_timeout=90, silent=True)
        return wandb.init(
            project=project,
            dir=str(run_dir),
            config=config,
            mode=mode,
            name=run_dir.name,
            id=_wandb_id(run_dir),
            resume="allow" if resumed else None,
            settings=settings,
        )
    except Exception as e:  # a logging backend must never stop training
        print(f"[mae-scale] wandb disabled: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run folder, so a resumed run continues the same curves."""
    path = run_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    path.write_text(run_id)
    return run_id
