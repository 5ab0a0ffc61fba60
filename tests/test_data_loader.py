"""The streaming loader: rank/worker splits, epochs, exact resume, safe points, early stop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mae_scale.data.stream as stream_module
from mae_scale.config import DataConfig
from mae_scale.data.loader import DataStateError, build_loader
from mae_scale.data.make_shards import make_shards
from mae_scale.data.shards import read_manifest
from mae_scale.data.stream import ClipStream, shard_order

REPO = Path(__file__).resolve().parent.parent
TINY = dict(num_frames=4, stride=2, size=32, repeats=2, shuffle_buffer=4)


def cfg(shards, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), **{**TINY, **kw})


def take(loader, n: int) -> list[dict]:
    return [b for _, b in zip(range(n), loader, strict=False)]


def record_decodes(monkeypatch) -> list[list[int]]:
    """From now on, the frame indices of every `decode_frames` call the stream makes (in process)."""
    wanted: list[list[int]] = []
    real = stream_module.decode_frames
    monkeypatch.setattr(
        stream_module, "decode_frames", lambda d, w, *a: wanted.append(list(w)) or real(d, w, *a)
    )
    return wanted


def epoch_keys(loader, rank: int, world: int, workers: int, epoch: int) -> list[str]:
    """Keys one rank's streams give in `epoch`, read from the stream stage (tar reads, no decoding)."""
    dataset = ClipStream(loader.spec, [(0, 0)] * workers)
    return [item.raw.key for w in range(workers) for item in dataset.epoch_items(rank * workers + w, epoch)]


def test_batch_format(demo_shards):
    loader = build_loader(cfg(demo_shards, workers=0), batch_size=2, seed=0, rank=0, world_size=1)
    batch = next(iter(loader))
    assert set(batch) == {"clips", "keys", "labels", "epoch"}
    assert batch["clips"].dtype == torch.uint8 and batch["clips"].shape == (
        4,
        3,
        4,
        32,
        32,
    )  # (B*R, C, T, H, W)
    assert batch["clips"].is_contiguous(memory_format=torch.channels_last_3d)  # documented layout
    assert len(batch["keys"]) == len(batch["labels"]) == 4 and batch["keys"][0] == batch["keys"][1]
    assert batch["epoch"] == 0 and loader.stats()["samples"] == 2 and loader.stats()["clips"] == 4


@pytest.mark.parametrize("shards_per_set", [1, 2, 4])  # 10 samples in 10, 5 (odd) or 3 shards for 4 streams
def test_ranks_and_workers_split_each_epoch(tmp_path, synthetic_videos, shards_per_set):
    out = tmp_path / "s"
    make_shards(synthetic_videos / "labels.csv", out, max_samples_per_shard=shards_per_set, progress=False)
    manifest, _ = read_manifest(out)
    loaders = [
        build_loader(cfg(out, workers=2), batch_size=1, seed=7, rank=r, world_size=2) for r in range(2)
    ]
    for epoch in range(3):
        streams = [epoch_keys(loaders[r], r, 2, 2, epoch) for r in range(2)]
        everything = streams[0] + streams[1]
        assert len(everything) == len(set(everything)) == manifest.total_samples  # disjoint and covering
    orders = {tuple(shard_order(len(manifest.shards), 7, e)) for e in range(6)}
    assert len(manifest.shards) == 1 or len(orders) > 1  # a new epoch reorders shards


def test_two_ranks_two_workers_on_demo(demo_shards):
    """Real worker processes: in one epoch the 4 streams get the 4 demo videos, one each."""
    seen = []
    for rank in range(2):
        loader = build_loader(cfg(demo_shards, workers=2), batch_size=1, seed=3, rank=rank, world_size=2)
        batches = take(loader, 4)
        assert [b["epoch"] for b in batches] == [0, 0, 1, 1]
        seen += [b["keys"][0] for b in batches[:2]]
    assert len(set(seen)) == 4


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert [x["epoch"] for x in a] == [x["epoch"] for x in b]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["clips"], y["clips"])


