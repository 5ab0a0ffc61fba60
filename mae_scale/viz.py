"""Reconstruction pictures: original / masked input / reconstruction, several frames per clip.

norm-pix predictions are un-normalized with each patch's own mean and std (taken from the target
patch), which is why reconstructions from other codebases often "look wrong" (PAINS: mae #185).
Every picture is labelled (which clip, step and mask; which row; which frame) and small frames are
enlarged by whole pixels, so a 16 px patch of a 64 px clip stays a sharp square.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mae_scale.model.patches import patchify, target_frame_indices, unpatchify

ROW_LABELS = ("original", "masked input", "reconstruction")
MIN_FRAME_PX = 128  # frames with a shorter side are enlarged (nearest neighbour) to at least this
FONT_PX = 13
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
PAD = 4  # pixels around text and between clips
GAP = 2  # pixels between frames


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


@dataclass(frozen=True)
class Layout:
    """Where each part of a labelled picture goes, in output pixels; boxes are (x0, y0, x1, y1).

    Per clip, top to bottom: a header line, the frame indices, then the three rows of frames with
    their labels in a column on the left. Frames are GAP apart, clips PAD apart.
    """

    clips: int
    frames: int
    frame_h: int  # one frame as drawn (enlarged)
    frame_w: int
    label_w: int
    text_h: int

    @property
    def clip_h(self) -> int:
        return 2 * self.text_h + len(ROW_LABELS) * (self.frame_h + GAP)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the picture."""
        return self.label_w + self.frames * (self.frame_w + GAP), self.clips * (self.clip_h + PAD) - PAD

    def top(self, clip: int) -> int:
        return clip * (self.clip_h + PAD)

    def header_box(self, clip: int) -> tuple[int, int, int, int]:
        return 0, self.top(clip), self.size[0], self.top(clip) + self.text_h

    def index_box(self, clip: int, frame: int) -> tuple[int, int, int, int]:
        x, y = self.label_w + frame * (self.frame_w + GAP), self.top(clip) + self.text_h
        return x, y, x + self.frame_w, y + self.text_h

    def label_box(self, clip: int, row: int) -> tuple[int, int, int, int]:
        y = self.top(clip) + 2 * self.text_h + row * (self.frame_h + GAP)
        return 0, y, self.label_w, y + self.frame_h

    def frame_box(self, clip: int, row: int, frame: int) -> tuple[int, int, int, int]:
        x = self.label_w + frame * (self.frame_w + GAP)
        y = self.top(clip) + 2 * self.text_h + row * (self.frame_h + GAP)
        return x, y, x + self.frame_w, y + self.frame_h


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=FONT_PX)  # Pillow's bundled font: no system fonts needed


def layout_for(clips: int, frames: int, height: int, width: int) -> Layout:
    """The layout of `clips` clips of `frames` frames of height x width pixels (before enlarging)."""
    scale = max(1, math.ceil(MIN_FRAME_PX / min(height, width)))
    font = _font()
    label_w = math.ceil(max(font.getlength(label) for label in ROW_LABELS)) + 2 * PAD
    text_h = FONT_PX + 2 * PAD
    return Layout(clips, frames, height * scale, width * scale, label_w, text_h)


