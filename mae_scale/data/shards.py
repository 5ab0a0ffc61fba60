"""The shard format: WebDataset tars of `KEY.mp4` + `KEY.json`, and the manifest that lists them.

The manifest (`manifest.json` beside the shards) is what epoch length, verification and resume
positions rely on: every shard's name, sample count, byte size and sha256, plus totals. Shards are
written to `NAME.tar.tmp` and renamed when complete, so a killed writer never leaves a half shard
that looks finished. Reading is streaming (any webdataset URL, `pipe:` commands included) and
reports tar-level faults as items instead of raising, so one bad shard never stops a run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MEMBERS = ("mp4", "json")  # what a sample of ours holds (make_shards writes these; verify_shards checks them)
# Video members the loader reads, in order of preference: shards that other tools wrote (adopted with
# tools/index_shards.py) may hold any of these; `KEY.json` is read too. Nothing else is ever read, let
# alone unpickled.
VIDEO_MEMBERS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
MAX_MEMBER_BYTES = 2 << 30  # a tar header can claim any size: never read such a member into memory


class ManifestError(ValueError):
    """A manifest that is missing or malformed; the message names the file and the key."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    index: str = ""  # its per-sample index (index.py), relative to the manifest's folder; "" if none
    url: str = ""  # where the tar is when not beside the manifest (an adopted shard): a path or URL

    def identity(self) -> dict[str, Any]:
        """What the data is (the index only says where it lies): resume positions are tied to this."""
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256}

    def to_dict(self) -> dict[str, Any]:
        """The manifest's entry: the identity, plus `index` and `url` where they are set."""
        return {**self.identity(), **{k: v for k, v in (("index", self.index), ("url", self.url)) if v}}