def _keep(clips: torch.Tensor, how: str):
    """Something that keeps a batch's memory alive after the batch tensor is gone, and its pixels now."""
    kept = {"view": lambda: clips[1], "numpy": clips.numpy, "storage": clips.untyped_storage}[how]()
    return kept, _pixels(kept).copy()


def _pixels(kept) -> np.ndarray:
    if isinstance(kept, torch.UntypedStorage):
        return torch.empty(0, dtype=torch.uint8).set_(kept).numpy()
    return np.asarray(kept)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_reused_only_once_let_go(demo_shards, workers):
    """Workers write into a batch again only after every tensor, array or storage on it is gone
    (BatchPool): what is kept of a batch stays intact while later batches stream past, dropped
    batches are reused, and reuse changes no pixel of what is delivered. Resumed after one batch,
    so that with 2 workers the logical workers are offset from the processes."""
    config = cfg(demo_shards, workers=workers)
    first = build_loader(config, batch_size=1, seed=5)
    take(first, 1)
    state = first.state_dict()

    reusing = build_loader(config, batch_size=1, seed=5)
    reusing.load_state_dict(state)
    kept, delivered = {}, []
    for i, batch in zip(range(16), reusing, strict=False):
        delivered.append(batch["clips"].clone())
        if i in (0, 3, 6):
            kept[i] = _keep(batch["clips"], {0: "view", 3: "numpy", 6: "storage"}[i])
        del batch
    for i, (thing, pixels) in kept.items():
        assert np.array_equal(_pixels(thing), pixels), f"batch {i} was overwritten while kept"
    allocated = reusing.stats()["batches_allocated"]
    if workers == 0:  # the one being written, the previous one (zip holds it until the next), the kept
        assert allocated == 2 + len(kept)
    else:
        assert allocated < 16 - len(kept)

    holding = build_loader(config, batch_size=1, seed=5)
    holding.load_state_dict(state)
    held = take(holding, 16)  # every batch kept: none can be reused
    assert holding.stats()["batches_allocated"] == 16
    for mine, theirs in zip(held, delivered, strict=True):
        assert torch.equal(mine["clips"], theirs)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_batch_from_an_earlier_iteration_never_returns_to_new_workers(demo_shards, workers):
    loader = build_loader(cfg(demo_shards, workers=workers), batch_size=1, seed=5)
    it = iter(loader)
    old = next(it)["clips"]  # outlives its iteration
    it.close()
    it = iter(loader)
    held = [next(it)["clips"] for _ in range(3)]
    copies = [c.clone() for c in held]
    del old  # its id must go nowhere: the new workers' batch of the same id is held
    for _ in range(6):
        next(it)
    assert all(torch.equal(a, b) for a, b in zip(held, copies, strict=True))


@pytest.mark.parametrize("workers, span", [(0, "clip"), (2, "clip"), (2, "video")])
def test_resume_is_exact(synthetic_shards, workers, span):
    config = cfg(synthetic_shards, workers=workers, repeat_span=span)
    straight = build_loader(config, batch_size=3, seed=1, rank=0, world_size=1)
    it = iter(straight)
    head = [next(it) for _ in range(3)]  # 9 of 10 samples (+ R clips each): the next batch crosses an epoch
    state = straight.state_dict()
    decoded_at_save = straight.stats()["decoded"]
    tail = [next(it) for _ in range(4)]
    resumed = build_loader(config, batch_size=3, seed=1, rank=0, world_size=1)
    resumed.load_state_dict(state)
    again = take(resumed, 4)
    assert_same(tail, again)
    assert resumed.state_dict() == straight.state_dict()
    # the restored loader's decode count grew only by the videos of the 4 new batches, as the original's
    assert resumed.stats()["decoded"] - decoded_at_save == straight.stats()["decoded"] - decoded_at_save == 12
    assert head[0]["keys"] != again[0]["keys"]


def test_fast_forward_decodes_nothing(synthetic_shards, monkeypatch):
    config = cfg(synthetic_shards, workers=0)
    original = build_loader(config, batch_size=2, seed=0, rank=0, world_size=1)
    take(original, 4)
    state = original.state_dict()
    calls = record_decodes(monkeypatch)
    resumed = build_loader(config, batch_size=2, seed=0, rank=0, world_size=1)
    resumed.load_state_dict(state)
    take(resumed, 1)
    assert len(calls) == 2  # the batch's two videos; the 8 skipped ones were read from the tar, not decoded


