"""The loader's partition on real shards: every sample once per epoch at any ranks x workers, bytes
read (counted by the shard readers) about the data's, the index path and the path without one,
stale indices, and exact elastic resume of the loader itself (the main job's is in test_resume.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from mae_scale.config import DataConfig
from mae_scale.data import reader as reader_module
from mae_scale.data import source
from mae_scale.data.index import read_index, write_index
from mae_scale.data.loader import DataStateError, build_loader
from mae_scale.data.make_shards import make_shards
from mae_scale.data.reader import ReadCounts, ShardReader
from mae_scale.data.shards import read_manifest, write_json_atomic
from mae_scale.data.stream import ClipStream
from mae_scale.data.verify import verify_shards

TINY = dict(num_frames=4, stride=2, size=32, repeats=1, shuffle_buffer=4)


def cfg(shards, **kw) -> DataConfig:
    return DataConfig(shards=str(shards), **{**TINY, **kw})


def read_epoch(
    shards, ranks: int, workers: int, epoch: int = 0, seed: int = 0, faults: bool = False
) -> tuple[list[list[str]], ReadCounts]:
    """Every stream's keys in `epoch` (tar reads, no decoding) and what the readers fetched for them;
    `faults`: a lost sample's entry is "!reason: detail" (else a fault's key, often "")."""
    counts = ReadCounts()
    streams = []
    for rank in range(ranks):
        loader = build_loader(
            cfg(shards, workers=workers), batch_size=1, seed=seed, rank=rank, world_size=ranks
        )
        stream = ClipStream(loader.spec, [(0, 0)] * max(1, workers))
        reader = ShardReader(counts, loader.spec.max_member_bytes)
        for slot in loader.slots:
            items = stream.epoch_items(slot, epoch, reader=reader)
            streams.append(
                [f"!{i.raw.fault}: {i.raw.detail}" if faults and i.raw.fault else i.raw.key for i in items]
            )
    return streams, counts


def all_keys(shards) -> list[str]:
    manifest, urls = read_manifest(shards)
    return sorted(
        s.key for s in (read_index(str(Path(shards) / i.index)) for i in manifest.shards) for s in s.samples
    )


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, synthetic_videos) -> Path:
    """The 10 synthetic videos in 2 shards of 5: fewer shards than most stream counts below."""
    out = tmp_path_factory.mktemp("two_shards")
    make_shards(synthetic_videos / "labels.csv", out, name="two", max_samples_per_shard=5, progress=False)
    return out


def without_index(src: Path, dst: Path) -> Path:
    """A copy of a shard set as older tools wrote it: no index files, none named in the manifest."""
    dst.mkdir()
    for tar in src.glob("*.tar"):
        shutil.copy(tar, dst)
    data = json.loads((src / "manifest.json").read_text())
    for s in data["shards"]:
        s.pop("index")
    write_json_atomic(dst / "manifest.json", data)
    return dst


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [1, 2])
def test_demo_every_sample_once_per_epoch_reading_the_data_once(demo_shards, ranks, workers):
    manifest, _ = read_manifest(demo_shards)
    for epoch in (0, 1):
        streams, counts = read_epoch(demo_shards, ranks, workers, epoch)
        keys = [k for s in streams for k in s]
        assert sorted(keys) == all_keys(demo_shards)  # every sample, once
        assert max(map(len, streams)) - min(map(len, streams)) <= 1
        assert (counts.bytes + counts.index_bytes) / manifest.total_bytes <= 1.05


@pytest.mark.parametrize("streams", [1, 2, 3, 4, 7])
def test_streams_start_mid_shard_with_the_index(two_shards, tmp_path, streams):
    """2 shards of 5 for up to 7 streams: ranges start inside shards, read as byte ranges; the same
    set without an index gives the same samples, reading each shard from its start."""
    manifest, _ = read_manifest(two_shards)
    indexed, counts = read_epoch(two_shards, streams, 1)
    assert sorted(k for s in indexed for k in s) == all_keys(two_shards)
    assert (counts.bytes + counts.index_bytes) / manifest.total_bytes <= 1.05
    shard_of = {
        span.key: s.name for s in manifest.shards for span in read_index(str(two_shards / s.index)).samples
    }
    touched = sum(len({shard_of[k] for k in keys}) for keys in indexed)
    assert counts.opens == touched  # one run (one open and one seek) per shard a stream touches
    old = without_index(two_shards, tmp_path / "old")
    plain, blind = read_epoch(old, streams, 1)
    assert plain == indexed  # the same samples in the same order, whichever way they were read
    assert blind.index_bytes == 0 and blind.bytes / manifest.total_bytes <= max(2, math.ceil(streams / 2))
    if streams > 2:
        assert blind.bytes > counts.bytes  # the streams that start mid-shard read its first part too


def test_real_worker_processes_split_the_demo_epoch(demo_shards):
    """4 ranks x 2 workers (DataLoader processes) over the 4 demo videos: fewer samples than streams,
    yet every rank yields, and epoch 0's samples come out once over all ranks."""
    seen: list[str] = []
    for rank in range(4):
        loader = build_loader(cfg(demo_shards, workers=2), batch_size=1, seed=3, rank=rank, world_size=4)
        batches = [b for _, b in zip(range(4), loader, strict=False)]
        assert len(batches) == 4  # no stream waits forever, although half are empty in each epoch
        seen += [b["keys"][0] for b in batches if b["epoch"] == 0]
        assert loader.stats()["bytes_read"] > 0  # the readers' counts travel with the batches
    assert sorted(seen) == all_keys(demo_shards)


