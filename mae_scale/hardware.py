"""What mae-scale reads off the host, in one place.

Behaviour that follows the machine (precision, worker counts, shared-memory room, where compiled
ops are cached) asks these functions instead of reading /proc or the environment itself, so tests
force every answer (tests/test_hardware.py) and every run and CI log says which machine it ran on
(`python -m mae_scale.hardware`). CUDA's presence is torch's own `torch.cuda.is_available()`,
which the tests force the same way.

Where behaviour follows the host, and how each place is kept safe (tests/test_hardware.py):
- parameter dtype: DeepSpeed's is_fp16/bf16_supported answers steer zero.Init and its engine;
  `engine.build_model` lets the config decide and `engine.check_dtypes` guards (forced both ways);
- `train.precision=auto`: CUDA bf16, else `amx_bf16` in the CPU flags (every branch forced);
- device, backend and MFU peak: CUDA or not (forced), a datasheet or a measured matmul;
- GPU or CPU in the shell scripts: `tools/host.sh` (run with a fake nvidia-smi and nproc);
- threads: the demo splits `nproc` (affinity-aware) between ranks; DataLoader workers run torch
  with 1 thread (torch's default there), PyAV and OpenCV with 1 (decode.py, transforms.py), so a
  worker is one core on any CPU; make_shards' default pool is `usable_cores() - 1`;
- DataLoader start method: fork on Linux, spawn on macOS, forkserver from Python 3.14: the loader
  is tested under all three; make_shards and verify_shards always spawn;
- shared memory: loader batches live in /dev/shm, checked against the node's need at start;
- compiled ops: DeepSpeed's shm_comm is not built (dist.py); cpu_adam is cached per instruction
  set (`pin_extension_cache`);
- kernels: torch picks AVX2 or AVX-512 code at run time, which moves float results in the last
  bits; no test compares against numbers recorded on another machine (exactness tests compare
  two runs on the same one).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

# Flags that change what runs fast or at all: bf16/fp16 matmul paths, DeepSpeed's vector kernels.
FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
SHM_PATH = "/dev/shm"


CPUINFO = "/proc/cpuinfo"


@functools.cache
def _cpuinfo(path: str = CPUINFO) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def usable_cores() -> int:
    """Cores this process may run on: the affinity mask (a container's or a job's), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def shm_free_bytes(path: str = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory file system loader batches live in; None where there is none."""
    try:
        st = os.statvfs(path)
    except (AttributeError, OSError):
        return None
    return st.f_bavail * st.f_frsize


def require_shared_memory(need: int, what: str, path: str = SHM_PATH) -> None:
    """Fail before any work when `path` cannot hold `need` bytes: otherwise a loader worker dies of
    SIGBUS at its first batch ("bus error ... insufficient shared memory"). Docker's default is 64 MB."""
    free = shm_free_bytes(path)
    if free is not None and need > free:
        raise HostError(
            f"{what} need about {need / 2**30:.2f} GiB of shared memory in {path}, which has "
            f"{free / 2**30:.2f} GiB free: enlarge it (docker run --shm-size=..., or a bigger tmpfs), "
            "or lower data.workers, train.batch_size, data.repeats or data.size"
        )


class HostError(RuntimeError):
    """This machine cannot run the configured job; the message says what is short and how to fix it."""


def accelerator_answers() -> dict[str, Any]:
    """DeepSpeed's accelerator and its capability answers, which DeepSpeed acts on by itself
    (zero.Init's parameter dtype, the engine's bf16 check). The CPU accelerator answers fp16 from
    oneDNN (`None`, not False, when it has none) and bf16 always True."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {
        "name": acc.device_name(),
        "fp16": acc.is_fp16_supported(),
        "bf16": acc.is_bf16_supported(),
    }


def isa_tag() -> str:
    """A short name for this CPU's instruction set: compiled ops built on one are not run on another."""
    flags = " ".join(sorted(cpu_flags()))
    digest = hashlib.blake2b(f"{platform.machine()} {flags}".encode(), digest_size=4).hexdigest()
    return f"{platform.machine()}-{digest}"


def pin_extension_cache() -> str:
    """Keep DeepSpeed's JIT-built CPU ops (cpu_adam for offload) in a folder per instruction set.

    They are compiled with -march=native and torch's cache reuses a build whatever CPU made it, so a
    home folder shared by nodes of different CPUs (common on clusters) would hand an AVX-512 build to
    an AVX2 node: an illegal instruction mid-run. A TORCH_EXTENSIONS_DIR the user set is kept.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"
        os.environ["TORCH_EXTENSIONS_DIR"] = str(base / isa_tag())
    return os.environ["TORCH_EXTENSIONS_DIR"]


def report() -> dict[str, Any]:
    """The host as it matters to mae-scale, for logs and the start record."""
    import torch

    flags = cpu_flags()
    out: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "flags": [f for f in FLAGS_OF_NOTE if f in flags],
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.is_available(),
        "shm_free_gb": None if (free := shm_free_bytes()) is None else round(free / 2**30, 1),
    }
    if out["cuda"]:
        out["gpu"] = torch.cuda.get_device_name()
        out["gpus"] = torch.cuda.device_count()
    try:
        out["deepspeed_accelerator"] = accelerator_answers()
    except Exception as exc:  # noqa: BLE001 - a report must not fail on a broken install
        out["deepspeed_accelerator"] = f"unavailable: {type(exc).__name__}: {exc}"
    return out


def main() -> int:
    from mae_scale.train.engine import auto_precision

    info = report()
    print(f"[hardware] cpu: {info['cpu']} ({info['cores']} usable cores)")
    print(f"[hardware] flags: {' '.join(info['flags']) or 'none of ' + ', '.join(FLAGS_OF_NOTE)}")
    torch_line = f"torch {info['torch']}, cpu capability {info['torch_cpu_capability']}, cuda={info['cuda']}"
    print(f"[hardware] {torch_line}")
    if info["cuda"]:
        print(f"[hardware] gpu: {info['gpu']} x{info['gpus']}")
    print(f"[hardware] deepspeed accelerator: {info['deepspeed_accelerator']}")
    print(f"[hardware] /dev/shm free: {info['shm_free_gb']} GiB; train.precision=auto -> {auto_precision()}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
