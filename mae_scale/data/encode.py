"""PyAV encoding for the shard writer: re-encode a video small and seekable, or encode raw frames.

Re-encoding makes shards smaller and faster to decode: a capped short side, an optional new frame
rate (nearest-frame resampling), H.264 with a short GOP so that seeking to a clip decodes few
frames. The encoder runs single-threaded so that output bytes are deterministic (the shard writer
relies on that for resume) and parallelism comes from worker processes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from mae_scale.data.decode import DEFAULT_LIMITS, BadVideo, VideoInfo, VideoLimits, _frames, _rate, open_video


@dataclass(frozen=True)
class EncodeOptions:
    """How `make_shards.py` re-encodes: the defaults give small, quickly seekable H.264."""

    max_short_side: int | None = 320  # downscale so the short side is at most this (None: keep)
    fps: float | None = None  # new constant frame rate (None: keep the source rate)
    gop: int = 16  # keyframe interval in frames: a seek decodes at most gop - 1 extra frames
    codec: str = "libx264"  # any PyAV encoder; libx264 (H.264) or mpeg4 are safe choices
    crf: int = 23  # x264 quality (lower is better, larger)
    preset: str = "veryfast"  # x264 speed/size trade-off


def output_size(width: int, height: int, max_short_side: int | None) -> tuple[int, int]:
    """Size after capping the short side, rounded to even numbers (4:2:0 chroma needs them)."""
    scale = 1.0
    if max_short_side is not None and min(width, height) > max_short_side:
        scale = max_short_side / min(width, height)
    return max(2, int(width * scale / 2 + 0.5) * 2), max(2, int(height * scale / 2 + 0.5) * 2)


def _open_encoder(out: io.BytesIO, width: int, height: int, rate: Fraction, opts: EncodeOptions):
    container = av.open(out, mode="w", format="mp4")
    stream = container.add_stream(opts.codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = opts.gop
    stream.codec_context.thread_count = 1
    if opts.codec == "libx264":
        stream.options = {"crf": str(opts.crf), "preset": opts.preset}
    elif opts.codec == "mpeg4":
        stream.options = {"qscale": "4"}
    return container, stream


def _encode(frames: Iterable[av.VideoFrame], width: int, height: int, rate: Fraction, opts: EncodeOptions):
    """Encode frames (pts set by the caller) into mp4 bytes; returns (bytes, frames encoded)."""
    out = io.BytesIO()
    count = 0
    container, stream = _open_encoder(out, width, height, rate, opts)
    with container:
        for frame in frames:
            container.mux(stream.encode(frame))
            count += 1
        container.mux(stream.encode(None))
    return out.getvalue(), count


def encode_rgb_frames(
    frames: Iterable[np.ndarray], fps: float = 25.0, opts: EncodeOptions | None = None
) -> bytes:
    """Encode (H, W, 3) uint8 RGB arrays as an mp4 at a constant rate (used for synthetic test data)."""
    opts = opts or EncodeOptions(max_short_side=None)
    frames = list(frames)
    if not frames:
        raise ValueError("encode_rgb_frames needs at least one frame")
    height, width = frames[0].shape[:2]
    rate = Fraction(fps).limit_denominator(1001)

    def video_frames() -> Iterator[av.VideoFrame]:
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, 1 / rate
            yield frame

    data, _ = _encode(video_frames(), width, height, rate, opts)
    return data


def transcode(
    data: bytes, opts: EncodeOptions, limits: VideoLimits = DEFAULT_LIMITS
) -> tuple[bytes, VideoInfo]:
    """Re-encode a video; returns the new bytes and their facts (frames counted as they are encoded).

    Output frame k (time k / rate) shows the source frame nearest in time, so a new rate drops or
    repeats frames evenly and a variable-rate source comes out constant-rate.
    """
    deadline = time.monotonic() + limits.timeout_s
    with open_video(data, limits) as (container, stream):
        src_rate, tb = _rate(stream), stream.time_base
        start = stream.start_time or 0
        rate = Fraction(opts.fps).limit_denominator(1001) if opts.fps else src_rate
        cc = stream.codec_context
        if not (cc.width and cc.height):
            raise BadVideo("undecodable", "stream declares no frame size")
        width, height = output_size(cc.width, cc.height, opts.max_short_side)

        def resampled() -> Iterator[av.VideoFrame]:
            k, prev, prev_t = 0, None, None
            for _, frame in _frames(container, stream, limits, deadline):
                t = (frame.pts - start) * tb
                if prev is not None:
                    while Fraction(k) / rate < (prev_t + t) / 2:  # nearest source frame wins
                        yield _out_frame(prev, k, rate, width, height)
                        k += 1
                prev, prev_t = frame, t
            if prev is not None:
                while Fraction(k) / rate < prev_t + 1 / src_rate - 1 / (2 * rate):
                    yield _out_frame(prev, k, rate, width, height)
                    k += 1

        out, frames = _encode(resampled(), width, height, rate, opts)
    if frames == 0:
        raise BadVideo("empty_video", "no frame decoded")
    return out, VideoInfo(frames, float(rate), width, height, opts.codec)


def _out_frame(frame: av.VideoFrame, k: int, rate: Fraction, width: int, height: int) -> av.VideoFrame:
    out = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
    out.pts, out.time_base = k, 1 / rate
    return out
