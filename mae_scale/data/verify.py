"""Check a shard set against its manifest: hashes, counts, members, metadata, and that every video decodes.

    python tools/verify_shards.py /data/shards        # exit status 1 on any fault, each one named

Every fault is reported as `shard key: reason: detail`; the summary ends the output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mae_scale.data.decode import DEFAULT_LIMITS, BadVideo, VideoLimits, probe
from mae_scale.data.shards import (
    MEMBERS,
    ManifestError,
    ShardInfo,
    is_url,
    iter_tar,
    open_shard,
    read_manifest,
)
from mae_scale.report import by_reason_rows, format_table, human_bytes, human_duration

META_FIELDS = {
    "source": str,
    "frames": int,
    "fps": (int, float),
    "width": int,
    "height": int,
    "duration": (int, float),
}


@dataclass(frozen=True)
class Fault:
    shard: str
    key: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard} {self.key or '-'}: {self.reason}: {self.detail}"


class _HashingReader:
    """Reads through to `f` while hashing, so a shard is read once for both sha256 and content."""

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


def check_meta(meta: object) -> str | None:
    """What is wrong with a sample's json, or None."""
    if not isinstance(meta, dict):
        return f"expected an object, got {type(meta).__name__}"
    for key, kind in META_FIELDS.items():
        if key not in meta:
            return f"missing {key!r}"
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            return f"{key!r} has type {type(meta[key]).__name__}"
    if meta["frames"] < 1 or meta["fps"] <= 0:
        return f"frames={meta['frames']}, fps={meta['fps']}"
    return None


def verify_shard(job: tuple[ShardInfo, str, bool, VideoLimits]) -> tuple[list[Fault], int, list[str]]:
    """Faults of one shard, its sample count and its keys."""
    shard, url, decode, limits = job
    faults: list[Fault] = []
    keys: list[str] = []
    count = 0  # samples in the tar, faulty ones included

    def fault(key: str, reason: str, detail: str) -> None:
        faults.append(Fault(shard.name, key, reason, detail))

    try:
        f = open_shard(url)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        fault("", "unreadable_shard", f"{url}: {exc}")
        return faults, count, keys
    reader = _HashingReader(f)
    try:
        for sample in iter_tar(reader):
            count += sample.fault != "bad_tar"
            if sample.fault:
                fault(sample.key, sample.fault, sample.detail)
                if sample.fault == "bad_tar":
                    break
                continue
            keys.append(sample.key)
            for ext in sample.extra:
                fault(
                    sample.key,
                    "unexpected_member",
                    f"{sample.key}.{ext} (a sample holds only .mp4 and .json)",
                )
            missing = [m for m in MEMBERS if m not in sample.members]
            if missing:
                fault(sample.key, "missing_member", f"no .{' .'.join(missing)}")
                continue
            try:
                meta = json.loads(sample.members["json"])
            except ValueError as exc:
                fault(sample.key, "bad_json", str(exc))
                continue
            problem = check_meta(meta)
            if problem:
                fault(sample.key, "bad_json", problem)
                continue
            if decode:
                try:
                    info = probe(sample.members["mp4"], limits)
                except BadVideo as exc:
                    fault(sample.key, exc.reason, exc.detail)
                    continue
                got = (info.frames, info.width, info.height)
                want = (meta["frames"], meta["width"], meta["height"])
                if got != want or abs(info.fps - meta["fps"]) > 1e-3 * info.fps:
                    fault(
                        sample.key,
                        "meta_mismatch",
                        f"json frames/w/h/fps {want} {meta['fps']}, video {got} {info.fps}",
                    )
        reader.drain()
    except OSError as exc:
        fault("", "unreadable_shard", str(exc))
    finally:
        try:
            f.close()
        except Exception as exc:  # noqa: BLE001 - e.g. a pipe: command that failed
            fault("", "unreadable_shard", f"{url}: {exc}")
    if count != shard.samples:
        fault("", "count_mismatch", f"manifest says {shard.samples} samples, the tar holds {count}")
    if reader.size != shard.bytes:
        fault("", "size_mismatch", f"manifest says {shard.bytes} bytes, read {reader.size}")
    elif reader.hash.hexdigest() != shard.sha256:
        fault(
            "", "sha256_mismatch", f"manifest {shard.sha256[:12]}..., file {reader.hash.hexdigest()[:12]}..."
        )
    return faults, count, keys


def verify_shards(
    shards: str | Path, *, decode: bool = True, limits: VideoLimits = DEFAULT_LIMITS, workers: int = 0
) -> tuple[list[Fault], dict[str, int]]:
    """All faults of a shard set and a summary (shards, samples, bytes, faults)."""
    try:
        manifest, urls = read_manifest(shards)
    except ManifestError as exc:
        return [Fault("manifest.json", "", "bad_manifest", str(exc))], {
            "shards": 0,
            "samples": 0,
            "bytes": 0,
            "faults": 1,
        }
    jobs = [(s, url, decode, limits) for s, url in zip(manifest.shards, urls, strict=True)]
    if workers > 0:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(verify_shard, jobs)
    else:
        results = [verify_shard(job) for job in jobs]
    faults = [f for r in results for f in r[0]]
    key_shards: dict[str, list[str]] = {}
    for shard, (_, _, keys) in zip(manifest.shards, results, strict=True):
        for key in keys:
            key_shards.setdefault(key, []).append(shard.name)
    for key, names in key_shards.items():
        if len(names) > 1:
            faults.append(Fault(names[1], key, "duplicate_key", f"key also in {names[0]}"))
    if not is_url(str(shards)) and Path(shards).is_dir():
        listed = {s.name for s in manifest.shards}
        for path in sorted(Path(shards).glob("*.tar")):
            if path.name not in listed:
                faults.append(
                    Fault(path.name, "", "unlisted_shard", "a .tar in the folder that the manifest omits")
                )
    summary = {
        "shards": len(manifest.shards),
        "samples": sum(r[1] for r in results),
        "bytes": manifest.total_bytes,
        "faults": len(faults),
    }
    return faults, summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check shards against manifest.json; non-zero exit on any fault.")
    p.add_argument("shards", help="folder with manifest.json, or a manifest path or URL")
    p.add_argument(
        "--no-decode", action="store_true", help="skip decoding the videos (hashes and members only)"
    )
    p.add_argument("--workers", type=int, default=0, help="processes (default: 0, in-process)")
    p.add_argument("--max-pixels", type=int, default=VideoLimits.max_pixels)
    p.add_argument("--min-side", type=int, default=VideoLimits.min_side)
    args = p.parse_args(argv)
    limits = VideoLimits(args.max_pixels, args.min_side)
    t0 = time.monotonic()
    faults, summary = verify_shards(
        args.shards, decode=not args.no_decode, limits=limits, workers=args.workers
    )
    for f in faults:
        print(f"FAULT {f}")
    reasons = Counter(f.reason for f in faults)
    verdict = "OK"
    if faults:
        verdict = f"{len(faults)} faults (" + ", ".join(f"{r} x{n}" for r, n in reasons.most_common()) + ")"
    checked = "checked" if args.no_decode else "checked and decoded"
    rows = [
        ("shards", summary["shards"]),
        (f"samples {checked}", summary["samples"]),
        *by_reason_rows(reasons, "faults"),
        ("bytes", f"{human_bytes(summary['bytes'])} ({summary['bytes']})"),
        ("time", human_duration(time.monotonic() - t0)),
    ]
    print(format_table(f"verify_shards: {args.shards}: {verdict}", rows))
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())
