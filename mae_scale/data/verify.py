"""Check a shard set against its manifest: hashes, counts, members, metadata, and that every video decodes.

    python tools/verify_shards.py /data/shards        # exit status 1 on any fault, each one named

Every fault is reported as `shard key: reason: detail`; the summary ends the output. A shard's
per-sample index (index.py) is checked against the tar's headers: `bad_index` (missing or
malformed), `index_mismatch` (another name, size, count, or a sample's key, offset, length or
frame count that the tar does not have). Shards without an index are no fault (older sets, other
tools' shards); the summary counts them.

An adopted set (`tools/index_shards.py`: other tools' tars, read in place) is checked by the rules
the loader reads it with, not by our own format's: a sample needs a video member (any of
`VIDEO_MEMBERS`), other members (`.txt`, `.cls`, ...) are no fault, a json is optional but must be
an object whose `frames`, if it has one, the video agrees with; the video's frame count is checked
against the index. So the faults of an adopted set are the samples the loader would skip (those
`rejects.jsonl` listed at adoption, and any damage since).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mae_scale.data.decode import DEFAULT_LIMITS, BadVideo, VideoLimits, probe
from mae_scale.data.index import ShardIndexError, read_index, scan_tar
from mae_scale.data.shards import (
    MEMBERS,
    HashingReader,
    ManifestError,
    ShardInfo,
    adopted_meta,
    beside_manifest,
    is_url,
    iter_tar,
    manifest_location,
    open_shard,
    read_manifest,
    video_member,
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


def verify_shard(
    job: tuple[ShardInfo, str, str, bool, VideoLimits, bool],
) -> tuple[list[Fault], int, list[str]]:
    """Faults of one shard (its index too, at `index_url` unless ""), its sample count and its keys.
    `adopted`: checked by the rules for other tools' shards (the module's docstring)."""
    shard, url, index_url, decode, limits, adopted = job
    faults: list[Fault] = []
    keys: list[str] = []
    frames: dict[str, int] = {}  # from each sample's json, for the index check
    count = 0  # samples in the tar, faulty ones included

    def fault(key: str, reason: str, detail: str) -> None:
        faults.append(Fault(shard.name, key, reason, detail))

    try:
        f = open_shard(url)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        fault("", "unreadable_shard", f"{url}: {exc}")
        return faults, count, keys
    reader = HashingReader(f)
    try:
        for sample in iter_tar(reader):
            count += sample.fault != "bad_tar"
            if sample.fault:
                fault(sample.key, sample.fault, sample.detail)
                if sample.fault == "bad_tar":
                    break
                continue
            keys.append(sample.key)
            if adopted:
                check_adopted(sample, decode, limits, fault, frames)
                continue
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
            frames[sample.key] = meta["frames"]
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
    if index_url and not any(f.reason in ("bad_tar", "unreadable_shard") for f in faults):
        faults += check_index(shard, url, index_url, frames)
    return faults, count, keys


def check_adopted(sample, decode: bool, limits: VideoLimits, fault, frames: dict[str, int]) -> None:
    """One sample of an adopted shard; its probed frame count goes to `frames` (for the index)."""
    video = video_member(sample.members)
    if video is None:
        others = ", ".join("." + e for e in [*sample.members, *sample.extra]) or "none"
        fault(sample.key, "no_video_member", f"members: {others}")
        return
    try:
        meta = adopted_meta(sample.members)
    except ValueError as exc:
        fault(sample.key, "bad_json", str(exc))
        return
    if not decode:
        return
    try:
        info = probe(sample.members[video], limits)
    except BadVideo as exc:
        fault(sample.key, exc.reason, exc.detail)
        return
    if meta.get("frames") is not None and meta["frames"] != info.frames:
        fault(
            sample.key,
            "frames_mismatch",
            f"its json says {meta['frames']} frames, the video has {info.frames}",
        )
        return
    frames[sample.key] = info.frames


def check_index(shard: ShardInfo, url: str, index_url: str, frames: dict[str, int]) -> list[Fault]:
    """The index against the manifest and against a scan of the tar's headers (a second read)."""
    try:
        index = read_index(index_url)
    except ShardIndexError as exc:
        return [Fault(shard.name, "", "bad_index", str(exc))]
    wrong = [
        f"{what} {got!r} where the manifest has {want!r}"
        for what, got, want in (
            ("it indexes", index.shard, shard.name),
            ("it gives the tar", index.bytes, shard.bytes),
            ("it lists samples:", len(index.samples), shard.samples),
        )
        if got != want
    ]
    if wrong:
        return [Fault(shard.name, "", "index_mismatch", f"{index_url}: " + "; ".join(wrong))]
    try:
        with open_shard(url) as f:
            scanned = scan_tar(f, frames.items())
    except Exception as exc:  # noqa: BLE001 - the tar itself is reported by the main pass
        return [
            Fault(shard.name, "", "index_mismatch", f"{index_url}: the tar's headers do not scan ({exc})")
        ]
    for i, (mine, real) in enumerate(zip(index.samples, scanned, strict=False)):
        known = real.frames is not None and mine.frames is not None
        if (mine.key, mine.offset, mine.length) != (real.key, real.offset, real.length) or (
            known and mine.frames != real.frames
        ):
            return [
                Fault(
                    shard.name,
                    real.key,
                    "index_mismatch",
                    f"{index_url}: samples[{i}] is {mine.key!r} at [{mine.offset}, {mine.end}) with "
                    f"{mine.frames} frames; the tar has {real.key!r} at [{real.offset}, {real.end}) with "
                    f"{real.frames}",
                )
            ]
    if len(scanned) != len(index.samples):
        return [
            Fault(
                shard.name,
                "",
                "index_mismatch",
                f"{index_url}: {len(index.samples)} samples, the tar {len(scanned)}",
            )
        ]
    return []


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
    location = manifest_location(shards)
    adopted = bool(manifest.build.get("adopted"))
    jobs = [
        (s, url, beside_manifest(location, s.index) if s.index else "", decode, limits, adopted)
        for s, url in zip(manifest.shards, urls, strict=True)
    ]
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
        "unindexed": sum(1 for s in manifest.shards if not s.index),
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
    if summary.get("unindexed"):
        print(
            f"note: {summary['unindexed']} of {summary['shards']} shards have no per-sample index; "
            f"the loader reads them from their start (tools/index_shards.py {args.shards} --out DIR adds one)"
        )
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