def test_old_shard_sets_load_with_a_warning_naming_the_read_factor(two_shards, tmp_path, caplog):
    old = without_index(two_shards, tmp_path / "old")
    with caplog.at_level(logging.WARNING, logger="mae_scale.data.loader"):
        loader = build_loader(cfg(old, workers=1), batch_size=2, seed=0, rank=0, world_size=4)
    [line] = [r.getMessage() for r in caplog.records if "per-sample index" in r.getMessage()]
    assert "2 of 2 shards have no per-sample index" in line and "tools/index_shards.py" in line
    _, blind = read_epoch(old, 4, 1)
    measured = blind.bytes / read_manifest(old)[0].total_bytes  # 4 streams, 2 of which start mid-shard
    said = float(re.search(r"an epoch at 4 streams reads about ([0-9.]+)x the data", line)[1])
    # the estimate takes samples of a shard as equal in size; the parser reads up to 10 KiB ahead
    assert 1.2 < measured < said + 0.2 and said == pytest.approx(1.4), (said, measured)
    assert len(next(iter(loader))["keys"]) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mae_scale.data.loader"):
        build_loader(cfg(two_shards, workers=1), batch_size=2, seed=0, rank=0, world_size=4)
    assert not [r for r in caplog.records if "index" in r.getMessage()]


def test_pipe_sources_read_only_the_shards_they_need(two_shards, caplog):
    manifest, _ = read_manifest(two_shards)
    with caplog.at_level(logging.WARNING, logger="mae_scale.data.loader"):
        streams, counts = read_epoch(f"pipe:cat {two_shards}/manifest.json", 4, 1)
    assert "cannot seek (pipe:" in caplog.text
    assert sorted(k for s in streams for k in s) == all_keys(two_shards)
    assert counts.index_bytes == 0 and counts.bytes / manifest.total_bytes <= math.ceil(4 / 2)
    assert counts.opens == 4  # each of the 4 streams' ranges lies in one shard: 4 opens, not 4 x 2


def stale(src: Path, dst: Path) -> Path:
    """A copy whose first shard's index swaps the keys of its samples 1 and 2 (a stale index)."""
    shutil.copytree(src, dst)
    manifest, _ = read_manifest(dst)
    path = dst / manifest.shards[0].index
    index = read_index(str(path))
    spans = list(index.samples)
    a, b = spans[1], spans[2]
    spans[1], spans[2] = (
        a.__class__(b.key, a.offset, a.length, a.frames),
        b.__class__(a.key, b.offset, b.length, b.frames),
    )
    write_index(path, index.__class__(index.shard, index.bytes, tuple(spans)))
    return dst


