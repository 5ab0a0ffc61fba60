"""The host-to-device batch path, one home for the trainer, the pictures and the tools.

The loader hands out uint8 clips (4x fewer bytes to copy than float32); they are moved to the
accelerator as they are and normalized there.
"""

from __future__ import annotations

import torch

from mae_scale.train import dist as D


def normalize_clips(clips: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, C, T, H, W) -> (x / 255 - mean) / std per channel, as `dtype` on the accelerator."""
    x = clips.to(D.device(), non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1, 1)
    return ((x - m) / s).to(dtype)
