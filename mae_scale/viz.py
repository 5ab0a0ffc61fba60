"""Reconstruction pictures: original / masked input / reconstruction, several frames per clip.

norm-pix predictions are un-normalized with each patch's own mean and std (taken from the target
patch), which is why reconstructions from other codebases often "look wrong" (PAINS: mae #185).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mae_scale.model.patches import patchify, target_frame_indices, unpatchify


def reconstruction_grid(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    *,
    patch_size: int,
    t_patch_size: int,
    pred_t_dim: int,
    norm_pix_loss: bool,
    mean,
    std,
    max_clips: int = 4,
) -> np.ndarray:
    """imgs: normalized (B, C, T, H, W); pred: (B, N, u*p*p*C); mask: (B, N), 1 = masked.

    Returns uint8 (rows*H, pred_t_dim*W, 3): per clip three rows (original, masked, reconstruction).
    """
    imgs, pred, mask = (
        imgs[:max_clips].float().cpu(),
        pred[:max_clips].float().cpu(),
        mask[:max_clips].float().cpu(),
    )
    B, C, T, H, W = imgs.shape
    u = t_patch_size * pred_t_dim // T  # frames per token in the target
    target = imgs.index_select(2, target_frame_indices(T, pred_t_dim))  # (B, C, pred_t_dim, H, W)
    target_patches = patchify(target, patch_size, u)  # (B, N, u*p*p*C)
    if norm_pix_loss:  # back to pixels with each patch's own statistics
        mu = target_patches.mean(dim=-1, keepdim=True)
        var = target_patches.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mu
    grid = (pred_t_dim // u, H // patch_size, W // patch_size)
    m = mask.unsqueeze(-1)  # (B, N, 1)
    masked = unpatchify(target_patches * (1 - m), grid, patch_size, u)
    recon = unpatchify(target_patches * (1 - m) + pred * m, grid, patch_size, u)
    rows = []
    for b in range(B):
        for video in (target[b], masked[b], recon[b]):  # (C, pred_t_dim, H, W)
            rows.append(torch.cat(list(video.unbind(1)), dim=2))  # (C, H, pred_t_dim*W)
    picture = torch.cat(rows, dim=1)  # (C, rows*H, pred_t_dim*W)
    picture = picture * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (picture.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
    return path


@torch.no_grad()
def reconstruct(
    model: torch.nn.Module, imgs: torch.Tensor, kwargs: dict, mean, std, seed: int = 0
) -> np.ndarray:
    """Run `model` on normalized clips with a seeded mask and draw the grid (collective under ZeRO-3).

    The decoder runs without its own mask (`decoder_mask_ratio=0`), so every patch is reconstructed
    also for a model trained with dual masking.
    """
    was_training = model.training
    model.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    _, pred, mask = model(imgs, decoder_mask_ratio=0.0)
    torch.random.set_rng_state(gen_state)
    model.train(was_training)
    return reconstruction_grid(
        imgs,
        pred,
        mask,
        patch_size=kwargs["patch_size"],
        t_patch_size=kwargs["t_patch_size"],
        pred_t_dim=kwargs["pred_t_dim"],
        norm_pix_loss=kwargs["norm_pix_loss"],
        mean=mean,
        std=std,
    )


def save_training_reconstruction(
    cfg, built, clips_uint8: torch.Tensor, *, rank: int, path: Path | None = None
) -> Path | None:
    """Every rank runs the forward (ZeRO-3 gathers collectively), rank 0 writes `path`."""
    from mae_scale.train.engine import model_kwargs
    from mae_scale.train.loop import normalize_clips

    dtype = torch.bfloat16 if built.precision == "bf16" else torch.float32
    imgs = normalize_clips(clips_uint8[:4], cfg.data.mean, cfg.data.std, dtype)
    picture = reconstruct(
        built.engine.module, imgs, model_kwargs(cfg), cfg.data.mean, cfg.data.std, seed=cfg.seed
    )
    if rank != 0:
        return None
    return save_png(picture, path or cfg.run_dir / "reconstruction.png")
