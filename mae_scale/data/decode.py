"""PyAV decoding, in one place: open a video from memory, check it, decode only the frames asked for.

Frames are addressed by index in the stream's constant-rate time grid, computed from each frame's
pts (`frame_index`), never from the container's frame count, which lies often enough (PyAV #538).
A clip decode seeks by timestamp to the keyframe before the first wanted frame, decodes forward,
and converts only the wanted frames. Every container is opened in a `with` so decoder memory is
released at once (PyAV #1117), and FFmpeg runs single-threaded: parallelism comes from loader
worker processes, and codec threads inside forked workers are a known source of hangs.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from typing import TypeVar

import av
import numpy as np
from av.video.reformatter import VideoReformatter

T = TypeVar("T")


class BadVideo(Exception):
    """A video that cannot be used. `reason` is a short stable name, counted per reason by the loader."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoLimits:
    """Guards applied before and during decoding, so a crafted file cannot exhaust memory or time."""

    max_pixels: int = 4096 * 2160  # per frame, checked on the declared size before any decode
    min_side: int = 32  # smaller videos are useless for crops and usually broken
    timeout_s: float = 60.0  # wall time per video, checked after every decoded frame
    threads: int = 1  # FFmpeg codec threads; 1 is the safe choice inside worker processes


DEFAULT_LIMITS = VideoLimits()


@dataclass(frozen=True)
class VideoInfo:
    """What a full decode found: the facts written into each sample's json."""

    frames: int  # size of the frame index grid (= decoded frames for constant-rate video)
    fps: float
    width: int
    height: int
    codec: str

    @property
    def duration(self) -> float:
        return self.frames / self.fps


class RGBConverter:
    """Frame -> (H, W, 3) uint8 RGB at the source size, keeping one FFmpeg scaler per frame geometry.

    Measured here: `frame.to_ndarray(format="rgb24")` or one shared reformatter re-initializes the
    scaler whenever the frame size changes (up to ~8 ms each time); with a scaler per size the
    conversion costs ~0.03 ms for a 228 x 128 frame.
    """

    def __init__(self, max_scalers: int = 16):
        self.max_scalers = max_scalers
        self._scalers: dict[tuple, VideoReformatter] = {}

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        geometry = (frame.width, frame.height, frame.format.name)
        scaler = self._scalers.pop(geometry, None) or VideoReformatter()
        self._scalers[geometry] = scaler  # most recently used last
        if len(self._scalers) > self.max_scalers:
            del self._scalers[next(iter(self._scalers))]
        # threads=1: a threaded scaler's threads do not survive fork(), and a forked DataLoader worker
        # that frees an inherited one waits for them forever (pthread_cond_destroy); one worker is one
        # core anyway.
        return scaler.reformat(frame, format="rgb24", threads=1).to_ndarray()


def frame_index(pts: int, start: int, scale: Fraction) -> int:
    """Index of a frame in the stream's constant-rate grid: (pts - start) * time_base * rate, rounded.

    `scale` is time_base * rate; integer arithmetic, so indices are exact for any rational rate.
    """
    return (2 * (pts - start) * scale.numerator + scale.denominator) // (2 * scale.denominator)


def check_size(width: int, height: int, limits: VideoLimits) -> None:
    if width * height > limits.max_pixels:
        raise BadVideo("too_large", f"{width}x{height} exceeds max_pixels={limits.max_pixels}")
    if min(width, height) < limits.min_side:
        raise BadVideo("too_small", f"{width}x{height} is below min_side={limits.min_side}")


@contextmanager
def open_video(
    data: bytes, limits: VideoLimits
) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open encoded bytes and check the declared stream before anything is decoded."""
    if len(data) == 0:
        raise BadVideo("empty_video", "0 bytes")
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise BadVideo("undecodable", f"cannot open: {exc}") from exc
    with container:
        if not container.streams.video:
            raise BadVideo("no_video_stream", f"streams: {[s.type for s in container.streams]}")
        stream = container.streams.video[0]
        cc = stream.codec_context
        if cc.width and cc.height:  # 0 means unknown until the first frame; checked per frame below
            check_size(cc.width, cc.height, limits)
        cc.thread_count = limits.threads
        yield container, stream


def _rate(stream: av.VideoStream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate or rate <= 0:
        raise BadVideo("bad_fps", "stream has no frame rate")
    return Fraction(rate)


def _frames(
    container: av.container.InputContainer, stream: av.VideoStream, limits: VideoLimits, deadline: float
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decoded frames with their grid index, each checked for pts, size and the time limit."""
    start = stream.start_time or 0
    scale = stream.time_base * _rate(stream)
    try:
        for frame in container.decode(stream):
            if time.monotonic() > deadline:
                raise BadVideo("decode_timeout", f"over {limits.timeout_s:g} s")
            if frame.pts is None:
                raise BadVideo("no_pts", "decoded frame without a timestamp")
            check_size(frame.width, frame.height, limits)
            yield frame_index(frame.pts, start, scale), frame
    except av.FFmpegError as exc:
        raise BadVideo("undecodable", str(exc)) from exc


