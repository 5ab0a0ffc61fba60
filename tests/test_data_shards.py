"""make_shards -> verify_shards -> loader round trip, rejects, determinism, resume after a kill, demo set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from mae_scale.config import DataConfig
from mae_scale.data.demo import DEMO_CLIPS, ensure_demo_shards
from mae_scale.data.loader import build_loader
from mae_scale.data.make_shards import ShardBuildError, list_inputs, make_shards
from mae_scale.data.shards import ManifestError, read_manifest, sha256_file
from mae_scale.data.verify import verify_shards

REPO = Path(__file__).resolve().parent.parent
TINY = dict(num_frames=4, stride=2, size=32, repeats=2, workers=0, shuffle_buffer=4)


def test_manifest_totals_and_verify(synthetic_shards):
    manifest, urls = read_manifest(synthetic_shards)
    data = json.loads((synthetic_shards / "manifest.json").read_text())
    assert len(manifest.shards) == data["num_shards"] == 5
    assert data["total_samples"] == sum(s["samples"] for s in data["shards"]) == 10
    assert data["total_bytes"] == sum(Path(u).stat().st_size for u in urls)
    for shard, url in zip(manifest.shards, urls, strict=True):
        assert Path(url).name == shard.name and sha256_file(Path(url)) == shard.sha256
        with tarfile.open(url) as tar:
            names = tar.getnames()
        keys = {n.split(".")[0] for n in names}
        assert sorted(names) == sorted(f"{k}.{e}" for k in keys for e in ("json", "mp4"))
    faults, summary = verify_shards(synthetic_shards)
    assert faults == [] and summary["samples"] == 10


def test_round_trip_carries_labels(synthetic_shards, synthetic_videos):
    expected = {}
    for line in (synthetic_videos / "labels.csv").read_text().splitlines()[1:]:
        name, label = line.split(",")
        expected[Path(name).stem] = int(label)
    loader = build_loader(
        DataConfig(shards=str(synthetic_shards), **TINY), batch_size=2, seed=0, rank=0, world_size=1
    )
    seen = {}
    for batch in (b for _, b in zip(range(5), loader, strict=False)):  # 5 batches of 2 = one epoch of 10
        assert batch["clips"].shape == (4, 3, 4, 32, 32)
        for key, label in zip(batch["keys"], batch["labels"], strict=True):
            seen[key.split("_", 1)[1]] = label
    assert seen == expected


def test_inputs_from_folder_csv_jsonl(tmp_path, synthetic_videos):
    listed = list_inputs(synthetic_videos)
    assert len(listed) == 10 and listed[0].source == "synthetic_00.mp4" and listed[0].label is None
    (tmp_path / "list.jsonl").write_text(
        "\n".join(
            json.dumps({"path": str(synthetic_videos / f"synthetic_0{i}.mp4"), "label": i}) for i in range(3)
        )
    )
    assert [i.label for i in list_inputs(tmp_path / "list.jsonl")] == [0, 1, 2]
    (tmp_path / "list.csv").write_text("a.mp4,cat\nsub/b.mp4\n")
    rows = list_inputs(tmp_path / "list.csv")
    assert [(r.source, r.label) for r in rows] == [("a.mp4", "cat"), ("sub/b.mp4", None)]
    assert rows[1].path == str(tmp_path / "sub/b.mp4")
    with pytest.raises(ShardBuildError, match="no such folder"):
        list_inputs(tmp_path / "nothing")


def test_rejects_and_determinism(tmp_path, synthetic_videos):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i in range(3):
        (inputs / f"ok{i}.mp4").write_bytes((synthetic_videos / f"synthetic_0{i}.mp4").read_bytes())
    (inputs / "broken.mp4").write_bytes(b"not a video at all" * 50)
    (inputs / "empty.mp4").write_bytes(b"")
    a = make_shards(inputs, tmp_path / "a", shard_bytes=1, progress=False, seed=3)
    b = make_shards(
        inputs, tmp_path / "b", shard_bytes=1, progress=False, seed=3, workers=2
    )  # worker processes
    assert a.to_dict() == b.to_dict() and len(a.shards) == 3 and a.rejects == 2
    rejects = [json.loads(line) for line in (tmp_path / "a" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["source"], r["reason"]) for r in rejects} == {
        ("broken.mp4", "undecodable"),
        ("empty.mp4", "empty_video"),
    }
    c = make_shards(inputs, tmp_path / "c", shard_bytes=1, progress=False, seed=4)
    assert [s.sha256 for s in c.shards] != [s.sha256 for s in a.shards]  # another seed, another order
    assert make_shards(inputs, tmp_path / "a", shard_bytes=1, progress=False, seed=3).to_dict() == a.to_dict()
    with pytest.raises(ShardBuildError, match="other inputs or options"):
        make_shards(inputs, tmp_path / "a", shard_bytes=1, progress=False, seed=5)


KILLER = """
import os, signal, sys
import mae_scale.data.shards as shards
from mae_scale.data.make_shards import main
closed, original = [], shards.ShardWriter.close
def close(self):
    if len(closed) == 2:                         # third shard: its .tmp is half written; die like kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    closed.append(1)
    return original(self)
