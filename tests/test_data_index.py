"""The per-sample shard index: written by ShardWriter, equal to a header scan, and byte ranges of it
parse as tar streams holding exactly the samples they name."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from mae_scale.data.index import SampleSpan, ShardIndex, ShardIndexError, read_index, scan_tar
from mae_scale.data.shards import Manifest, ShardWriter, iter_tar, read_manifest


def test_make_shards_writes_an_index_equal_to_a_header_scan(synthetic_shards):
    manifest, urls = read_manifest(synthetic_shards)
    assert manifest.indexed
    for shard, url in zip(manifest.shards, urls, strict=True):
        assert shard.index == shard.name + ".idx.json"
        index = read_index(str(synthetic_shards / shard.index))
        assert index.shard == shard.name and index.bytes == shard.bytes
        assert len(index.samples) == shard.samples
        with open(url, "rb") as f:
            scanned = scan_tar(f, [(s.key, s.frames) for s in index.samples])
        assert tuple(scanned) == index.samples
        with open(url, "rb") as f:
            frames = {s.key: json.loads(s.members["json"])["frames"] for s in iter_tar(f)}
        assert {s.key: s.frames for s in index.samples} == frames


def _shard(tmp_path, keys, size=1000):
    writer = ShardWriter(tmp_path / "x-000000.tar")
    for i, key in enumerate(keys):
        writer.add(
            key, {"mp4": bytes([i % 251]) * (size + 37 * i), "json": b'{"frames": %d}' % (i + 1)}, i + 1
        )
    return writer.close()


def test_every_byte_range_of_whole_samples_parses_as_exactly_those_samples(tmp_path):
    # a key over 100 characters needs a PAX header before its member: the span must start there
    keys = ["a", "k" * 150, "c", "d" * 120, "e"]
    info = _shard(tmp_path, keys)
    data = (tmp_path / info.name).read_bytes()
    index = read_index(str(tmp_path / info.index))
    assert [s.key for s in index.samples] == keys and index.samples[-1].end < len(data)  # end blocks follow
    assert index.samples[1].length > index.samples[0].length + 512  # the PAX header is inside the span
    whole = {s.key: s.members for s in iter_tar(io.BytesIO(data))}
    for i in range(len(keys)):
        for j in range(i, len(keys)):
            part = data[index.samples[i].offset : index.samples[j].end]
            got = list(iter_tar(io.BytesIO(part)))
            assert [s.key for s in got] == keys[i : j + 1], (i, j)
            assert all(s.fault is None and s.members == whole[s.key] for s in got)


def test_a_bad_index_is_refused_naming_the_file_and_sample(tmp_path):
    info = _shard(tmp_path, ["a", "b", "c"])
    path = tmp_path / info.index
    good = json.loads(path.read_text())
    for change, needle in [
        (lambda d: d["samples"][1].__setitem__(1, d["samples"][0][1]), "samples[1] ('b')"),  # overlaps a
        (lambda d: d["samples"][2].__setitem__(2, 10**9), "samples[2] ('c')"),  # past the tar's end
        (lambda d: d.__setitem__("version", 7), "'version' is 7"),
        (lambda d: d["samples"][0].pop(), "needs shard, bytes and samples"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(ShardIndexError) as err:
            read_index(str(path))
        assert str(path) in str(err.value) and needle in str(err.value)


def test_scan_of_a_truncated_tar_raises(tmp_path):
    info = _shard(tmp_path, ["a", "b", "c"], size=5000)
    data = (tmp_path / info.name).read_bytes()
    cut = read_index(str(tmp_path / info.index)).samples[2].offset + 1024
    with pytest.raises(tarfile.TarError):
        scan_tar(io.BytesIO(data[:cut]))


def test_manifests_without_an_index_still_load_with_the_same_identity(synthetic_shards):
    data = json.loads((synthetic_shards / "manifest.json").read_text())
    indexed = Manifest.from_dict(data, "m")
    for s in data["shards"]:
        del s["index"]
    old = Manifest.from_dict(data, "m")
    assert indexed.indexed and not old.indexed
    assert old.fingerprint() == indexed.fingerprint()  # resume positions stay valid
    assert "index" not in json.dumps(old.to_dict()["shards"])


def test_span_end():
    assert SampleSpan("k", 512, 1024).end == 1536
    ShardIndex("s", 2048, (SampleSpan("a", 0, 1024), SampleSpan("b", 1024, 1024))).check("here")