def test_a_stale_index_is_noted_and_the_shard_read_from_its_start(two_shards, tmp_path):
    bad = stale(two_shards, tmp_path / "stale")
    streams, counts = read_epoch(bad, 4, 1)
    good, _ = read_epoch(two_shards, 4, 1)
    assert streams == good  # the tar's truth, not the index's
    assert counts.notes["bad_index"] >= 1 and "is not" in counts.examples["bad_index"]


def test_a_truncated_local_shard_costs_its_lost_samples_at_once_without_retries(two_shards, tmp_path):
    """A tar cut short after its index was written: the samples past the cut are faults, named by
    the index; a file that ends early is not asked again (retries are for sources that fail)."""
    cut = tmp_path / "cut"
    shutil.copytree(two_shards, cut)
    manifest, _ = read_manifest(cut)
    victim = cut / manifest.shards[0].name
    victim.write_bytes(victim.read_bytes()[:9000])  # two whole samples of five, and part of a third
    streams, counts = read_epoch(cut, 4, 1, faults=True)
    lost = [k for keys in streams for k in keys if k.startswith("!")]
    assert len(lost) == 3 and all(k.startswith("!bad_tar") for k in lost), lost
    assert "retried_read" not in counts.notes


def test_verify_checks_each_index_against_its_tar(two_shards, tmp_path):
    assert verify_shards(two_shards, decode=False)[0] == []
    bad = stale(two_shards, tmp_path / "stale")
    manifest, _ = read_manifest(bad)
    true_key = read_index(str(two_shards / manifest.shards[0].index)).samples[1].key
    [fault] = verify_shards(bad, decode=False)[0]
    assert (fault.shard, fault.key, fault.reason) == (manifest.shards[0].name, true_key, "index_mismatch")
    assert "samples[1]" in fault.detail
    (bad / manifest.shards[1].index).unlink()
    reasons = Counter(f.reason for f in verify_shards(bad, decode=False)[0])
    assert reasons == {"index_mismatch": 1, "bad_index": 1}
    data = json.loads((two_shards / "manifest.json").read_text())
    data["shards"][0]["samples"] = 4  # the index now lists more samples than the manifest
    copy = tmp_path / "count"
    shutil.copytree(two_shards, copy)
    write_json_atomic(copy / "manifest.json", {k: v for k, v in data.items() if not k.startswith("total")})
    reasons = {f.reason for f in verify_shards(copy, decode=False)[0]}
    assert "index_mismatch" in reasons and "count_mismatch" in reasons


# -- elastic resume of the loader (in process) --------------------------------------------------------


def loaders(shards, ranks: int, workers: int) -> list:
    """One loader per rank; 1 worker runs in process (the same stream as one worker process)."""
    config = cfg(shards, workers=0 if workers == 1 else workers)
    return [build_loader(config, batch_size=1, seed=0, rank=r, world_size=ranks) for r in range(ranks)]


def keys_by_epoch(run, batches: int) -> list[dict[int, list[str]]]:
    """Per loader (rank): the keys of its first `batches` batches, by the epoch of each (batches of 1)."""
    out = []
    for loader in run:
        seen: dict[int, list[str]] = {}
        for _, batch in zip(range(batches), loader, strict=False):
            seen.setdefault(batch["epoch"], []).append(batch["keys"][0])
        out.append(seen)
    return out


@pytest.mark.parametrize("chain", [[(2, 2), (1, 1)], [(1, 1), (3, 1)], [(2, 1), (3, 2), (1, 2)]])
def test_elastic_resume_of_the_loader_trains_every_sample_once(synthetic_shards, chain):
    """(ranks, workers) change mid-epoch, once or twice (10 samples, batches of 1): over the runs
    every sample of epoch 0 once; the next epoch gives each rank what a fresh run at the last size does."""
    epoch0: list[str] = []
    states = None
    for ranks, workers in chain[:-1]:
        run = loaders(synthetic_shards, ranks, workers)
        for loader in run:
            if states is not None:
                loader.load_elastic(states)
        for seen in keys_by_epoch(run, 2):
            assert set(seen) == {0}, "the test must stop inside epoch 0"
            epoch0 += seen[0]
        states = [loader.state_dict() for loader in run]
    assert any(0 < c for s in states for _, c in s["positions"])
    ranks, workers = chain[-1]
    resumed = loaders(synthetic_shards, ranks, workers)
    for loader in resumed:
        assert loader.load_elastic(states) == len(states)
    after = keys_by_epoch(resumed, 30)
    fresh = keys_by_epoch(loaders(synthetic_shards, ranks, workers), 30)
    assert sorted(epoch0 + [k for seen in after for k in seen.get(0, [])]) == all_keys(synthetic_shards)
    for mine, theirs in zip(after, fresh, strict=True):
        assert sorted(mine[1]) == sorted(theirs[1])  # per rank: its streams' epoch 1 as a fresh run's


