"""Every kind of bad data is skipped, counted by reason and named; too much of it stops the run clearly."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from launch import metrics, pretrain, torchrun

from mae_scale.config import DataConfig
from mae_scale.data.decode import VideoLimits
from mae_scale.data.loader import BadDataError, build_loader
from mae_scale.data.shards import ShardInfo, read_manifest, sha256_file, write_json_atomic
from mae_scale.data.verify import verify_shards

REPO = Path(__file__).resolve().parent.parent
MAX_PIXELS = 300 * 300  # the demo's largest video is 302 x 128; the crafted "huge" one is 512 x 512


class Evil:
    """Unpickling this creates a file: proof that nobody unpickled it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def meta(frames: int) -> bytes:
    return json.dumps(
        {"source": "crafted", "frames": frames, "fps": 25.0, "width": 64, "height": 48, "duration": 1.0}
    ).encode()


EXPECTED_BAD = {  # reason -> count in one epoch
    "bad_tar": 2,  # the truncated demo shard and the zero-byte shard
    "unreadable_shard": 1,  # listed in the manifest, absent on disk
    "undecodable": 1,
    "empty_video": 1,
    "missing_member": 2,
    "too_few_frames": 1,
    "too_small": 1,
    "too_large": 1,
    "bad_json": 1,
    "duplicate_key": 1,
    "frames_mismatch": 1,
}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, demo_shards, index_video):
    """A copy of the demo shards with every fault injected, and the keys of the good samples."""
    out = tmp_path_factory.mktemp("faulty")
    manifest, urls = read_manifest(demo_shards)
    for url in urls:
        shutil.copy(url, out)
    victim = out / manifest.shards[0].name  # truncate mid-video
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with tarfile.open(urls[1]) as tar:
        real = {m.name.split(".")[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    good_keys = {key for url in urls[1:] for key in [tarfile.open(url).getnames()[0].split(".")[0]]}
    marker = out / "UNPICKLED"
    with tarfile.open(out / "faults-000004.tar", "w") as tar:
        add(tar, "dupe.mp4", real["mp4"])
        add(tar, "dupe.json", real["json"])
        add(tar, "undecodable.mp4", b"\x00\x01 this is no video " * 200)
        add(tar, "undecodable.json", meta(40))
        add(tar, "empty.mp4", b"")
        add(tar, "empty.json", meta(40))
        add(tar, "nomp4.json", meta(40))
        add(tar, "nojson.mp4", real["mp4"])
        add(tar, "short.mp4", index_video(frames=5, codec="mpeg4", width=64, height=48))
        add(tar, "short.json", meta(5))
        add(tar, "tiny.mp4", index_video(frames=20, codec="mpeg4", width=16, height=16))
        add(tar, "tiny.json", meta(20))
        add(tar, "huge.mp4", index_video(frames=8, codec="mpeg4", width=512, height=512))
        add(tar, "huge.json", meta(8))
        add(tar, "badjson.mp4", real["mp4"])
        add(tar, "badjson.json", b"{not json")
        add(tar, "liar.mp4", index_video(frames=20, codec="mpeg4", width=64, height=48))
        add(tar, "liar.json", meta(5000))
        add(tar, "pickled.mp4", real["mp4"])
        add(tar, "pickled.json", real["json"])
        add(tar, "pickled.pyd", pickle.dumps(Evil(marker)))
        add(tar, "dupe.mp4", real["mp4"])  # the same key again, later in the shard
        add(tar, "dupe.json", real["json"])
    (out / "faults-000005.tar").write_bytes(b"")  # zero-byte shard
    shards = [
        *manifest.shards,
        ShardInfo(
            "faults-000004.tar",
            12,  # every sample the tar holds: the loader plans (and reads) exactly the manifest's count
            (out / "faults-000004.tar").stat().st_size,
            sha256_file(out / "faults-000004.tar"),
        ),
        ShardInfo("faults-000005.tar", 1, 0, sha256_file(out / "faults-000005.tar")),
        ShardInfo("faults-000006.tar", 1, 10240, "0" * 64),  # missing
    ]
    data = json.loads((demo_shards / "manifest.json").read_text())
    data["shards"] = [s.__dict__ for s in shards]
    data.pop("total_samples"), data.pop("total_bytes")
    write_json_atomic(out / "manifest.json", data)
    return out, good_keys | {"dupe", "pickled"}, marker


def config(shards: Path, **kw) -> DataConfig:
    base = dict(
        num_frames=4, stride=2, size=32, repeats=1, workers=0, short_video="skip", max_pixels=MAX_PIXELS
    )
    return DataConfig(shards=str(shards), **{**base, **kw})


def test_loader_skips_and_counts_every_fault(faulty):
    shards, good_keys, marker = faulty
    loader = build_loader(config(shards, max_bad_ratio=1.0), batch_size=1, seed=0, rank=0, world_size=1)
    keys = Counter()
    for batch in loader:
        if batch["epoch"] > 0:
            break
        keys[batch["keys"][0]] += 1
    assert set(keys) == good_keys and set(keys.values()) == {1}  # each good sample once in the epoch
    stats = loader.stats()
    assert stats["bad"] == EXPECTED_BAD, stats["examples"]
    assert "faults-000004.tar/liar" in stats["examples"]["frames_mismatch"]
    assert not marker.exists()


def test_short_video_policy_stride_keeps_it(faulty):
    shards, good_keys, _ = faulty
    loader = build_loader(config(shards, max_bad_ratio=1.0, short_video="stride"), batch_size=1, seed=0)
    keys = set()
    for batch in loader:
        if batch["epoch"] > 0:
            break
        keys.add(batch["keys"][0])
    assert keys == good_keys | {"short"} and loader.stats()["info"] == {"short_stride": 1}


def test_too_many_bad_samples_stop_with_a_clear_error(faulty):
    shards, _, _ = faulty
    loader = build_loader(config(shards, max_bad_ratio=0.1), batch_size=1, seed=0)
    with pytest.raises(BadDataError) as err:
        for _ in loader:
            pass
    message = str(err.value)
    assert "above data.max_bad_ratio=10.0%" in message and "bad_tar x" in message
    assert "verify_shards.py" in message and loader.stats()["bad_total"] + loader.stats()["samples"] >= 20


@pytest.mark.parametrize("workers", [0, 1])
def test_an_epoch_without_any_good_sample_raises(tmp_path, faulty, workers):
    shards, _, _ = faulty
    data = json.loads((shards / "manifest.json").read_text())
    data["shards"] = [
        s for s in data["shards"] if s["name"].startswith("faults-00000") and s["name"] != "faults-000004.tar"
    ]
    for s in data["shards"]:
        if (shards / s["name"]).exists():
            shutil.copy(shards / s["name"], tmp_path)
    write_json_atomic(tmp_path / "manifest.json", data)
    loader = build_loader(config(tmp_path, max_bad_ratio=1.0, workers=workers), batch_size=1, seed=0)
    with pytest.raises(BadDataError, match="gave no usable sample"):
        next(iter(loader))


def test_verify_names_every_fault(faulty, demo_shards):
    shards, _, marker = faulty
    manifest, urls = read_manifest(demo_shards)
    with tarfile.open(urls[0]) as tar:  # the sample the truncation cut in half
        cut_key = tar.getnames()[0].split(".")[0]
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "verify_shards.py"),
            str(shards),
            "--max-pixels",
            str(MAX_PIXELS),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    for shard, key, reason in [
        (manifest.shards[0].name, cut_key, "bad_tar"),  # names the key it was reading when the data ended
        ("demo-000000.tar", "-", "size_mismatch"),
        ("faults-000004.tar", "undecodable", "undecodable"),
        ("faults-000004.tar", "empty", "empty_video"),
        ("faults-000004.tar", "nomp4", "missing_member"),
        ("faults-000004.tar", "nojson", "missing_member"),
        ("faults-000004.tar", "tiny", "too_small"),
        ("faults-000004.tar", "huge", "too_large"),
        ("faults-000004.tar", "badjson", "bad_json"),
        ("faults-000004.tar", "liar", "meta_mismatch"),
        ("faults-000004.tar", "pickled", "unexpected_member"),
        ("faults-000004.tar", "dupe", "duplicate_key"),
        ("faults-000005.tar", "-", "bad_tar"),
        ("faults-000006.tar", "-", "unreadable_shard"),
    ]:
        found = [
            line for line in lines if line.startswith(f"FAULT {shard} {key}") and f": {reason}: " in line
        ]
        assert found, (shard, key, reason, run.stdout)
    assert not marker.exists()
    faults, _ = verify_shards(shards, limits=VideoLimits(MAX_PIXELS))
    fault_lines = [line for line in lines if line.startswith("FAULT")]
    assert len(faults) == len(fault_lines)
    # the closing table: the verdict, then shards, samples, faults by reason, bytes, time
    title = next(i for i, line in enumerate(lines) if line.startswith(f"verify_shards: {shards}:"))
    assert f": {len(faults)} faults (" in lines[title]
    rows = dict(line.strip().rsplit(maxsplit=1) for line in lines[title + 1 :] if "  " in line.strip())
    by_reason = Counter(f.reason for f in faults)
    assert rows["shards"] == "7" and rows["faults"] == str(len(faults))
    assert {r: int(rows[r]) for r in by_reason} == dict(by_reason)
    assert lines[title + 1 :] and lines[-1].strip().startswith("time")


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_decoding_many_clips_does_not_grow_memory(demo_shards, workers):
    """PAINS: decoders that are never freed grow RSS until OOM. 400 videos in, the RSS of the process
    that decodes (this one, or the worker) must stay flat, and so must this one's with a worker."""
    import psutil

    loader = build_loader(
        config(demo_shards, repeats=2, max_pixels=10**7, shuffle_buffer=0, workers=workers),
        batch_size=4,
        seed=0,
    )
    me = psutil.Process()
    older = {p.pid for p in me.children()}  # e.g. multiprocessing's resource tracker, left by other tests
    it = iter(loader)
    for _ in range(25):  # warm up allocators and caches
        next(it)
    decoders = [me, *(p for p in me.children() if p.pid not in older)]  # with a worker: this one and it
    assert len(decoders) == 1 + workers
    before = [p.memory_info().rss / 2**20 for p in decoders]
    for _ in range(75):
        next(it)
    after = [p.memory_info().rss / 2**20 for p in decoders]
    assert loader.stats()["samples"] == 400
    for b, a in zip(before, after, strict=True):
        assert a - b < 25, f"RSS grew from {b:.0f} MB to {a:.0f} MB (processes: {decoders})"


IN_TRAINING = {  # shard -> crafted faults before its one real sample (so an epoch ends on a good one)
    0: [("undecodable", "undecodable"), ("empty", "empty_video")],
    1: [("nomp4", "missing_member"), ("badjson", "bad_json")],
    2: [("tiny", "too_small"), ("huge", "too_large")],
    3: [("liar", "frames_mismatch"), ("undecodable", "undecodable")],
}


@pytest.fixture(scope="module")
def faulty_for_training(tmp_path_factory, demo_shards, index_video):
    """4 shards, each some crafted faults then one real demo video; returns the folder."""
    out = tmp_path_factory.mktemp("faulty_training")
    manifest, urls = read_manifest(demo_shards)
    crafted = {
        "undecodable": (b"\x00\x01 this is no video " * 200, meta(40)),
        "empty": (b"", meta(40)),
        "nomp4": (None, meta(40)),
        "badjson": (None, b"{not json"),
        "tiny": (index_video(frames=40, codec="mpeg4", width=16, height=16), meta(40)),
        "huge": (index_video(frames=32, codec="mpeg4", width=512, height=512), meta(32)),
        "liar": (index_video(frames=20, codec="mpeg4", width=64, height=48), meta(5000)),
    }
    shards = []
    for n, url in enumerate(urls):
        with tarfile.open(url) as tar:
            real = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        path = out / f"train-{n:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, _ in IN_TRAINING[n]:
                mp4, js = crafted[key]
                if key == "badjson":
                    mp4 = real[0][1] if real[0][0].endswith(".mp4") else real[1][1]
                if mp4 is not None:
                    add(tar, f"s{n}{key}.mp4", mp4)
                add(tar, f"s{n}{key}.json", js)
            for name, data in real:
                add(tar, name, data)
        shards.append(ShardInfo(path.name, len(IN_TRAINING[n]) + 1, path.stat().st_size, sha256_file(path)))
    data = json.loads((demo_shards / "manifest.json").read_text())
    data["shards"] = [s.__dict__ for s in shards]
    data.pop("total_samples"), data.pop("total_bytes")
    write_json_atomic(out / "manifest.json", data)
    return out


@pytest.mark.slow
def test_training_counts_bad_samples_by_reason_over_ranks(tmp_path, faulty_for_training):
    """2 ranks, each reading 2 of the 4 shards per epoch (1 step per epoch): the metrics rows count
    every injected reason exactly, summed over the ranks, since the start (also across a resume on
    another world size); each reason's first example is named once; summary.json agrees."""
    run = tmp_path / "run"
    args = [
        "--config",
        "demo",
        f"run.dir={run}",
        f"data.shards={faulty_for_training}",
        "data.shuffle_buffer=0",
        "data.max_bad_ratio=1.0",
        f"data.max_pixels={MAX_PIXELS}",
        "log.every_steps=1",
        "log.wandb=off",
        "checkpoint.every_steps=0",
    ]
    proc = torchrun([*args, "train.steps=3"])
    per_epoch = Counter(reason for faults in IN_TRAINING.values() for _, reason in faults)
    rows = [m for m in metrics(run) if "loss" in m]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for epochs, row in enumerate(rows, 1):  # step k ends epoch k: every shard of it has been read
        assert row["bad_by_reason"] == {r: n * epochs for r, n in per_epoch.items()}, row
        assert row["bad_samples"] == sum(per_epoch.values()) * epochs
    console = proc.stdout + proc.stderr
    for reason in per_epoch:
        named = [line for line in console.splitlines() if f"bad sample ({reason}), first: train-0" in line]
        assert len(named) == 1, (reason, console[-3000:])
    assert "bad sample (too_small), first: train-000002.tar/s2tiny: " in console
    summary = json.loads((run / "summary.json").read_text())
    assert summary["bad_by_reason"] == rows[-1]["bad_by_reason"]
    assert summary["bad_samples"] == rows[-1]["bad_samples"]
    assert summary["steps"] == {"from": 0, "to": 3, "target": 3} and summary["ended"] == "finished"
    assert summary["bad_examples"]["frames_mismatch"].startswith("train-000003.tar/s3liar: ")
    table = console[console.index("[mae-scale] run summary:") :]
    assert re.search(rf"\n  bad samples +{rows[-1]['bad_samples']}\n", table)
    assert re.search(r"\n    frames_mismatch +3\n", table)

    # resumed on one rank: the old ranks' counts carry over, and its one step reads 2 whole shards
    pretrain([*args, "train.steps=4"])
    last = [m for m in metrics(run) if "loss" in m][-1]
    assert last["step"] == 4 and last["bad_samples"] == rows[-1]["bad_samples"] + 4
    assert all(last["bad_by_reason"][r] >= n for r, n in rows[-1]["bad_by_reason"].items())
