"""The per-sample index of a shard: where each sample lies in its tar.

With it, a stream reads a contiguous run of samples from the middle of a shard with one seek (a
file) or one streamed range request (http; other fsspec URLs: one per 64 MiB) instead of reading
the shard from its start, so any number of streams can share any number of shards and the bytes
read per epoch stay those of the dataset. A sample's span runs from its first member's header (a
PAX header included) to the end of its last member's padded data; spans of consecutive samples
touch, so the bytes of a run of samples parse as a tar stream on their own.

The index of `NAME.tar` is a small JSON file, `NAME.tar.idx.json` by default, written beside it by
`ShardWriter` (or by `tools/index_shards.py` for shards other tools made); the manifest names it
per shard (`ShardInfo.index`, relative to the manifest's folder). `scan_tar` rebuilds it from the
tar's headers alone, which is how `verify_shards` checks it.

The file: `{"version": 1, "shard": NAME.tar, "bytes": tar size, "samples": [[key, offset, length,
frames], ...]}`, one row per sample in tar order; `frames` may be null. The loader (reader.py)
reads it only for shards a stream reads part of, checks that it fits the manifest (name, size,
count) and that every sample read has the key the index gives; an index that does not fit is
noted (`bad_index`) and the shard read from its start instead.
"""

from __future__ import annotations

import functools
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

INDEX_VERSION = 1
INDEX_SUFFIX = ".idx.json"
BLOCK = tarfile.BLOCKSIZE  # 512


class ShardIndexError(ValueError):
    """An index that does not fit its shard; the message names the file and what is wrong."""


def index_name(shard_name: str) -> str:
    return shard_name + INDEX_SUFFIX


@dataclass(frozen=True)
class SampleSpan:
    key: str
    offset: int  # byte offset of the sample's first header block in the tar
    length: int  # bytes up to the end of its last member's data, padded to 512
    frames: int | None = None  # decodable frames when known (our JSON has them; index_shards probes)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ShardIndex:
    shard: str  # the tar's name
    bytes: int  # the tar's size
    samples: tuple[SampleSpan, ...]

    @functools.cached_property
    def frames_by_key(self) -> dict[str, int | None]:
        return {s.key: s.frames for s in self.samples}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": INDEX_VERSION,
            "shard": self.shard,
            "bytes": self.bytes,
            # one compact row per sample: [key, offset, length, frames]
            "samples": [[s.key, s.offset, s.length, s.frames] for s in self.samples],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ShardIndex:
        if not isinstance(d, dict) or d.get("version") != INDEX_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise ShardIndexError(f"{where}: 'version' is {got!r}, this code reads {INDEX_VERSION}")
        try:
            spans = tuple(
                SampleSpan(str(k), int(o), int(n), None if f is None else int(f))
                for k, o, n, f in d["samples"]
            )
            index = cls(str(d["shard"]), int(d["bytes"]), spans)
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardIndexError(
                f"{where}: needs shard, bytes and samples of [key, offset, length, frames] ({exc!r})"
            ) from exc
        index.check(where)
        return index

    def check(self, where: str) -> None:
        """Spans must tile the tar in order: each starts where the previous ended, all inside it."""
        pos = 0
        for i, s in enumerate(self.samples):
            if s.offset < pos or s.length <= 0 or s.offset % BLOCK or s.end > self.bytes:
                raise ShardIndexError(
                    f"{where}: samples[{i}] ({s.key!r}) spans [{s.offset}, {s.end}), which does not follow "
                    f"the previous sample (ending at {pos}) inside the {self.bytes}-byte tar"
                )
            pos = s.end


def write_index(path: Path, index: ShardIndex, tmp_suffix: str = ".tmp") -> None:
    from mae_scale.data.shards import write_json_atomic

    write_json_atomic(Path(path), index.to_dict(), indent=None, tmp_suffix=tmp_suffix)


def read_index(location: str, open_fn=None) -> ShardIndex:
    """Load the index at a path or URL (read with `open_fn`, by default `shards.open_shard`)."""
    from mae_scale.data.shards import open_shard

    try:
        with (open_fn or open_shard)(location) as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise ShardIndexError(f"{location}: cannot read the shard index ({exc})") from exc
    return ShardIndex.from_dict(data, location)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


class SpanRecorder:
    """Builds spans from (key, member start offset, member end offset) in tar order."""

    def __init__(self) -> None:
        self.spans: list[SampleSpan] = []
        self._key: str | None = None
        self._start = self._end = 0
        self._frames: int | None = None

    def member(self, key: str, start: int, end: int, frames: int | None = None) -> None:
        if key != self._key:
            self._flush()
            self._key, self._start, self._frames = key, start, None
        self._end = end
        self._frames = frames if frames is not None else self._frames

    def finish(self) -> list[SampleSpan]:
        self._flush()
        return self.spans

    def _flush(self) -> None:
        if self._key is not None:
            self.spans.append(SampleSpan(self._key, self._start, self._end - self._start, self._frames))
            self._key = None


def scan_tar(fileobj: IO[bytes], frames: Iterable[tuple[str, int]] = ()) -> list[SampleSpan]:
    """The spans of a tar, from its headers alone: member data is seeked over in a seekable file,
    read and dropped in a stream (a `pipe:` source).

    Members are grouped into samples as webdataset groups them (consecutive members sharing a key).
    `frames`: known frame counts by key. Raises `tarfile.TarError` on a corrupt or truncated tar.
    """
    from mae_scale.data.shards import split_key

    known = dict(frames)
    seekable = getattr(fileobj, "seekable", lambda: False)()
    size = fileobj.seek(0, 2) if seekable else None
    if seekable:
        fileobj.seek(0)
    recorder = SpanRecorder()
    with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, _ = split_key(info.name)
            if key is None:
                continue
            end = info.offset_data + _padded(info.size)
            if size is not None and end > size:
                raise tarfile.ReadError(f"{info.name}: its data ends at byte {end}, past the tar's {size}")
            recorder.member(key, info.offset, end, known.get(key))
    return recorder.finish()