def test_elastic_resume_refuses_an_incomplete_set_of_states(synthetic_shards):
    old = loaders(synthetic_shards, 2, 1)
    keys_by_epoch(old, 2)
    new = loaders(synthetic_shards, 1, 1)[0]
    with pytest.raises(DataStateError, match=r"one state per old rank.*ranks \[1\]"):
        new.load_elastic([old[1].state_dict()])
    with pytest.raises(DataStateError, match="shuffle_buffer"):
        new.load_state_dict({**old[0].state_dict(), "world_size": 1, "shuffle_buffer": 9})
    assert new.fits(old[0].state_dict()) is False and old[0].fits(old[0].state_dict()) is True


# -- shards over http(s): byte ranges through fsspec, from a real local server ------------------------

SERVER = Path(__file__).resolve().parent / "scripts" / "http_server.py"


@contextlib.contextmanager
def http_server(root: Path, log: Path, *, plain: bool = False, **faults: Sequence[str]):
    """A real HTTP server on 127.0.0.1, for this block only: the standard library's with byte ranges
    and `faults` (drops=, stalls=, drop_first=: tests/scripts/http_server.py), or `plain`: the bare
    `python -m http.server`, which answers a range request with the whole file."""
    if plain:
        cmd = [sys.executable, "-u", "-c", PLAIN_SERVER, str(root)]
    else:
        cmd = [sys.executable, str(SERVER), str(root), "--log", str(log)]
        flag = {"drops": "--drop", "stalls": "--stall", "drop_first": "--drop-first"}
        cmd += [f"{flag[kind]}={d}" for kind, ds in faults.items() for d in ds]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


