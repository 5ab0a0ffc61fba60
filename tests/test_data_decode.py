"""PyAV decoding, encoding and clip sampling: golden frames, guards, policies."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mae_scale.data.decode import BadVideo, VideoLimits, decode_frames, open_video, probe
from mae_scale.data.encode import EncodeOptions, output_size, transcode
from mae_scale.data.transforms import (
    ClipSpec,
    make_clips,
    plan_clips,
    random_resized_crop,
    resize_frame,
)

LIMITS = VideoLimits()


def rgb(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
@pytest.mark.parametrize("gop", [8, 300])  # short GOP: seeks land near; long GOP: decode from frame 0
def test_golden_frames_after_seek(index_video, read_frame_index, codec, gop):
    data = index_video(frames=60, codec=codec, gop=gop)
    assert probe(data).frames == 60
    for wanted in (
        [0, 4, 8, 12],
        [21, 25, 29, 33, 37],
        [50, 59],
        [3, 10, 17],
        [59],
        [2, 40, 55],
        [5, 6, 30, 31, 58],
    ):
        got = [read_frame_index(f) for f in decode_frames(data, wanted, rgb, LIMITS)]
        assert got == wanted, f"{codec} gop {gop}: asked {wanted}, got {got}"


def test_duplicate_wanted_frames_decoded_once(index_video, read_frame_index):
    data = index_video(frames=20)
    calls = []
    frames = decode_frames(data, [2, 2, 5, 9, 9, 9], lambda f: calls.append(1) or rgb(f), LIMITS)
    assert [read_frame_index(f) for f in frames] == [2, 2, 5, 9, 9, 9] and len(calls) == 3


def test_frames_past_the_end_are_a_named_fault(index_video):
    data = index_video(frames=20)
    with pytest.raises(BadVideo) as err:
        decode_frames(data, [10, 25], rgb, LIMITS)
    assert err.value.reason == "frames_mismatch"


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty_video"), (b"\x00garbage" * 100, "undecodable")],
)
def test_unusable_bytes(data, reason):
    with pytest.raises(BadVideo) as err:
        probe(data)
    assert err.value.reason == reason


def test_size_guard_before_any_decode(index_video):
    data = index_video(frames=5, width=128, height=96)
    with pytest.raises(BadVideo) as err:  # open_video checks the declared size; it decodes nothing
        with open_video(data, VideoLimits(max_pixels=100 * 100)):
            pass
    assert err.value.reason == "too_large" and "128x96" in err.value.detail
    with pytest.raises(BadVideo) as err:
        with open_video(data, VideoLimits(min_side=100)):
            pass
    assert err.value.reason == "too_small"


def test_transcode_keeps_frames_and_resamples(index_video, read_frame_index):
    data = index_video(frames=50, fps=25.0, width=128, height=96)
    same, info = transcode(data, EncodeOptions(max_short_side=48, gop=4))
    assert (info.frames, info.width, info.height, info.fps) == (50, 64, 48, 25.0)
    assert probe(same).frames == 50
    got = [read_frame_index(f) for f in decode_frames(same, [0, 17, 49], rgb, LIMITS)]
    assert got == [0, 17, 49]
    half, info = transcode(data, EncodeOptions(max_short_side=None, fps=12.5))
    assert info.frames == 25 and probe(half).frames == 25
    got = [read_frame_index(f) for f in decode_frames(half, list(range(25)), rgb, LIMITS)]
    assert got == list(range(0, 50, 2))  # nearest source frame in time


def test_output_size_even_and_capped():
    assert output_size(1280, 720, 128) == (228, 128)
    assert output_size(176, 144, 128) == (156, 128)
    assert output_size(101, 51, None) == (102, 52)


def test_plan_clips_policies():
    rng = random.Random(0)
    spec = ClipSpec(num_frames=4, stride=3, repeats=5, repeat_span="video")  # span 10
    clips, note = plan_clips(40, spec, rng)
    assert note is None and len(clips) == 5
    assert all(c == list(range(c[0], c[0] + 10, 3)) and c[-1] < 40 for c in clips)
    clips, note = plan_clips(7, spec, rng)  # too short for stride 3: stride 2 fits (span 7)
    assert note == "short_stride" and all(c == [0, 2, 4, 6] for c in clips)
    with pytest.raises(BadVideo, match="too_few_frames"):
        plan_clips(3, spec, rng)  # fewer frames than T
    clips, note = plan_clips(
        5, ClipSpec(num_frames=4, stride=3, short_video="loop", repeat_span="video"), rng
    )
    assert note == "short_loop" and all(c == [(c[0] + 3 * i) % 5 for i in range(4)] for c in clips)
    with pytest.raises(BadVideo, match="too_few_frames"):
        plan_clips(7, ClipSpec(num_frames=4, stride=3, short_video="skip"), rng)


def test_plan_clips_repeat_span():
    video = ClipSpec(num_frames=4, stride=3, repeats=4, repeat_span="video")  # span 10
    clip = ClipSpec(num_frames=4, stride=3, repeats=4, repeat_span="clip")
    plans = [plan_clips(100, video, random.Random(s))[0] for s in range(5)]
    assert any(len({c[0] for c in p}) > 1 for p in plans)  # "video": independent starts
    for seed in range(5):
        plan, note = plan_clips(100, clip, random.Random(seed))
        assert note is None and len(plan) == 4 and all(c == plan[0] for c in plan)
        assert plan[0] == list(range(plan[0][0], plan[0][0] + 10, 3))
    plan, note = plan_clips(
        5,
        ClipSpec(num_frames=4, stride=3, repeats=3, repeat_span="clip", short_video="loop"),
        random.Random(0),
    )
    assert note == "short_loop" and len(plan) == 3 and all(c == plan[0] for c in plan)


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_repeat_span_clip_golden_frames(index_video, read_frame_index, codec):
    """repeat_span="clip": the R clips show the same frames (golden indices); crops and flips differ."""
    data = index_video(frames=60, codec=codec, gop=8)
    full = ClipSpec(
        num_frames=5,
        stride=3,
        size=32,
        repeats=4,
        repeat_span="clip",
        crop_scale=(1.0, 1.0),
        crop_aspect=(4 / 3, 4 / 3),
    )
    rng = random.Random(3)
    plan, _ = plan_clips(60, full, rng)
    wanted = sorted({i for c in plan for i in c})
    assert wanted == plan[0] and wanted[0] > 0  # one window of T frames, decoded once, after a seek
    clips = make_clips(decode_frames(data, wanted, rgb, LIMITS), plan, full, rng)
    for clip in clips:  # full-frame crop: the drawn index survives the resize
        got = [read_frame_index(clip[:, t].numpy()) for t in range(5)]
        flipped = [read_frame_index(clip[:, t].flip(-1).numpy()) for t in range(5)]
        assert plan[0] in (got, flipped)
    cropped = ClipSpec(num_frames=5, stride=3, size=32, repeats=4, repeat_span="clip")
    rng = random.Random(3)
    plan, _ = plan_clips(60, cropped, rng)
    clips = make_clips(decode_frames(data, plan[0], rgb, LIMITS), plan, cropped, rng)
    assert len({c.numpy().tobytes() for c in clips}) == 4  # R different random resized crops


def test_clip_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="stride must be >= 1"):
        ClipSpec(stride=0)
    with pytest.raises(ValueError, match="short_video must be one of"):
        ClipSpec(short_video="pad")
    with pytest.raises(ValueError, match="repeat_span must be one of"):
        ClipSpec(repeat_span="window")


def test_random_resized_crop_in_bounds():
    rng = random.Random(1)
    for height, width in [(128, 228), (96, 64), (40, 400)]:
        for _ in range(200):
            top, left, h, w = random_resized_crop(height, width, (0.5, 1.0), (0.75, 1.3333), rng)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0


def test_resize_frame_identity_flip_and_crop_view():
    frame = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = np.empty((8, 8, 3), np.uint8)
    resize_frame(frame, 8, out)
    assert np.array_equal(out, frame)  # same size: bilinear is the identity
    resize_frame(frame, 8, out, flip=True)
    assert np.array_equal(out, frame[:, ::-1])
    big = np.zeros((20, 30, 3), np.uint8)
    big[5:13, 7:15] = frame
    resize_frame(big[5:13, 7:15], 8, out)  # a crop is a strided view of the frame, read in place
    assert np.array_equal(out, frame)


def test_resize_frame_matches_an_antialiased_resize_and_does_not_alias():
    """A 6.25x shrink of 1-pixel stripes must come out flat gray, as an antialiased filter makes it;
    plain bilinear samples single stripes and keeps a strong pattern (std ~70 here). On smooth
    content the result stays within a few levels of torch's antialiased bilinear resize."""
    import torch.nn.functional as F

    stripes = np.zeros((400, 400, 3), np.uint8)
    stripes[:, ::2] = 255
    out = np.empty((64, 64, 3), np.uint8)
    resize_frame(stripes, 64, out)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 3, (out.mean(), out.std())

    yy, xx = np.mgrid[0:300, 0:400]
    smooth = np.stack([xx * 255 / 400, yy * 255 / 300, 128 + 100 * np.sin(xx / 25.0)], -1).astype(np.uint8)
    for size in (224, 120, 64):  # shrinks of 1.8x, 3.3x and 6.3x
        out = np.empty((size, size, 3), np.uint8)
        resize_frame(smooth, size, out)
        ref = F.interpolate(
            torch.from_numpy(smooth).permute(2, 0, 1)[None].float(),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )[0].permute(1, 2, 0)
        diff = (torch.from_numpy(out).float() - ref).abs()
        assert diff.mean() < 1.5 and diff.max() < 12, (size, diff.mean(), diff.max())


