"""ViT building blocks with mae_st's parameter names (`attn.q/k/v/proj`, `mlp.fc1/fc2`, `norm1/2`).

Every constructor takes `device` so a model can be built on the meta device (parameter counts) or
directly where it will live; initialization is `mae_scale.model.mae.init_module_`'s job.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mae_scale.model.attention import attention, check_backend

LN_EPS = 1e-6  # mae_st's norm_layer = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Cut a clip into (t_patch, p, p) spacetime patches and project each one to a token."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        num_frames: int,
        t_patch_size: int,
        in_chans: int,
        embed_dim: int,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if img_size % patch_size or num_frames % t_patch_size:
            raise ValueError(
                f"clip {num_frames}x{img_size}x{img_size} does not tile into patches "
                f"{t_patch_size}x{patch_size}x{patch_size}: img_size must be a multiple of patch_size "
                "and num_frames a multiple of t_patch_size"
            )
        self.clip_shape = (in_chans, num_frames, img_size, img_size)
        self.grid = (num_frames // t_patch_size, img_size // patch_size, img_size // patch_size)  # (t, h, w)
        kernel = (t_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel, device=device)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        if tuple(imgs.shape[1:]) != self.clip_shape:
            raise ValueError(
                f"clips of shape (B, C, T, H, W) = {tuple(imgs.shape)} do not match the model's "
                f"(B, {', '.join(map(str, self.clip_shape))}): build the model with this size and frame count"
            )
        x = self.proj(imgs)  # (B, D, t, h, w)
        return rearrange(x, "b d t h w -> b (t h w) d")  # tokens in (t, h, w) order, as mae_st


class Attention(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, backend: str = "auto", device: torch.device | str | None = None
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = check_backend(backend)
        self.q = nn.Linear(dim, dim, device=device)
        self.k = nn.Linear(dim, dim, device=device)
        self.v = nn.Linear(dim, dim, device=device)
        self.proj = nn.Linear(dim, dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q = self.q(x).view(B, N, h, d)  # (B, N, heads, head_dim)
        k = self.k(x).view(B, N, h, d)
        v = self.v(x).view(B, N, h, d)
        x = attention(q, k, v, self.backend).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, device: torch.device | str | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        attention: str = "auto",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS, device=device)
        self.attn = Attention(dim, num_heads, attention, device=device)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS, device=device)
        # round, not int(): a ratio such as 6144 / 1408 must give 6144, not 6143.
        self.mlp = Mlp(dim, round(dim * mlp_ratio), device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