def probe(data: bytes, limits: VideoLimits = DEFAULT_LIMITS) -> VideoInfo:
    """Decode every frame (no pixel conversion) and return the true frame count, rate and size."""
    deadline = time.monotonic() + limits.timeout_s
    with open_video(data, limits) as (container, stream):
        last, width, height = -1, 0, 0
        for index, frame in _frames(container, stream, limits, deadline):
            last, width, height = max(last, index), frame.width, frame.height
        if last < 0:
            raise BadVideo("empty_video", "no frame decoded")
        return VideoInfo(last + 1, float(_rate(stream)), width, height, stream.codec_context.name)


def decode_frames(
    data: bytes, wanted: Sequence[int], convert: Callable[[av.VideoFrame], T], limits: VideoLimits
) -> list[T]:
    """Return `convert(frame)` for every index in `wanted` (ascending), decoding as little as possible.

    Seeks to the keyframe at or before the first wanted index and decodes forward, converting only
    wanted frames. Where the next wanted frame is more than a GOP ahead (measured between the
    keyframes seen), it seeks again instead of decoding through the gap. A wanted index that falls
    in a timestamp gap gets the frame shown at that time (the last one before it). If a seek lands
    after the wanted frame (a broken index), decoding restarts from the beginning and seeks no
    more. Raises `BadVideo` if the stream ends before the last wanted index: the sample's metadata
    does not match its video.
    """
    if not wanted or list(wanted) != sorted(wanted) or wanted[0] < 0:
        raise ValueError(
            f"wanted frame indices must be non-empty, ascending and >= 0, got {list(wanted)[:8]}"
        )
    deadline = time.monotonic() + limits.timeout_s
    with open_video(data, limits) as (container, stream):
        start, ticks_per_frame = stream.start_time or 0, 1 / (_rate(stream) * stream.time_base)

        def jump(index: int, old=None) -> Iterator[tuple[int, av.VideoFrame]]:
            if old is not None:
                old.close()
            container.seek(start + int(index * ticks_per_frame), stream=stream, backward=True)
            return _frames(container, stream, limits, deadline)

        frames = jump(wanted[0]) if wanted[0] > 0 else _frames(container, stream, limits, deadline)
        out: dict[int, T] = {}
        p = 0  # next wanted position
        prev: tuple[int, av.VideoFrame] | None = None  # last frame decoded since the last seek
        prev_out: T | None = None  # convert(prev frame), when it was converted
        can_seek, last_key, gop, jumped_from = wanted[0] > 0, None, None, -1
        while p < len(wanted):
            item = next(frames, None)
            if item is None:
                break
            index, frame = item
            if prev is None and index > wanted[p] and can_seek:
                can_seek = False  # the seek overshot: decode from the start, sequentially
                frames = jump(0, frames)
                continue
            if prev is None and index <= jumped_from:
                can_seek = False  # the seek went back instead of ahead: the index is not to be trusted
            if frame.key_frame:
                gop = index - last_key if last_key is not None and index > last_key else gop
                last_key = index
            while p < len(wanted) and wanted[p] < index and prev is not None:  # a gap: the held frame shows
                if prev_out is None:
                    prev_out = convert(prev[1])
                out[wanted[p]] = prev_out
                p += 1
            prev, prev_out = (index, frame), None
            if p < len(wanted) and wanted[p] <= index:
                prev_out = convert(frame)
                while p < len(wanted) and wanted[p] <= index:
                    out[wanted[p]] = prev_out
                    p += 1
            if p < len(wanted) and can_seek and gop and wanted[p] - index > gop:
                jumped_from, last_key = index, None  # cheaper to seek than to decode through the gap
                frames, prev, prev_out = jump(wanted[p], frames), None, None
        if p < len(wanted):
            last = prev[0] if prev else -1
            raise BadVideo("frames_mismatch", f"stream ends at frame {last}, frame {wanted[p]} was asked for")
        return [out[i] for i in wanted]