def test_make_clips_shape(index_video, read_frame_index):
    spec = ClipSpec(
        num_frames=4, stride=2, size=32, repeats=3, crop_scale=(1.0, 1.0), crop_aspect=(4 / 3, 4 / 3)
    )
    rng = random.Random(0)
    plan, _ = plan_clips(30, spec, rng)
    wanted = sorted({i for c in plan for i in c})
    decoded = decode_frames(index_video(frames=30), wanted, rgb, LIMITS)
    clips = make_clips(decoded, plan, spec, rng)
    assert clips.shape == (3, 3, 4, 32, 32)
    for clip, indices in zip(
        clips, plan, strict=True
    ):  # full-frame crop: the drawn index survives the resize
        got = [read_frame_index(clip[:, t].numpy()) for t in range(4)]
        flipped = [read_frame_index(clip[:, t].flip(-1).numpy()) for t in range(4)]
        assert indices in (got, flipped)
    contiguous = torch.empty((3, 3, 4, 32, 32), dtype=torch.uint8)  # (R, C, T, H, W), not channels-last
    with pytest.raises(ValueError, match="out must be channels-last"):
        make_clips(decoded, plan, spec, rng, out=contiguous)


def test_decode_time_limit(index_video):
    with pytest.raises(BadVideo) as err:
        decode_frames(index_video(frames=20), [5, 15], rgb, VideoLimits(timeout_s=0.0))
    assert err.value.reason == "decode_timeout"


