"""index_shards adopts shards other tools wrote (as video2dataset writes them) and our own shards that
have no index: a manifest and index in another folder, the tars read in place, bad samples listed
(not fatal), and the loader (and once the whole training job) trains on them."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds

from mae_scale.config import DataConfig
from mae_scale.data.adopt import index_shards
from mae_scale.data.demo import demo_sources
from mae_scale.data.index import read_index, scan_tar
from mae_scale.data.loader import build_loader
from mae_scale.data.make_shards import ShardBuildError, make_shards
from mae_scale.data.shards import read_manifest
from mae_scale.data.verify import verify_shards

TINY = dict(num_frames=4, stride=2, size=32, repeats=1, workers=0, shuffle_buffer=0)


def encode(fmt: str, codec: str, frames: int = 12) -> bytes:
    """A small synthetic video in any container (video2dataset keeps whatever the source was)."""
    out = io.BytesIO()
    with av.open(out, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), 10 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return out.getvalue()


def v2d_meta(key: str, **extra) -> bytes:
    """video2dataset's own json: no frame count, none of our fields."""
    return json.dumps(
        {"url": f"https://example.org/{key}", "key": key, "status": "success", **extra}
    ).encode()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, synthetic_shards):
    """`v2d/`: two shards as video2dataset writes them (webdataset's TarWriter, wall-clock mtimes,
    9-digit keys, mp4/webm/mkv/avi + txt + its json), with bad samples among good ones and a third
    shard cut short; `ours/`: our own synthetic shards, copied without manifest or index."""
    root = tmp_path_factory.mktemp("foreign")
    (root / "v2d").mkdir()
    clip = Path(demo_sources()[3].path).read_bytes()  # carphone_distorted: 176 x 144, 120 frames
    good, bad = {}, {}
    with wds.TarWriter(str(root / "v2d" / "00000.tar")) as w:
        w.write({"__key__": "000000000", "mp4": clip, "txt": b"a man on the phone", "json": v2d_meta("0")})
        w.write(
            {
                "__key__": "000000001",
                "webm": encode("webm", "libvpx-vp9"),
                "txt": b"grey",
                "json": v2d_meta("1"),
            }
        )
        w.write({"__key__": "000000002", "mp4": b"\x00 not a video " * 99, "json": v2d_meta("2")})
        w.write({"__key__": "000000003", "txt": b"a caption, no video", "json": v2d_meta("3")})
        good.update({"000000000": 120, "000000001": 12})
        bad.update({"000000002": "undecodable", "000000003": "no_video_member"})
    with wds.TarWriter(str(root / "v2d" / "00001.tar")) as w:
        w.write({"__key__": "000010000", "avi": encode("avi", "mpeg4", 20), "cls": b"3"})  # no json at all
        w.write({"__key__": "000010001", "mkv": encode("matroska", "libx264", 16), "json": b"[1, 2]"})
        w.write({"__key__": "000010002", "mp4": clip, "json": v2d_meta("x", frames=999)})  # a json that lies
        w.write({"__key__": "000010003", "mkv": encode("matroska", "libx264", 16), "txt": b"ok"})
        good.update({"000010000": 20, "000010003": 16})
        bad.update({"000010001": "bad_json", "000010002": "frames_mismatch"})
    whole = (root / "v2d" / "00001.tar").read_bytes()
    (root / "v2d" / "00002.tar").write_bytes(whole[: len(whole) // 2])  # cut mid-member
    (root / "ours").mkdir()
    for tar in sorted(synthetic_shards.glob("*.tar")):
        shutil.copy(tar, root / "ours")
        with open(tar, "rb") as f:
            good.update({s.key: 40 for s in scan_tar(f)})
    return root, good, bad


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_foreign_and_unindexed_shards_are_adopted_in_place_and_the_loader_trains_on_them(foreign, tmp_path):
    root, good, bad = foreign
    before = {d: digest(root / d) for d in ("v2d", "ours")}
    out = tmp_path / "adopted"
    manifest = index_shards(
        [str(root / "v2d"), str(root / "ours" / "syn-{000000..000004}.tar")], out, workers=2, progress=False
    )
    assert {d: digest(root / d) for d in ("v2d", "ours")} == before  # nothing copied, changed or added there
    names = [s.name for s in manifest.shards]
    assert names == ["v2d/00000.tar", "v2d/00001.tar", *[f"ours/syn-{k:06d}.tar" for k in range(5)]]
    manifest, urls = read_manifest(out)
    assert urls == [str(root / n) for n in names]  # read where they are
    assert manifest.total_samples == len(good) + len(bad) and manifest.indexed
    assert manifest.build["usable_samples"] == len(good)
    frames = {}
    for shard, url in zip(manifest.shards, urls, strict=True):
        assert shard.sha256 == hashlib.sha256(Path(url).read_bytes()).hexdigest()
        assert shard.bytes == Path(url).stat().st_size
        index = read_index(str(out / shard.index))
        with open(url, "rb") as f:
            assert [(s.key, s.offset, s.length) for s in scan_tar(f)] == [
                (s.key, s.offset, s.length) for s in index.samples
            ]
        frames.update({s.key: s.frames for s in index.samples})
    assert frames == {**good, **{k: None for k in bad}}  # probed; none for what cannot be used
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["key"]: r["reason"] for r in rejects if r["key"]} == bad
    assert [(r["shard"], r["reason"]) for r in rejects if not r["key"]] == [("v2d/00002.tar", "bad_tar")]
    assert manifest.rejects == len(rejects)

    # verify_shards checks it by the loader's rules for adopted sets: its faults are the rejects,
    # not every .txt / .cls member or json without our fields
    faults, summary = verify_shards(out)
    assert {f.key: f.reason for f in faults} == bad, [str(f) for f in faults]
    assert summary["samples"] == manifest.total_samples and summary["unindexed"] == 0

    loader = build_loader(DataConfig(shards=str(out), max_bad_ratio=0.5, **TINY), batch_size=1, seed=0)
    batches = [batch for _, batch in zip(range(2 * len(good)), loader, strict=False)]  # two epochs
    seen = [batch["keys"][0] for batch in batches]
    assert sorted(seen[: len(good)]) == sorted(good)  # every usable sample once, whatever its members
    stats = loader.stats()  # the listed ones are skipped and counted (all of epoch 0's, some of epoch 1's)
    assert len(bad) <= sum(stats["bad"].values()) <= 2 * len(bad)
    assert set(stats["bad"]) == {"bad_json", "missing_member", "frames_mismatch"}, stats
    labels = {batch["keys"][0]: batch["labels"][0] for batch in batches}
    assert labels["000010000"] is None  # its .cls is not read: labels come from a json
    assert all(isinstance(labels[k], int) for k in good if "synthetic" in k)  # our json's labels

    # confirmed when asked again; other shards are refused, naming the difference
    assert index_shards(str(root / "v2d"), tmp_path / "v2d_only", progress=False).total_samples == 8
    assert index_shards(str(root / "v2d"), tmp_path / "v2d_only", progress=False).to_dict()["shards"]
    with pytest.raises(
        ShardBuildError, match=r"inputs: 3 -> 2 \(0 added, 1 removed; e\.g\. removed '.*00002\.tar'"
    ):
        index_shards(str(root / "v2d" / "{00000..00001}.tar"), tmp_path / "v2d_only", progress=False)


def test_without_ray_the_ray_engine_fails_at_once_with_the_install_command(
    monkeypatch, tmp_path, synthetic_videos
):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ShardBuildError, match=r"pip install 'mae-scale\[cluster\]'"):
        make_shards(synthetic_videos, tmp_path / "a", engine="ray", progress=False)
    with pytest.raises(ShardBuildError, match=r"pip install 'mae-scale\[cluster\]'"):
        index_shards(str(tmp_path), tmp_path / "b", engine="ray", progress=False)
    assert not (tmp_path / "a").exists()  # refused before any work


@pytest.mark.slow
def test_the_training_job_runs_on_adopted_shards(foreign, tmp_path):
    from launch import metrics, pretrain

    root, good, _ = foreign
    out = tmp_path / "adopted"
    index_shards(str(root / "v2d"), out, progress=False)
    run = tmp_path / "run"
    pretrain(
        [
            "--config",
            "demo",
            f"run.dir={run}",
            f"data.shards={out}",
            "data.max_bad_ratio=0.5",
            "data.workers=1",
            "train.steps=3",
            "log.every_steps=1",
            "log.wandb=off",
            "checkpoint.every_steps=0",
        ]
    )
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert len(losses) == 3 and all(np.isfinite(losses))
