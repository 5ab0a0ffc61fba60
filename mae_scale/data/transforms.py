"""Clip sampling and spatial augmentation, as pure functions of a seeded `random.Random`.

A video yields R clips ("repeated sampling", MAE-ST). By default all R share one start
(`repeat_span="clip"`): one window is decoded for R clips, so the decode is paid once, our reading
of DESIGN.md section 1 ("seek to the clip, decode only what is needed"). "video" draws R independent
starts, as mae_st does; mae_st decodes whole videos, we seek, so R=4 decodes the union of four
windows (1.5-2x one window on our bench) and gives about 2x the clips/s of R=1, not 3.5x. Each
clip is T frames at a stride, with its own random resized crop and flip. Pixels stay uint8
`(C, T, H, W)`: normalization happens on the accelerator, which moves 4x fewer bytes to the device.
Clips are laid out in memory as (T, H, W, C) (`torch.channels_last_3d`): that is how decoded frames
and the resize lay out pixels, so no transposing copy is made on the host (measured: it cost as
much as the resize itself at 224 px); use `.reshape`/einops rather than `.view` on them, or
`.contiguous()` on the device.

The resize is OpenCV's, frame by frame, straight from the crop into the batch: measured 1.5-2.4x
faster than torch's antialiased uint8 kernel with the copies that one needs (`BENCHMARKS.md`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from mae_scale.data.decode import BadVideo

# One thread: parallelism comes from loader worker processes (one core each); OpenCV's own pool would
# start a thread per core in every worker and oversubscribe the machine.
cv2.setNumThreads(1)

SHORT_VIDEO_POLICIES = ("stride", "loop", "skip")
REPEAT_SPANS = ("video", "clip")


@dataclass(frozen=True)
class ClipSpec:
    num_frames: int = 16  # T
    stride: int = 4  # temporal sampling stride in frames
    size: int = 224  # output side in pixels
    repeats: int = 4  # R clips per decoded video
    crop_scale: tuple[float, float] = (0.5, 1.0)  # relative area of the random resized crop
    crop_aspect: tuple[float, float] = (0.75, 1.3333)  # aspect ratio range (w / h)
    flip: bool = True
    short_video: str = "stride"  # fewer frames than a clip needs: smaller stride | loop | skip
    repeat_span: str = "clip"  # R crops of one decoded window | "video": R independent times (mae_st)

    def __post_init__(self):
        errors = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("num_frames", "stride", "size", "repeats")
            if getattr(self, name) < 1
        ]
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            errors.append(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        lo, hi = self.crop_aspect
        if not 0 < lo <= hi:
            errors.append(f"crop_aspect must satisfy 0 < lo <= hi, got {self.crop_aspect}")
        if self.short_video not in SHORT_VIDEO_POLICIES:
            errors.append(f"short_video must be one of {SHORT_VIDEO_POLICIES}, got {self.short_video!r}")
        if self.repeat_span not in REPEAT_SPANS:
            errors.append(f"repeat_span must be one of {REPEAT_SPANS}, got {self.repeat_span!r}")
        if errors:
            raise ValueError("bad clip settings (data.*): " + "; ".join(errors))

    @property
    def span(self) -> int:
        """Frames covered by one clip at the configured stride."""
        return (self.num_frames - 1) * self.stride + 1


def plan_clips(
    num_video_frames: int, spec: ClipSpec, rng: random.Random
) -> tuple[list[list[int]], str | None]:
    """Frame indices of R clips, and a note if the short-video policy applied ("short_stride", "short_loop").

    A video shorter than one clip is handled by `spec.short_video`: `stride` takes the largest
    stride that fits (and gives up when even stride 1 does not), `loop` wraps indices around the
    end, `skip` rejects the video. Rejections raise `BadVideo("too_few_frames")`. With
    `repeat_span="clip"` one start is drawn and all R clips share its frames.
    """
    n, t = num_video_frames, spec.num_frames
    draws = spec.repeats if spec.repeat_span == "video" else 1
    stride, note = spec.stride, None
    if n < spec.span:
        if spec.short_video == "loop":
            starts = [rng.randrange(n) for _ in range(draws)] * (spec.repeats // draws)
            return [[(s + i * stride) % n for i in range(t)] for s in starts], "short_loop"
        if spec.short_video == "skip" or n < t:
            raise BadVideo(
                "too_few_frames", f"{n} frames, a clip of {t} at stride {stride} needs {spec.span}"
            )
        stride, note = (n - 1) // (t - 1), "short_stride"
    span = (t - 1) * stride + 1
    starts = [rng.randint(0, n - span) for _ in range(draws)] * (spec.repeats // draws)
    return [list(range(s, s + span, stride)) for s in starts], note


def random_resized_crop(
    height: int, width: int, scale: tuple[float, float], aspect: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """A box (top, left, h, w) covering a random share of the area with a random aspect ratio.

    Ten tries to fit a box drawn with area in `scale` and log-uniform aspect in `aspect`; if none
    fits, the largest centered box whose aspect is within range.
    """
    area = height * width
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = min(max(width / height, aspect[0]), aspect[1])
    w, h = (width, round(width / ratio)) if width / height <= ratio else (round(height * ratio), height)
    w, h = min(w, width), min(h, height)
    return (height - h) // 2, (width - w) // 2, h, w


def resize_frame(src: np.ndarray, size: int, dst: np.ndarray, flip: bool = False) -> None:
    """Resize one uint8 (h, w, C) frame into `dst` (size, size, C), antialiased; mirror it if `flip`.

    Plain bilinear interpolation (what mae_st and VideoMAE use) reads every source pixel only while it
    shrinks by at most 2x. A larger shrink is first halved along each axis that needs it with an
    exact 2x box filter (OpenCV's integer-factor area path; an odd last row or column is dropped)
    until it is within 2x, so detail too fine for the output averages out instead of aliasing.
    """
    while src.shape[0] > 2 * size or src.shape[1] > 2 * size:
        fy, fx = (2 if side > 2 * size else 1 for side in src.shape[:2])
        h, w = src.shape[0] // fy, src.shape[1] // fx
        src = cv2.resize(src[: h * fy, : w * fx], (w, h), interpolation=cv2.INTER_AREA)
    cv2.resize(src, (size, size), dst=dst, interpolation=cv2.INTER_LINEAR)
    if flip:
        cv2.flip(dst, 1, dst=dst)


def empty_clips(n: int, spec: ClipSpec, shared: bool = False) -> torch.Tensor:
    """Uninitialized uint8 (n, C, T, size, size) clips, channels-last: (n, T, size, size, C) in memory.

    `shared`: allocated in shared memory right away (as DataLoader's own collate does in a worker),
    so that handing the batch to the main process copies nothing.
    """
    shape = (n, spec.num_frames, spec.size, spec.size, 3)  # (n, T, H, W, C)
    if not shared:
        return torch.empty(shape, dtype=torch.uint8).permute(0, 4, 1, 2, 3)
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape).permute(0, 4, 1, 2, 3)


def clip_pixels(clips: torch.Tensor, name: str = "clips") -> torch.Tensor:
    """The (n, T, H, W, C) view of uint8 (n, C, T, H, W) clips laid out as `empty_clips` makes them:
    their memory in order, for code that writes or maps it directly. Any other layout is refused,
    since such code would misread it."""
    if clips.dtype != torch.uint8 or clips.dim() != 5 or not clips.permute(0, 2, 3, 4, 1).is_contiguous():
        raise ValueError(
            f"{name} must be channels-last uint8 (n, C, T, H, W) as empty_clips makes it, got "
            f"{clips.dtype} {tuple(clips.shape)} with strides {clips.stride()}"
        )
    return clips.permute(0, 2, 3, 4, 1)


def make_clips(
    frames: Sequence[np.ndarray],
    clips: list[list[int]],
    spec: ClipSpec,
    rng: random.Random,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """R augmented clips from decoded (H, W, C) frames, given in the order of sorted(set(indices)).

    Each frame's crop is resized straight into its place in `out`, with no intermediate copy.
    Returns uint8 (R, C, T, size, size): `out` when given (a slice of the batch, channels-last as
    `empty_clips` makes it), else a new tensor.
    """
    position = {index: i for i, index in enumerate(sorted({i for clip in clips for i in clip}))}
    height, width = frames[0].shape[:2]
    if out is None:
        out = empty_clips(len(clips), spec)
    pixels = clip_pixels(out, "out").numpy()  # (R, T, size, size, C): out's memory, not a copy
    if pixels.shape != (len(clips), spec.num_frames, spec.size, spec.size, 3):
        raise ValueError(
            f"out must hold {len(clips)} clips of {spec.num_frames} x {spec.size} x {spec.size}, "
            f"got {tuple(out.shape)}"
        )
    for r, clip in enumerate(clips):
        top, left, h, w = random_resized_crop(height, width, spec.crop_scale, spec.crop_aspect, rng)
        flip = spec.flip and rng.random() < 0.5
        for t, i in enumerate(clip):
            resize_frame(frames[position[i]][top : top + h, left : left + w], spec.size, pixels[r, t], flip)
    return out
