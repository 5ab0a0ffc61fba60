"""Scaled dot-product attention with selectable kernels.

- `xformers`: `xformers.ops.memory_efficient_attention`, only when xformers imports and the tensors
  are on CUDA (its CPU path raises NotImplementedError, and a mismatched wheel can break torch);
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient / math
  kernels chosen by PyTorch);
- `math`: softmax(Q K^T / sqrt(d)) V written out, the readable reference for tests;
- `auto`: xformers when it is usable for the tensors' device, else sdpa.

All backends take and return the (B, N, heads, head_dim) layout that the q/k/v projections give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "xformers", "sdpa", "math")


_XFORMERS_ERROR: list[str | None] = []  # filled once: [None] if xformers imports, else [why not]


def _xformers_import_error() -> str | None:
    """None when xformers' attention imports, else why not (tried once per process)."""
    if not _XFORMERS_ERROR:
        try:
            import xformers.ops  # noqa: F401

            _XFORMERS_ERROR.append(None)
        except Exception as err:  # a wheel built for another torch raises more than ImportError
            _XFORMERS_ERROR.append(f"{type(err).__name__}: {err}")
    return _XFORMERS_ERROR[0]


def xformers_available() -> bool:
    return _xformers_import_error() is None


def check_backend(name: str) -> str:
    """Validate a requested backend name early (at model build), so a typo fails before any work."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(BACKENDS)}")
    if name == "xformers" and not xformers_available():
        raise ImportError(
            f"attention='xformers' but xformers cannot be imported ({_xformers_import_error()}); "
            "install the xformers wheel built for this torch, or use attention='sdpa'"
        )
    return name


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The kernel that `name` runs on tensors of `device`: what the trainer logs at start."""
    check_backend(name)
    on_cuda = torch.device(device).type == "cuda"
    if name == "auto":
        return "xformers" if on_cuda and xformers_available() else "sdpa"
    if name == "xformers" and not on_cuda:
        raise RuntimeError(
            f"attention='xformers' needs CUDA tensors, got device {torch.device(device)}: "
            "xformers' memory_efficient_attention has no CPU kernel; use attention='sdpa' or 'auto'"
        )
    return name


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V; q, k, v: (B, N, heads, d) -> (B, N, heads, d)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale  # (B, heads, N, N)
    weights = scores.softmax(dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", weights, v)  # (B, N, heads, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention without masking or dropout; q, k, v: (B, N, heads, d) -> (B, N, heads, d)."""
    kernel = resolve_backend(backend, q.device)
    if kernel == "math":
        return math_attention(q, k, v)
    if kernel == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)  # (B, heads, N, d) -> (B, N, heads, d)
    import xformers.ops as xops

    return xops.memory_efficient_attention(q, k, v)  # its native layout is (B, N, heads, d)