def test_decodes_only_near_the_wanted_frames(index_video, read_frame_index, monkeypatch):
    import mae_scale.data.decode as decode

    decoded = []
    real = decode._frames

    def counting(*args):
        for item in real(*args):
            decoded.append(item[0])
            yield item

    monkeypatch.setattr(decode, "_frames", counting)
    data = index_video(frames=200, gop=8)
    got = [read_frame_index(f) for f in decode_frames(data, [100, 104, 190], rgb, LIMITS)]
    assert got == [100, 104, 190]
    assert len(decoded) < 30, decoded  # two seeks; not the 191 frames of a decode from the start


def test_converter_inherited_by_a_forked_worker_can_be_freed(index_video):
    """PAINS: DataLoader hangs after fork. The parent converts and resizes frames (workers=0, tools),
    then forks DataLoader workers; a child that resizes and frees the inherited RGB scaler must not
    wait forever for scaler or OpenCV threads that did not survive the fork (seen as a CI hang)."""
    import gc
    import io
    import os
    import time

    import av

    from mae_scale.data.decode import RGBConverter

    convert = RGBConverter()
    out = np.empty((224, 224, 3), np.uint8)
    with av.open(io.BytesIO(index_video(frames=8))) as container:
        for frame in container.decode(video=0):
            resize_frame(np.tile(convert(frame), (8, 8, 1)), 224, out)
    pid = os.fork()
    if pid == 0:  # the child: resize, free the converter, leave at once
        resize_frame(np.tile(out, (3, 3, 1)), 224, out)
        del convert
        gc.collect()
        os._exit(0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("a forked child hung freeing an inherited RGB converter")
