"""Process group set-up and the few collectives the loop needs (CPU: gloo; GPU: nccl)."""

from __future__ import annotations

import datetime
import os
import warnings

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int, int]:
    """Join the launcher's process group (or a group of one); returns (rank, local_rank, world)."""
    import deepspeed

    from mae_scale import hardware

    hardware.pin_extension_cache()
    # DeepSpeed's shared-memory all-reduce op serves only tensor-parallel inference
    # (`inference_all_reduce`); training collectives go through torch.distributed. Building it costs
    # about 30 s of g++ on first use and compiles vector code chosen by the building CPU (AVX-512 or
    # AVX2), so it is not built at all: one host-dependent binary less.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed's ZeRO-3 calls torch's deprecated collective names every step: keep the console readable.
    warnings.filterwarnings(
        "ignore",
        message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
        category=FutureWarning,
    )
    if "RANK" not in os.environ:  # plain `python -m mae_scale.pretrain`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    timeout = datetime.timedelta(minutes=float(os.environ.get("MAE_SCALE_DIST_TIMEOUT_MIN", "30")))
    deepspeed.init_distributed(
        dist_backend=_backend(), auto_mpi_discovery=False, verbose=False, timeout=timeout
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), local_rank, dist.get_world_size()


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """One small collective for several scalars (loss, flags): every rank gets the same answer."""
    t = torch.tensor(values, dtype=torch.float64, device=device() if _backend() == "nccl" else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst: int = 0) -> list:
    """Every rank's `obj` on rank `dst` (rank order), [] on the others: what only rank 0 logs needs
    O(ranks) bytes per call, not the O(ranks^2) of an all-gather."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out or []


def shutdown() -> None:
    """Barrier, then destroy the group: avoids gloo's occasional abort at exit (STACK-NOTES)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def seed_everything(seed: int, rank: int, step: int = 0) -> None:
    """Python, NumPy and torch RNGs from (seed, rank, step): masks differ across ranks, runs repeat.

    torch's default seed is random per process, so without this two identical runs draw different
    masks. A resume on the same world size restores the saved states instead (checkpoint.py).
    """
    import random

    import numpy as np

    mixed = (seed * 1_000_003 + rank * 7_919 + step) % 2**63
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)