def test_repeat_span_clip_decodes_one_window_per_video(synthetic_shards, monkeypatch):
    wanted = record_decodes(monkeypatch)
    loader = build_loader(
        cfg(synthetic_shards, workers=0, repeats=3, repeat_span="clip"), batch_size=2, seed=0
    )
    batch = next(iter(loader))
    assert batch["clips"].shape == (6, 3, 4, 32, 32)
    assert batch["keys"][:3] == [batch["keys"][0]] * 3
    assert len(wanted) == 2 and all(w == list(range(w[0], w[0] + 7, 2)) for w in wanted)  # T frames each


def test_repeat_span_video_decodes_independent_windows(synthetic_shards, monkeypatch):
    wanted = record_decodes(monkeypatch)
    loader = build_loader(
        cfg(synthetic_shards, workers=0, repeats=3, repeat_span="video"), batch_size=4, seed=0
    )
    batch = next(iter(loader))
    assert batch["clips"].shape == (12, 3, 4, 32, 32)
    assert len(wanted) == 4 and any(len(w) > 4 for w in wanted)  # the union of 3 clips' frames


def test_state_is_json_and_mismatches_are_named(synthetic_shards):
    import json

    loader = build_loader(cfg(synthetic_shards, workers=2), batch_size=2, seed=0, rank=0, world_size=1)
    state = json.loads(json.dumps(loader.state_dict()))
    for field, value in [("world_size", 2), ("workers", 1), ("seed", 5), ("manifest", "x"), ("version", 9)]:
        with pytest.raises(DataStateError, match=field if field != "version" else "version 9"):
            loader.load_state_dict({**state, field: value})
    loader.load_state_dict(state)


def test_nearest_safe_point_for_a_new_world_size(synthetic_shards):
    states = []
    for rank in range(2):
        old = build_loader(cfg(synthetic_shards, workers=2), batch_size=2, seed=0, rank=rank, world_size=2)
        take(old, 2 + 2 * rank)  # rank 1 has gone further: into epoch 1 on both workers
        states.append(old.state_dict())
    assert [s["epoch"] for s in states] == [0, 1]
    new = build_loader(cfg(synthetic_shards, workers=1), batch_size=2, seed=0, rank=0, world_size=1)
    with pytest.raises(DataStateError, match="world_size"):
        new.load_state_dict(states[0])
    assert new.load_nearest_safe_point(states) == 0  # replay: restart the earliest unfinished epoch
    assert new.load_nearest_safe_point(states, policy="skip") == 2  # skip: after every started epoch
    assert next(iter(new))["epoch"] == 2


def test_pipe_urls(synthetic_shards):
    loader = build_loader(
        cfg(f"pipe:cat {synthetic_shards}/manifest.json", workers=0),
        batch_size=2,
        seed=0,
        rank=0,
        world_size=1,
    )
    assert loader.spec.shards[0].url.startswith("pipe:cat ") and len(take(loader, 6)) == 6


def test_settings_errors_name_the_key(synthetic_shards):
    with pytest.raises(ValueError, match="data.max_bad_ratio must be in"):
        build_loader(cfg(synthetic_shards, max_bad_ratio=2.0), batch_size=1, seed=0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        build_loader(cfg(synthetic_shards, stride=0), batch_size=1, seed=0)


STOP_EARLY = """
import sys
from mae_scale.config import DataConfig
from mae_scale.data.loader import build_loader
cfg = DataConfig(shards=sys.argv[1], num_frames=4, stride=2, size=32, repeats=2, workers=2)
for round in range(3):
    loader = build_loader(cfg, batch_size=1, seed=round, rank=0, world_size=1)
    for i, batch in enumerate(loader):
        if i == round:
            break          # abandon the iterator while workers are mid-prefetch
    del loader, batch
print("done")
"""


def test_stopping_early_with_workers_does_not_hang(synthetic_shards):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", STOP_EARLY, str(synthetic_shards)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr
