"""Build WebDataset video shards (`NAME-000000.tar`, ...) plus `manifest.json` and `rejects.jsonl`.

    python tools/make_shards.py /data/videos --out /data/shards --reencode --max-short-side 320 --workers 8

Inputs (a folder, searched recursively, or a CSV / JSONL list of `path[,label]`) are sorted, then
shuffled by `--seed`, so the same inputs always give the same shards. Worker processes check and
(optionally) re-encode videos; the main process packs them, in input order, into shards of about
`--shard-size` bytes. Videos that fail go to `rejects.jsonl` with the reason. After each shard is
renamed into place, a line is appended to `.progress.jsonl`; a run started again after an
interruption checks the finished shards and continues after them, ending with the same manifest.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import multiprocessing
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mae_scale.data.decode import DEFAULT_LIMITS, BadVideo, VideoLimits, probe
from mae_scale.data.encode import EncodeOptions, transcode
from mae_scale.data.index import INDEX_SUFFIX
from mae_scale.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    ShardWriter,
    read_manifest,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from mae_scale.hardware import usable_cores
from mae_scale.report import by_reason_rows, format_table, human_bytes, human_duration

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".ts"}
PROGRESS_NAME = ".progress.jsonl"
REJECTS_NAME = "rejects.jsonl"


class ShardBuildError(RuntimeError):
    """The output folder or the input list cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class InputVideo:
    path: str  # where to read it
    source: str  # how it is named in the sample json and rejects.jsonl (relative to the input)
    label: str | int | None = None


def list_inputs(input: str | Path, label_from_dir: bool = False) -> list[InputVideo]:
    """Videos under a folder (recursively; label = parent folder name if asked) or listed in a CSV/JSONL.

    CSV rows are `path[,label]` (a first row `path,...` is a header); JSONL rows are
    `{"path": ..., "label": ...}`. Relative paths are relative to the list file. Integer labels
    stay integers.
    """
    input = Path(input)
    if input.is_dir():
        paths = sorted(p for p in input.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        return [
            InputVideo(str(p), p.relative_to(input).as_posix(), p.parent.name if label_from_dir else None)
            for p in paths
        ]
    if not input.is_file():
        raise ShardBuildError(f"{input}: no such folder or list file")
    rows: list[tuple[str, Any]] = []
    if input.suffix.lower() == ".jsonl":
        for n, line in enumerate(input.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append((str(row["path"]), row.get("label")))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ShardBuildError(
                        f'{input}:{n}: expected {{"path": ..., "label": ...}} ({exc!r})'
                    ) from exc
    elif input.suffix.lower() == ".csv":
        with open(input, newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or (n == 1 and row[0].strip().lower() == "path"):
                    continue
                if len(row) > 2:
                    raise ShardBuildError(f"{input}:{n}: expected path[,label], got {len(row)} columns")
                label = row[1].strip() if len(row) == 2 and row[1].strip() else None
                rows.append(
                    (row[0].strip(), int(label) if label and re.fullmatch(r"-?\d+", label) else label)
                )
    else:
        raise ShardBuildError(f"{input}: INPUT must be a folder, a .csv or a .jsonl file")
    return [
        InputVideo(str((input.parent / p) if not Path(p).is_absolute() else p), p, label) for p, label in rows
    ]


def sample_key(index: int, source: str) -> str:
    """Unique and readable: the input's position plus its sanitized file stem (no dots for webdataset)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source).stem)[:40]
    return f"{index:08d}_{stem}"


def prepare(job: tuple[int, InputVideo, EncodeOptions | None, VideoLimits]) -> dict[str, Any]:
    """Check one input (and re-encode it if asked): the sample's members, or the reason it failed."""
    index, item, encode, limits = job
    try:
        try:
            data = Path(item.path).read_bytes()
        except OSError as exc:
            raise BadVideo("unreadable", str(exc)) from exc
        if encode is not None:
            data, info = transcode(data, encode, limits)
        else:
            info = probe(data, limits)
    except BadVideo as exc:
        return {"index": index, "reject": {"source": item.source, "reason": exc.reason, "detail": exc.detail}}
    except Exception as exc:  # noqa: BLE001 - one strange file must not stop the build
        detail = f"{type(exc).__name__}: {exc}"
        return {"index": index, "reject": {"source": item.source, "reason": "error", "detail": detail}}
    meta: dict[str, Any] = {
        "source": item.source,
        "frames": info.frames,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "duration": info.duration,
    }
    if item.label is not None:
        meta["label"] = item.label
    return {"index": index, "key": sample_key(index, item.source), "mp4": data, "meta": meta}


def _fingerprint(items: Sequence[InputVideo], options: dict[str, Any]) -> str:
    text = json.dumps({"inputs": [(i.source, i.label) for i in items], "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resume(out: Path, fingerprint: str) -> tuple[list[ShardInfo], list[dict], int]:
    """Finished shards (checked against their sha256), their rejects, and the next input index."""
    progress = out / PROGRESS_NAME
    entries: list[dict] = []
    if progress.exists():
        lines = progress.read_text().splitlines()
        try:
            header = json.loads(lines[0])
        except (IndexError, ValueError):
            header = {}
        if header.get("fingerprint") != fingerprint:
            raise ShardBuildError(
                f"{out} holds an unfinished build from other inputs or options (fingerprint "
                f"{header.get('fingerprint')} != {fingerprint}); use another --out or empty it"
            )
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                shard = ShardInfo(**entry["shard"])
            except (ValueError, KeyError, TypeError):
                break  # a line cut by the interruption
            path = out / shard.name
            if not path.exists() or path.stat().st_size != shard.bytes or sha256_file(path) != shard.sha256:
                break  # damaged after it was finished: rebuild from here
            if shard.index and not (out / shard.index).exists():
                break
            entries.append(entry)
    elif any(out.glob("*.tar")):
        raise ShardBuildError(f"{out} holds .tar files from an unknown build; use another --out or empty it")
    shards = [ShardInfo(**e["shard"]) for e in entries]
    known = {s.name for s in shards} | {s.index for s in shards}
    for path in [*out.glob("*.tar"), *out.glob("*.tar.tmp"), *out.glob("*" + INDEX_SUFFIX + "*")]:
        if path.name not in known:
            path.unlink()  # after the last good shard, or half-written when the run was killed
    with open(progress, "w") as f:
        f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        f.writelines(json.dumps(e) + "\n" for e in entries)
    rejects = [r for e in entries for r in e["rejects"]]
    return shards, rejects, entries[-1]["next_input"] if entries else 0


def make_shards(
    inputs: str | Path | Sequence[InputVideo],
    out: str | Path,
    *,
    name: str = "shard",
    shard_bytes: int = 1 << 30,
    max_samples_per_shard: int | None = None,
    encode: EncodeOptions | None = None,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    limits: VideoLimits = DEFAULT_LIMITS,
    label_from_dir: bool = False,
    progress: bool = True,
) -> Manifest:
    """Build (or finish, or confirm) a shard set in `out`; returns its manifest."""
    items = list(inputs) if not isinstance(inputs, (str, Path)) else list_inputs(inputs, label_from_dir)
    if not items:
        raise ShardBuildError(f"{inputs}: no input videos found")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ShardBuildError(f"shard name {name!r} must be letters, digits, '_' or '-'")
    items.sort(key=lambda i: (i.source, i.path))
    if shuffle:
        random.Random(seed).shuffle(items)
    options = {
        "name": name,
        "shard_bytes": shard_bytes,
        "max_samples_per_shard": max_samples_per_shard,
        "encode": asdict(encode) if encode else None,
        "seed": seed,
        "shuffle": shuffle,
        "limits": {"max_pixels": limits.max_pixels, "min_side": limits.min_side},
    }
    fingerprint = _fingerprint(items, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST_NAME).exists():
        manifest, _ = read_manifest(out)
        if manifest.build.get("fingerprint") != fingerprint:
            raise ShardBuildError(
                f"{out} already holds a finished shard set from other inputs or options "
                f"(fingerprint {manifest.build.get('fingerprint')} != {fingerprint}); use another --out"
            )
        return manifest
    shards, rejects, start = _resume(out, fingerprint)
    _pack(
        items[start:],
        out,
        shards,
        rejects,
        start=start,
        name=name,
        shard_bytes=shard_bytes,
        max_samples=max_samples_per_shard,
        encode=encode,
        workers=workers,
        limits=limits,
        progress=progress,
    )
    with open(out / (REJECTS_NAME + ".tmp"), "w") as f:
        for r in sorted(rejects, key=lambda r: r["source"]):
            f.write(json.dumps(r, sort_keys=True) + "\n")
    (out / (REJECTS_NAME + ".tmp")).replace(out / REJECTS_NAME)
    if not shards:
        raise ShardBuildError(f"all {len(items)} inputs were rejected; see {out / REJECTS_NAME}")
    build = {"fingerprint": fingerprint, "inputs": len(items), **options}
    manifest = Manifest(shards, name, len(rejects), build)
    write_json_atomic(out / MANIFEST_NAME, manifest.to_dict())
    (out / PROGRESS_NAME).unlink()
    return manifest


def _pack(
    items: list[InputVideo],
    out: Path,
    shards: list[ShardInfo],
    rejects: list[dict],
    *,
    start: int,
    name: str,
    shard_bytes: int,
    max_samples: int | None,
    encode: EncodeOptions | None,
    workers: int,
    limits: VideoLimits,
    progress: bool,
) -> None:
    """Prepare `items` (inputs `start`, `start + 1`, ...) and pack them, in order, into new shards
    appended to `shards`; each finished shard is logged to the progress file."""
    pending: list[dict] = []  # rejects since the last finished shard

    def finish(writer: ShardWriter, last_index: int) -> None:
        shards.append(writer.close())
        entry = {"shard": asdict(shards[-1]), "rejects": list(pending), "next_input": last_index + 1}
        with open(out / PROGRESS_NAME, "a") as f:
            f.write(json.dumps(entry) + "\n")
        rejects.extend(pending)
        pending.clear()

    last = start + len(items) - 1
    jobs = ((start + i, item, encode, limits) for i, item in enumerate(items))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    results: Iterator[dict] = pool.imap(prepare, jobs) if pool else map(prepare, jobs)
    bar = tqdm(total=last + 1, initial=start, unit="video", desc=f"shards -> {out}", disable=not progress)
    writer: ShardWriter | None = None
    try:
        for result in results:
            bar.update(1)
            if "reject" in result:
                pending.append(result["reject"])
                continue
            writer = writer or ShardWriter(out / shard_name(name, len(shards)))
            members = {"mp4": result["mp4"], "json": json.dumps(result["meta"]).encode()}
            writer.add(result["key"], members, frames=result["meta"]["frames"])
            if writer.bytes >= shard_bytes or (max_samples is not None and writer.samples >= max_samples):
                finish(writer, result["index"])
                writer = None
        if writer is not None:
            finish(writer, last)
            writer = None
        rejects.extend(pending)  # rejects after the last shard
    finally:
        if writer is not None:
            writer.abort()
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def build_table(manifest: Manifest, out: Path, seconds: float) -> str:
    """What a build made: inputs, samples, rejects by reason (from rejects.jsonl), bytes, time."""
    reasons: dict[str, int] = {}
    rejects = out / REJECTS_NAME
    if rejects.is_file():
        for line in rejects.read_text().splitlines():
            if line.strip():
                reason = json.loads(line)["reason"]
                reasons[reason] = reasons.get(reason, 0) + 1
    rows = [
        ("inputs", manifest.build.get("inputs", "?")),
        ("samples written", f"{manifest.total_samples} in {len(manifest.shards)} shards"),
        *by_reason_rows(reasons, "rejects"),
        ("bytes", f"{human_bytes(manifest.total_bytes)} ({manifest.total_bytes})"),
        ("time", human_duration(seconds)),
    ]
    return format_table(f"make_shards: {out} (rejects listed in {rejects})", rows)


def parse_size(text: str) -> int:
    """'1GB', '200MB', '64k' or a plain byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 1GB, 200MB or 65536")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2) or "_"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("input", help="folder of videos (recursive) or a .csv / .jsonl list of path[,label]")
    p.add_argument("--out", required=True, help="output folder for shards, manifest.json, rejects.jsonl")
    p.add_argument("--name", default="shard", help="shard file prefix: NAME-000000.tar (default: shard)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), help="target bytes per shard")
    p.add_argument("--max-samples-per-shard", type=int, default=None, help="also close a shard at this count")
    p.add_argument("--workers", type=int, default=max(1, usable_cores() - 1))
    p.add_argument("--seed", type=int, default=0, help="seed of the input shuffle (default: 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted input order")
    p.add_argument("--label-from-dir", action="store_true", help="folder input: label = parent folder name")
    p.add_argument("--max-pixels", type=int, default=VideoLimits.max_pixels, help="reject larger frames")
    p.add_argument("--min-side", type=int, default=VideoLimits.min_side, help="reject smaller frames")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    e = p.add_argument_group("re-encoding (off unless --reencode)")
    e.add_argument("--reencode", action="store_true", help="re-encode every video with the options below")
    e.add_argument("--max-short-side", type=int, default=EncodeOptions.max_short_side)
    e.add_argument("--fps", type=float, default=None, help="new frame rate (default: keep)")
    e.add_argument("--gop", type=int, default=EncodeOptions.gop, help="keyframe interval in frames")
    e.add_argument("--codec", default=EncodeOptions.codec, help="libx264 (default) or mpeg4")
    e.add_argument("--crf", type=int, default=EncodeOptions.crf)
    e.add_argument("--preset", default=EncodeOptions.preset)
    args = p.parse_args(argv)
    encode = None
    if args.reencode:
        encode = EncodeOptions(args.max_short_side, args.fps, args.gop, args.codec, args.crf, args.preset)
    t0 = time.monotonic()
    try:
        manifest = make_shards(
            args.input,
            args.out,
            name=args.name,
            shard_bytes=args.shard_size,
            max_samples_per_shard=args.max_samples_per_shard,
            encode=encode,
            workers=args.workers,
            seed=args.seed,
            shuffle=not args.no_shuffle,
            limits=VideoLimits(args.max_pixels, args.min_side),
            label_from_dir=args.label_from_dir,
            progress=not args.quiet,
        )
    except ShardBuildError as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    print(build_table(manifest, Path(args.out), time.monotonic() - t0))
    return 0
