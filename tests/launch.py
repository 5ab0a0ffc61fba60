"""Helpers that start real training processes for the distributed tests (2 local ranks, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        MAE_SCALE_NO_BAR="1",
        PYTHONUNBUFFERED="1",
        WANDB_SILENT="true",
    )
    env.update(extra)
    return env


def torchrun_cmd(args: list[str], *, nproc: int = 2, entry=("-m", "mae_scale.pretrain")) -> list[str]:
    """`torchrun --standalone --nproc_per_node N ENTRY ARGS` (ENTRY: a module or a script)."""
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *entry, *args]


def torchrun(
    args: list[str], *, nproc: int = 2, timeout: float = 300, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m mae_scale.pretrain ARGS` from the repo root."""
    return run(torchrun_cmd(args, nproc=nproc), timeout=timeout, env=env, check=check)


def pretrain(args: list[str], *, timeout: float = 300, env: dict | None = None, check: bool = True):
    """One process, no launcher: `python -m mae_scale.pretrain ARGS`."""
    return run([sys.executable, "-m", "mae_scale.pretrain", *args], timeout=timeout, env=env, check=check)


def run(cmd: list[str], *, timeout: float, env: dict | None, check: bool) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-8000:]}"
        )
    return proc


def script_json(name: str, *args: str, timeout: float = 300) -> Any:
    """Run tests/scripts/NAME in one process (CPU env); the JSON of the last line it printed."""
    script = REPO / "tests" / "scripts" / name
    proc = run([sys.executable, str(script), *args], timeout=timeout, env=None, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Per-step losses; a resumed run re-logs steps after its checkpoint, and the later line counts."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}
