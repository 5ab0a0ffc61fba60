"""Pixels <-> patch vectors, pure functions (the grid is an argument, never state on a module).

The pixel order inside a patch vector is (u, p, q, c): frame in the patch, row, column, channel;
patches are in (t, h, w) order. This is mae_st's `einsum("nctuhpwq->nthwupqc")`, so a mae_st
checkpoint's `decoder_pred` rows mean the same pixels here.
"""

from __future__ import annotations

import torch
from einops import rearrange


def patchify(imgs: torch.Tensor, patch_size: int, t_patch: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, t*h*w, u*p*p*C) with u = t_patch, t = T / u, h = H / p, w = W / p."""
    B, C, T, H, W = imgs.shape
    p, u = patch_size, t_patch
    if T % u or H % p or W % p:
        raise ValueError(f"clip (C, T, H, W) = {(C, T, H, W)} does not tile into {u}x{p}x{p} patches")
    return rearrange(imgs, "b c (t u) (h p) (w q) -> b (t h w) (u p q c)", u=u, p=p, q=p)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch_size: int, t_patch: int) -> torch.Tensor:
    """(B, t*h*w, u*p*p*C) -> (B, C, t*u, h*p, w*p); `grid` = (t, h, w), the inverse of `patchify`."""
    t, h, w = grid
    p, u = patch_size, t_patch
    if x.shape[1] != t * h * w or x.shape[2] % (u * p * p):
        raise ValueError(
            f"patch vectors of shape {tuple(x.shape)} do not fit the grid {grid} of {u}x{p}x{p} patches"
        )
    return rearrange(x, "b (t h w) (u p q c) -> b c (t u) (h p) (w q)", t=t, h=h, w=w, u=u, p=p, q=p)


def target_frame_indices(num_frames: int, pred_t_dim: int) -> torch.Tensor:
    """The frames the decoder predicts: `linspace(0, T - 1, pred_t_dim)` truncated, as mae_st.

    For T = 16, pred_t_dim = 8: frames 0, 2, 4, 6, 8, 10, 12, 15. Computed in float32 on the CPU so
    every device and default dtype picks the same frames.
    """
    return torch.linspace(0, num_frames - 1, pred_t_dim, dtype=torch.float32).long()