@dataclass
class Manifest:
    shards: list[ShardInfo]
    name: str = "shard"
    rejects: int = 0  # inputs that went to rejects.jsonl instead of a shard
    build: dict[str, Any] = field(default_factory=dict)  # make_shards options and input fingerprint

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def indexed(self) -> bool:
        """Every shard has a per-sample index, so streams can start mid-shard."""
        return all(s.index for s in self.shards)

    def fingerprint(self) -> str:
        """Identity of the data (shard names, counts, hashes): a resume position is only valid for it."""
        text = json.dumps([s.identity() for s in self.shards], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "name": self.name,
            "num_shards": len(self.shards),
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "rejects": self.rejects,
            "shards": [s.to_dict() for s in self.shards],
            "build": self.build,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("version") != MANIFEST_VERSION:
            raise ManifestError(
                f"{where}: 'version' is {d.get('version')!r}, this code reads {MANIFEST_VERSION}"
            )
        if not isinstance(d.get("shards"), list) or not d["shards"]:
            raise ManifestError(f"{where}: 'shards' must be a non-empty list")
        shards = []
        for i, s in enumerate(d["shards"]):
            try:
                info = ShardInfo(
                    str(s["name"]),
                    int(s["samples"]),
                    int(s["bytes"]),
                    str(s["sha256"]),
                    str(s.get("index", "")),
                    str(s.get("url", "")),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ManifestError(
                    f"{where}: shards[{i}] needs name, samples, bytes, sha256 ({exc!r})"
                ) from exc
            if info.samples < 0 or info.bytes < 0:
                raise ManifestError(f"{where}: shards[{i}] ({info.name}) has a negative count")
            shards.append(info)
        manifest = cls(
            shards, str(d.get("name", "shard")), int(d.get("rejects", 0)), dict(d.get("build", {}))
        )
        for key, value in (("total_samples", manifest.total_samples), ("total_bytes", manifest.total_bytes)):
            if key in d and d[key] != value:
                raise ManifestError(f"{where}: '{key}' is {d[key]} but the shards sum to {value}")
        return manifest


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def open_shard(url: str) -> IO[bytes]:
    """A readable stream for a local path, an fsspec URL (`http(s)://`, `s3://`, ...) or a `pipe:`
    command (source.py; fsspec and webdataset are imported only for URLs, so the shard writer's
    worker processes start in a fraction of a second)."""
    if not is_url(url) or url.startswith("file:"):
        return open(url.removeprefix("file://").removeprefix("file:"), "rb")
    from mae_scale.data.source import open_stream

    return open_stream(url)


def is_video_member(ext: str) -> bool:
    """`mp4`, `webm`, ... or a compound extension ending in one (`video.mp4`), any case."""
    return ext.lower().rpartition(".")[2] in VIDEO_MEMBERS


def video_member(members: dict[str, bytes]) -> str | None:
    """The member that is the sample's video: the first of VIDEO_MEMBERS it has (None: none)."""
    found = [ext for ext in members if is_video_member(ext)]
    if not found:
        return None
    return min(found, key=lambda ext: (VIDEO_MEMBERS.index(ext.lower().rpartition(".")[2]), ext))


def adopted_meta(members: dict[str, bytes]) -> dict:
    """A sample's json by the rules for other tools' shards (adopt, verify): optional (then {}),
    an object, its `frames` absent or a positive int. ValueError names what is wrong."""
    if "json" not in members:
        return {}
    meta = json.loads(members["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    want = meta.get("frames")
    if want is not None and (not isinstance(want, int) or isinstance(want, bool) or want < 1):
        raise ValueError(f"'frames' is {want!r}, not a positive int")
    return meta


def split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's naming rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem, ext) if dot and stem else (None, None)


def manifest_location(shards: str | Path) -> str:
    """`shards` is a folder holding manifest.json, a manifest path, or a URL of one (`pipe:` too)."""
    shards = str(shards)
    if not is_url(shards) and Path(shards).is_dir():
        return str(Path(shards) / MANIFEST_NAME)
    return shards


def read_manifest(shards: str | Path) -> tuple[Manifest, list[str]]:
    """Load a manifest and the URL of each of its shards.

    A shard's URL is the manifest's location with its last `manifest.json` replaced by the shard's
    name, so `/data/k400/manifest.json`, `https://host/k400/manifest.json` and
    `pipe:aws s3 cp s3://bucket/k400/manifest.json -` all work unchanged. A shard with a `url`
    (adopted in place by tools/index_shards.py) is read there: an absolute path or URL as it is, a
    relative path relative to the manifest's folder.
    """
    location = manifest_location(shards)
    try:
        with open_shard(location) as f:
            text = f.read()
        data = json.loads(text)
    except FileNotFoundError as exc:
        raise ManifestError(f"{location}: no manifest here (build shards with tools/make_shards.py)") from exc
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{location}: cannot read manifest ({exc})") from exc
    manifest = Manifest.from_dict(data, location)
    if MANIFEST_NAME not in location:
        raise ManifestError(f"{location}: a manifest location must end in {MANIFEST_NAME}")
    return manifest, [shard_location(location, s) for s in manifest.shards]


def beside_manifest(location: str, relative: str) -> str:
    """The location of `relative` (a path relative to the manifest's folder), in the manifest's scheme."""
    head, _, tail = location.rpartition(MANIFEST_NAME)
    return head + relative + tail


def shard_location(location: str, shard: ShardInfo) -> str:
    """Where a shard of the manifest at `location` is read."""
    if shard.url and (is_url(shard.url) or Path(shard.url).is_absolute()):
        return shard.url
    return beside_manifest(location, shard.url or shard.name)


def write_json_atomic(path: Path, obj: Any, indent: int | None = 1, tmp_suffix: str = ".tmp") -> None:
    tmp = path.with_name(path.name + tmp_suffix)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True, separators=None if indent else (",", ":"))
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter(io.RawIOBase):
    def __init__(self, f: IO[bytes]):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.hash.update(b)
        self.size += len(b)
        return self.f.write(b)


class HashingReader:
    """Reads through to `f` while hashing, so a shard is read once for both its sha256 and its content
    (verify_shards, index_shards)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.hash.update(b)
        self.size += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


class ShardWriter:
    """One shard: members go to `NAME.tar.tmp`; `close()` fsyncs and renames it to `NAME.tar`, after
    writing its per-sample index to `NAME.tar.idx.json` (index.py).

    Tar headers are fixed (mtime 0, no owner), so the same samples always give the same bytes and
    sha256, which lets an interrupted build resume and end with the same manifest.
    """

    def __init__(self, path: Path, tmp_suffix: str = ".tmp"):
        """`tmp_suffix`: the temporary name is `NAME.tar` + it (make one unique per writer when two
        attempts at the same shard might run at once, as retried cluster tasks can)."""
        from mae_scale.data.index import SpanRecorder

        self.path = Path(path)
        self.tmp_suffix = tmp_suffix
        self.tmp = self.path.with_name(self.path.name + tmp_suffix)
        self.samples = 0
        self._spans = SpanRecorder()
        self._file = open(self.tmp, "wb")
        self._out = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._out, mode="w|", format=tarfile.PAX_FORMAT)

    @property
    def bytes(self) -> int:
        """Tar bytes so far (the stream buffers, so this is the archive's offset, not the file's size)."""
        return self._tar.offset

    def add(self, key: str, members: dict[str, bytes], frames: int | None = None) -> None:
        """`frames`: the video's frame count, recorded in the index (the loader plans clips from it)."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            start = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            self._spans.member(key, start, self._tar.offset, frames)
        self.samples += 1

    def close(self) -> ShardInfo:
        from mae_scale.data.index import ShardIndex, index_name, write_index

        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        index = ShardIndex(self.path.name, self._out.size, tuple(self._spans.finish()))
        index.check(str(self.tmp))
        write_index(self.path.with_name(index_name(self.path.name)), index, tmp_suffix=self.tmp_suffix)
        os.replace(self.tmp, self.path)
        return ShardInfo(
            self.path.name,
            self.samples,
            self._out.size,
            self._out.hash.hexdigest(),
            index_name(self.path.name),
        )

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class RawSample:
    """A sample's members as read from a tar, or a tar-level fault (then `fault` names it)."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    fault: str | None = None
    detail: str = ""
    extra: list[str] = field(default_factory=list)  # extensions of members never read (not json or video)


def iter_tar(fileobj: IO[bytes], max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[RawSample]:
    """Group a streamed tar's members into samples (consecutive members sharing a key).

    Tar-level faults come out as a `RawSample` with `fault` set: `duplicate_key` (a key seen
    earlier in the shard), `duplicate_member`, `member_too_large`, and `bad_tar` (truncated or
    corrupt; the sample being read is dropped and iteration stops).
    """
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield RawSample("", fault="bad_tar", detail=f"cannot open: {exc}")
        return
    seen: set[str] = set()
    current: RawSample | None = None
    try:
        for info in tar:
            if not info.isreg():
                continue
            key, ext = split_key(info.name)
            if key is None:
                continue  # a member without an extension belongs to no sample
            ext = ext.lower()
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current = RawSample(key)
                if key in seen:
                    current.fault, current.detail = "duplicate_key", f"key {key!r} appears twice in the shard"
                seen.add(key)
            if ext in current.members or ext in current.extra:
                current.fault, current.detail = "duplicate_member", f"{info.name} appears twice"
            if ext != "json" and not is_video_member(ext):
                current.extra.append(ext)
            elif info.size > max_member_bytes:
                current.fault, current.detail = "member_too_large", f"{info.name}: {info.size} bytes"
                current.extra.append(ext)
            else:
                current.members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield RawSample(
            current.key if current else "", fault="bad_tar", detail=f"truncated or corrupt: {exc}"
        )
        return
    if current is not None:
        yield current