def label_grid(
    grid: np.ndarray, *, headers: list[str], frames: list[int], frame_hw: tuple[int, int]
) -> np.ndarray:
    """Draw `reconstruction_grid`'s output with labels: `headers` (one per clip) and `frames` (the
    clip frame index of each column); `frame_hw`: one frame's (height, width) in `grid`."""
    from PIL import Image, ImageDraw

    height, width = frame_hw
    clips = grid.shape[0] // (len(ROW_LABELS) * height)
    if len(headers) != clips or len(frames) * width != grid.shape[1]:
        raise ValueError(
            f"grid {grid.shape} holds {clips} clips of {grid.shape[1] // width} frames; "
            f"got {len(headers)} headers and {len(frames)} frame indices"
        )
    layout = layout_for(clips, len(frames), height, width)
    scale = layout.frame_h // height
    picture = Image.new("RGB", layout.size, BACKGROUND)
    draw, font = ImageDraw.Draw(picture), _font()
    for c in range(clips):
        draw.text((PAD, layout.header_box(c)[1] + PAD), headers[c], fill=INK, font=font)
        for f, index in enumerate(frames):
            x0, y0, x1, _ = layout.index_box(c, f)
            draw.text(((x0 + x1) // 2, y0 + PAD), f"frame {index}", fill=INK, font=font, anchor="mt")
        for r, label in enumerate(ROW_LABELS):
            _, y0, _, y1 = layout.label_box(c, r)
            draw.text((PAD, (y0 + y1) // 2), label, fill=INK, font=font, anchor="lm")
            y = (c * len(ROW_LABELS) + r) * height
            for f in range(len(frames)):
                frame = grid[y : y + height, f * width : (f + 1) * width]
                enlarged = frame.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest: sharp patches
                picture.paste(Image.fromarray(enlarged), layout.frame_box(c, r, f)[:2])
    return np.asarray(picture)


def clip_headers(keys: list[str], step: int | None, mask_type: str, mask_ratio: float) -> list[str]:
    """One line per clip: its sample key (and which of the key's repeated clips), step and mask."""
    headers, seen = [], {}
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        repeat = f" (clip {seen[key]})" if keys.count(key) > 1 else ""
        at = f"step {step}" if step is not None else "untrained"
        headers.append(f"{key}{repeat}  |  {at}  |  mask {mask_type} {mask_ratio:.2f}")
    return headers


def save_png(array: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
    return path


@torch.no_grad()
def reconstruction_picture(
    model: torch.nn.Module, imgs: torch.Tensor, cfg, *, keys: list[str], step: int | None, seed: int = 0
) -> np.ndarray:
    """The labelled picture of normalized clips `imgs` (at most 4) under a seeded mask; the one
    function behind the end-of-run picture, `log.image_every_steps` and tools/visualize.py.
    Collective under ZeRO-3 (every rank runs the forward). The decoder runs without its own mask
    (`decoder_mask_ratio=0`), so every patch is reconstructed also for a model trained with dual
    masking."""
    from mae_scale.train.engine import model_kwargs

    kwargs = model_kwargs(cfg)
    imgs = imgs[:4]
    was_training = model.training
    model.eval()
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    _, pred, mask = model(imgs, decoder_mask_ratio=0.0)
    torch.random.set_rng_state(gen_state)
    model.train(was_training)
    grid = reconstruction_grid(
        imgs,
        pred,
        mask,
        patch_size=kwargs["patch_size"],
        t_patch_size=kwargs["t_patch_size"],
        pred_t_dim=kwargs["pred_t_dim"],
        norm_pix_loss=kwargs["norm_pix_loss"],
        mean=cfg.data.mean,
        std=cfg.data.std,
    )
    _, _, T, H, W = imgs.shape
    return label_grid(
        grid,
        headers=clip_headers(list(keys[: len(imgs)]), step, cfg.model.mask_type, cfg.model.mask_ratio),
        frames=target_frame_indices(T, kwargs["pred_t_dim"]).tolist(),
        frame_hw=(H, W),
    )


def save_training_reconstruction(
    cfg, built, clips_uint8: torch.Tensor, keys: list[str], step: int, *, rank: int, path: Path | None = None
) -> Path | None:
    """Every rank runs the forward (ZeRO-3 gathers collectively), rank 0 writes `path`."""
    from mae_scale.train.batch import normalize_clips
    from mae_scale.train.engine import PRECISION_DTYPES

    dtype = PRECISION_DTYPES[built.precision]
    imgs = normalize_clips(clips_uint8[:4], cfg.data.mean, cfg.data.std, dtype)
    picture = reconstruction_picture(built.engine.module, imgs, cfg, keys=keys, step=step, seed=cfg.seed)
    if rank != 0:
        return None
    return save_png(picture, path or cfg.run_dir / "reconstruction.png")