shards.ShardWriter.close = close
main(sys.argv[1:])
"""


def test_killed_build_resumes_to_the_same_manifest(tmp_path, synthetic_videos):
    args = [str(synthetic_videos / "labels.csv"), "--max-samples-per-shard", "2", "--workers", "0", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", KILLER, *args, "--out", str(tmp_path / "r")], env=env)
    assert run.returncode == -9
    out = tmp_path / "r"
    assert not (out / "manifest.json").exists() and list(out.glob("shard-000002.tar.*.tmp"))
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert sorted(finished) == ["shard-000000.tar", "shard-000001.tar"]
    tool = [sys.executable, str(REPO / "tools" / "make_shards.py")]
    subprocess.run([*tool, *args, "--out", str(out)], check=True, env=env)
    straight = make_shards(
        synthetic_videos / "labels.csv", tmp_path / "straight", max_samples_per_shard=2, progress=False
    )
    assert json.loads((out / "manifest.json").read_text()) == straight.to_dict()
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # kept, not rewritten
    assert not list(out.glob("*.tmp")) and not (out / ".parts").exists()
    assert verify_shards(out)[0] == []


def test_demo_set_is_real_and_verifies(demo_shards):
    manifest, _ = read_manifest(demo_shards)
    assert len(manifest.shards) >= 4 and manifest.total_samples == len(DEMO_CLIPS)
    assert manifest.build["encode"]["max_short_side"] == 128
    faults, _ = verify_shards(demo_shards)
    assert faults == []


def test_demo_built_once_by_racing_processes(tmp_path):
    code = "import sys; from mae_scale.data.demo import ensure_demo_shards as e; print(e(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "demo")], env=env) for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert verify_shards(tmp_path / "demo")[0] == []
    assert ensure_demo_shards(tmp_path / "demo") == tmp_path / "demo"  # idempotent
    # a demo set an older version built, without the per-sample index, is rebuilt with it
    manifest_path = tmp_path / "demo" / "manifest.json"
    old = json.loads(manifest_path.read_text())
    for shard in old["shards"]:
        (tmp_path / "demo" / shard.pop("index")).unlink()
    manifest_path.write_text(json.dumps(old))
    assert not read_manifest(tmp_path / "demo")[0].indexed
    ensure_demo_shards(tmp_path / "demo")
    assert read_manifest(tmp_path / "demo")[0].indexed and verify_shards(tmp_path / "demo")[0] == []


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match="no manifest here"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": [{"name": "x.tar"}]}))
    with pytest.raises(ManifestError, match=r"manifest.json: shards\[0\] needs name, samples"):
        read_manifest(tmp_path)


def test_oversized_member_is_not_read(tmp_path):
    import io

    from mae_scale.data.shards import iter_tar

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in [
            ("a.mp4", b"x" * 5000),
            ("a.json", b"{}"),
            ("b.mp4", b"y" * 10),
            ("b.json", b"{}"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    samples = list(iter_tar(buf, max_member_bytes=1000))
    assert [(s.key, s.fault) for s in samples] == [("a", "member_too_large"), ("b", None)]
    assert "mp4" not in samples[0].members and samples[1].members["mp4"] == b"y" * 10


def test_a_node_with_other_encoder_versions_refuses_to_build(tmp_path, synthetic_videos):
    from mae_scale.data.decode import VideoLimits
    from mae_scale.data.make_shards import InputVideo, ShardTask, build_shard
    from mae_scale.data.shard_plan import tool_versions

    item = InputVideo(str(synthetic_videos / "synthetic_00.mp4"), "synthetic_00.mp4")
    task = ShardTask(str(tmp_path), "x-000000.tar", 0, ((0, item),), None, VideoLimits(), tool_versions())
    assert build_shard(task)["samples"] == 1
    other = {**tool_versions(), "libavcodec": "1.2.3"}
    with pytest.raises(ShardBuildError, match=r"libavcodec '1.2.3' in the plan, '[0-9.]+' here"):
        build_shard(ShardTask(str(tmp_path), "x-000001.tar", 1, ((0, item),), None, VideoLimits(), other))
    assert not (tmp_path / "x-000001.tar").exists()


def test_a_shard_build_returns_only_small_metadata(tmp_path, monkeypatch):
    """What crosses Ray's object store (or the pool's pipe) per shard: counts, hashes and rejects, as
    plain JSON, never video bytes (Ray Data holding videos in its store: ray #65544, #26441)."""
    import mae_scale.data.make_shards as builder
    from mae_scale.data.demo import demo_sources

    results, real = [], builder.build_shard
    monkeypatch.setattr(builder, "build_shard", lambda task: results.append(real(task)) or results[-1])
    out = tmp_path / "out"
    manifest = make_shards(demo_sources(), out, name="t", max_samples_per_shard=2, progress=False)
    assert len(results) == len(manifest.shards) == 2
    for result, shard in zip(sorted(results, key=lambda r: r["shard"]), manifest.shards, strict=True):
        text = json.dumps(result)  # raises on bytes: nothing but plain values
        assert result["samples"] == 2 and len(text) < 2048, text
        assert shard.bytes > 100 * len(text)  # the shard's videos stayed where the task wrote them