PLAIN_SERVER = """
import functools, http.server, sys
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def requests(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(reader_module, "RETRY_WAIT_S", 0.01)


def test_http_shards_are_read_in_byte_ranges_each_sample_once(two_shards, tmp_path, monkeypatch):
    manifest, _ = read_manifest(two_shards)
    log = tmp_path / "requests.jsonl"
    for chunk in ("HTTP_CHUNK", "RANGE_CHUNK"):  # runs of many chunks: still one GET each
        monkeypatch.setattr(source, chunk, 512)
    with http_server(two_shards, log) as url:
        streams, counts = read_epoch(f"{url}/manifest.json", 4, 1)
        assert sorted(k for s in streams for k in s) == all_keys(two_shards)
        assert (counts.bytes + counts.index_bytes) / manifest.total_bytes <= 1.05
        tar_gets = [r for r in requests(log) if r["method"] == "GET" and r["path"].endswith(".tar")]
        assert counts.bytes / counts.opens > 10 * source.HTTP_CHUNK
        assert len(tar_gets) == counts.opens == 4  # one streamed range request per run, whatever its size
        assert not [r for r in requests(log) if r["method"] == "HEAD"]
        assert all(r["range"] and r["range"].startswith("bytes=") for r in tar_gets)
        starts = {int(r["range"][6:].split("-")[0]) for r in tar_gets}
        assert any(s > 0 for s in starts)  # streams that start mid-shard ask for the middle of the tar
        # real worker processes (fsspec's event loop after fork): 2 ranks x 2 workers, epoch 0 once
        seen = []
        for rank in range(2):
            loader = build_loader(
                cfg(f"{url}/manifest.json", workers=2),
                batch_size=1,
                seed=0,
                rank=rank,
                world_size=2,
                timeout_s=120,
            )
            seen += [b["keys"][0] for _, b in zip(range(8), loader, strict=False) if b["epoch"] == 0]
        assert sorted(seen) == all_keys(two_shards)


def test_a_server_dropping_the_connection_mid_shard_is_a_counted_fault(two_shards, tmp_path, quick_retries):
    manifest, _ = read_manifest(two_shards)
    victim = manifest.shards[0].name
    with http_server(two_shards, tmp_path / "log.jsonl", drops=[f"{victim}:3000"]) as url:
        loader = build_loader(
            cfg(f"{url}/manifest.json", workers=1, max_bad_ratio=1.0),
            batch_size=1,
            seed=0,
            rank=0,
            world_size=2,
            timeout_s=120,
        )
        batches = [b for _, b in zip(range(6), loader, strict=False)]
    stats = loader.stats()
    assert batches and stats["bad"].get("bad_tar", 0) >= 1, stats
    assert victim in stats["examples"]["bad_tar"] and url in stats["examples"]["bad_tar"]
    good = {s.key for s in read_index(str(two_shards / manifest.shards[1].index)).samples}
    assert {b["keys"][0] for b in batches} <= good  # what trains comes from the shard still served


@pytest.mark.parametrize("streams", [1, 4])  # a whole-shard GET, ranged GETs of runs mid-shard
def test_a_server_that_stalls_mid_shard_is_a_counted_fault_not_a_hang(
    two_shards, tmp_path, monkeypatch, streams, quick_retries
):
    """A GET that sends part of a run and then nothing, with the connection held open: the read times
    out (`source.HTTP_TIMEOUT_S`, shortened here), is asked again (RETRIES, 1 here), stalls again,
    and its samples are counted as faults; the epoch goes on with the other shard."""
    manifest, _ = read_manifest(two_shards)
    victim = manifest.shards[0].name
    monkeypatch.setattr(source, "HTTP_TIMEOUT_S", {"sock_connect": 5.0, "sock_read": 1.0})
    monkeypatch.setattr(reader_module, "RETRIES", 1)
    log = tmp_path / "log.jsonl"
    with http_server(two_shards, log, stalls=[f"{victim}:3000"]) as url:
        stream_keys, counts = read_epoch(f"{url}/manifest.json", streams, 1, faults=True)
    lost = [k for keys in stream_keys for k in keys if k.startswith("!")]
    assert len(lost) == manifest.shards[0].samples and all("bad_tar" in k for k in lost), stream_keys
    kept = sorted(k for keys in stream_keys for k in keys if not k.startswith("!"))
    assert kept == sorted(s.key for s in read_index(str(two_shards / manifest.shards[1].index)).samples)
    assert any(victim in k and "Timeout" in k for k in lost), lost[:1]
    gets = [r for r in requests(log) if r["method"] == "GET" and r["path"].endswith(victim)]
    assert counts.notes["retried_read"] >= 1 and len(gets) >= 2 and any(r["range"] for r in gets)


# whole shards (a GET without a range; tarfile takes 10,240-byte records), or runs mid-shard
@pytest.mark.parametrize(("streams", "drop_at"), [(1, 12_000), (4, 5000)])
def test_a_dropped_connection_is_asked_again_from_the_sample_it_stopped_at(
    two_shards, tmp_path, streams, drop_at, quick_retries
):
    """The first GET of a shard dies mid-shard (a blip): the reader asks again with a range
    from the first sample it has not read, and the epoch loses nothing."""
    manifest, _ = read_manifest(two_shards)
    victim = manifest.shards[0].name
    log = tmp_path / "log.jsonl"
    with http_server(two_shards, log, drop_first=[f"{victim}:{drop_at}"]) as url:
        stream_keys, counts = read_epoch(f"{url}/manifest.json", streams, 1, faults=True)
    assert sorted(k for keys in stream_keys for k in keys) == all_keys(two_shards)
    assert counts.notes["retried_read"] == 1, counts.notes
    gets = [r for r in requests(log) if r["method"] == "GET" and r["path"].endswith(victim)]
    # the retry is a range from a sample's first byte: the first one the dropped GET did not bring
    # (aiohttp may drop what it had buffered when the connection broke, so it can be sample 0)
    offsets = {span.offset for span in read_index(str(two_shards / manifest.shards[0].index)).samples}
    assert gets[1]["range"] and int(gets[1]["range"][6:].split("-")[0]) in offsets


@pytest.mark.parametrize("streams", [1, 4])
def test_a_connection_that_keeps_dropping_costs_only_the_samples_not_read(
    two_shards, tmp_path, streams, quick_retries
):
    """Every GET of a shard dies after 3,000 bytes: after RETRIES more requests per run the samples
    not read are faults (named by the index), the others train; no hang, no crash."""
    manifest, _ = read_manifest(two_shards)
    victim = manifest.shards[0].name
    with http_server(two_shards, tmp_path / "log.jsonl", drops=[f"{victim}:3000"]) as url:
        stream_keys, counts = read_epoch(f"{url}/manifest.json", streams, 1, faults=True)
    lost = [k for keys in stream_keys for k in keys if k.startswith("!")]
    kept = {k for keys in stream_keys for k in keys if not k.startswith("!")}
    assert lost and all(k.startswith("!bad_tar") and victim in k for k in lost), lost
    assert len(lost) + len(kept) == manifest.total_samples and kept <= set(all_keys(two_shards))
    assert counts.notes["retried_read"] >= reader_module.RETRIES


def test_a_server_without_range_requests_is_read_from_the_start(two_shards, tmp_path):
    """`python -m http.server` answers a range request with 200 and the whole file: the reader notes
    it once for the host and reads that host's shards from their start; every sample once."""
    manifest, _ = read_manifest(two_shards)
    with http_server(two_shards, tmp_path / "log.jsonl", plain=True) as url:
        stream_keys, counts = read_epoch(f"{url}/manifest.json", 4, 1)
    assert sorted(k for keys in stream_keys for k in keys) == all_keys(two_shards)
    assert counts.notes["no_range_requests"] >= 1 and url in counts.examples["no_range_requests"]
    assert counts.bytes > manifest.total_bytes * 1.05  # streams that start mid-shard read its first part


def test_a_url_backend_without_streaming_reads_a_run_in_bounded_range_requests(monkeypatch):
    """Backends other than http (here fsspec's in-memory one) take ranges with `cat_file`, at most
    RANGE_CHUNK bytes each: ceil(run / chunk) requests and exactly the run's bytes."""
    import fsspec

    fs = fsspec.filesystem("memory")
    data = bytes(range(256)) * 100  # 25,600 bytes
    fs.pipe_file("/mae_scale_test/shard.tar", data)
    calls = []
    real = type(fs).cat_file
    monkeypatch.setattr(type(fs), "cat_file", lambda self, *a, **kw: calls.append(kw) or real(self, *a, **kw))
    monkeypatch.setattr(source, "RANGE_CHUNK", 4096)
    seen = []
    with source.open_range("memory://mae_scale_test/shard.tar", 1000, 21000, seen.append) as f:
        assert f.read() == data[1000:21000]
    assert len(calls) == math.ceil(20000 / 4096) and sum(seen) == 20000
    fs.rm("/mae_scale_test", recursive=True)


def test_a_same_size_resume_inside_an_elastic_window_is_exact(synthetic_shards):
    """Elastic 2 -> 1 ranks, then saved and resumed at 1 rank while still inside the resumed epoch:
    the batches continue exactly (the window is recomputed from the saved history); once the
    streams have left the window the saved state drops the history."""
    old = loaders(synthetic_shards, 2, 2)
    keys_by_epoch(old, 1)
    states = [loader.state_dict() for loader in old]
    straight = loaders(synthetic_shards, 1, 1)[0]
    straight.load_elastic(states)
    it = iter(straight)
    next(it)
    saved = straight.state_dict()
    assert saved["history"] and saved["epoch"] == 0
    tail = [next(it)["keys"] for _ in range(12)]
    resumed = loaders(synthetic_shards, 1, 1)[0]
    resumed.load_state_dict(saved)
    assert [b["keys"] for _, b in zip(range(12), resumed, strict=False)] == tail
    assert resumed.state_dict()["epoch"] >= 1 and resumed.state_dict()["history"] == []
