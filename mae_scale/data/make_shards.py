"""Build WebDataset video shards (`NAME-000000.tar`, ...) plus `manifest.json` and `rejects.jsonl`.

    python tools/make_shards.py /data/videos --out /data/shards --reencode --max-short-side 320 --workers 8
    python tools/make_shards.py /data/list.csv --out /shared/shards --reencode --engine ray --ray-address auto

Inputs (a folder, searched recursively, or a CSV / JSONL list of `path[,label]`, where a path may be
an http(s) URL) are sorted, shuffled by `--seed` and cut into shards of a fixed number of videos
(`--max-samples-per-shard`, else `--shard-size` / `--video-size`): the plan, written to
`DIR/plan.json` before any work (shard_plan.py). Each shard is then built by one call of `build_shard`,
a pure function of its part of the plan, run by the local pool or by Ray tasks (engines.py): same
inputs and options, same bytes, whatever runs it. Videos that fail (or hang past `--video-timeout`)
go to `rejects.jsonl` with the reason. A run started again on the same folder keeps every shard
whose tar still matches the sha256 it was built with, rebuilds the rest, and ends with the same
manifest; a run with other inputs or options is refused, naming what differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mae_scale.data.decode import BadVideo, VideoLimits, probe
from mae_scale.data.encode import EncodeOptions, transcode
from mae_scale.data.engines import ENGINES, EngineError, close_runners, require_ray, run_tasks, video_runner
from mae_scale.data.index import ShardIndexError, index_name, read_index
from mae_scale.data.shard_plan import (
    PLAN_NAME,
    Plan,
    PlanError,
    check_against,
    plan_rows,
    tool_versions,
    write_plan,
)
from mae_scale.data.shards import (
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    ShardWriter,
    is_url,
    read_manifest,
    sha256_file,
    shard_name,
    write_json_atomic,
)
from mae_scale.hardware import usable_cores
from mae_scale.report import by_reason_rows, format_table, human_bytes, human_duration

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".ts"}
REJECTS_NAME = "rejects.jsonl"
PARTS_DIR = ".parts"  # one small result file per finished shard, until the manifest is written
DEFAULT_VIDEO_SIZE = 1 << 20  # the bytes per video assumed when only --shard-size is given
DEFAULT_VIDEO_TIMEOUT_S = 300.0
SHARD_LIMITS = VideoLimits(timeout_s=DEFAULT_VIDEO_TIMEOUT_S)
DEFAULT_VIDEO_FN = "mae_scale.data.make_shards:prepare"
VIDEO_FN_ENV = "MAE_SCALE_VIDEO_FN"  # test hook: another per-video function ("module:function")


class ShardBuildError(RuntimeError):
    """The output folder or the input list cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class InputVideo:
    path: str  # where to read it: a path (absolute once planned) or an http(s) URL
    source: str  # how it is named in the sample json and rejects.jsonl (relative to the input)
    label: str | int | None = None


def list_inputs(input: str | Path, label_from_dir: bool = False) -> list[InputVideo]:
    """Videos under a folder (recursively; label = parent folder name if asked) or listed in a CSV/JSONL.

    CSV rows are `path[,label]` (a first row `path,...` is a header); JSONL rows are
    `{"path": ..., "label": ...}`. Relative paths are relative to the list file; URLs stay as they
    are (and are their own source). Integer labels stay integers.
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
        InputVideo(p if is_url(p) or Path(p).is_absolute() else str(input.parent / p), p, label)
        for p, label in rows
    ]


def sample_key(index: int, source: str) -> str:
    """Unique and readable: the input's position plus its sanitized file stem (no dots for webdataset)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source).stem)[:40]
    return f"{index:08d}_{stem}"


# ---- one video --------------------------------------------------------------------------------------


def read_input(path: str, tries: int = 3) -> bytes:
    """A local file, or an http(s) (any fsspec) URL, tried `tries` times; BadVideo("unreadable") if not."""
    if not is_url(path) or path.startswith("file:"):
        try:
            return Path(path.removeprefix("file://").removeprefix("file:")).read_bytes()
        except OSError as exc:
            raise BadVideo("unreadable", str(exc)) from exc
    import fsspec

    for attempt in range(tries):
        try:
            with fsspec.open(path, "rb") as f:
                return f.read()
        except FileNotFoundError as exc:  # http 404: trying again will not help
            raise BadVideo("unreadable", f"{path}: not found") from exc
        except Exception as exc:  # noqa: BLE001 - aiohttp and asyncio raise many kinds
            if attempt == tries - 1:
                raise BadVideo("unreadable", f"{path}: {type(exc).__name__}: {exc}") from exc
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def prepare(job: tuple[int, InputVideo, EncodeOptions | None, VideoLimits]) -> dict[str, Any]:
    """The per-video work: read one input, check it (and re-encode it if asked).

    Returns the sample's members, or the reason it failed; never raises for a bad video. Runs in a
    `VideoRunner` child, so a hang past the time limit or a crash is caught by the shard's task.
    """
    index, item, encode, limits = job
    try:
        data = read_input(item.path)
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


# ---- one shard --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    """Everything one shard's build needs: its plan entries and the options (small, no video bytes)."""

    out: str  # the output folder (absolute; on a cluster, a path every node sees)
    name: str  # the tar's file name
    shard: int  # its number in the plan
    items: tuple[tuple[int, InputVideo], ...]  # (plan position, input), in plan order
    encode: EncodeOptions | None
    limits: VideoLimits  # timeout_s: the per-video limit (decoder deadline; the child is killed a bit later)
    versions: dict[str, str]  # the plan's tool versions: a worker with others refuses
    video_fn: str = DEFAULT_VIDEO_FN


def hard_timeout(limits: VideoLimits) -> float:
    """When a video's child is killed: past the decoder's own deadline, which normally fires first."""
    return limits.timeout_s * 1.1 + 1.0


def check_versions(expected: dict[str, str], what: str = "shard") -> None:
    """Refuse to build on a node whose encoder differs from the plan's: its bytes would differ."""
    mine = tool_versions()
    keys = sorted(k for k in set(mine) | set(expected) if mine.get(k) != expected.get(k))
    if keys:
        diff = "; ".join(f"{k} {expected.get(k)!r} in the plan, {mine.get(k)!r} here" for k in keys)
        raise ShardBuildError(
            f"{socket.gethostname()}: cannot build this {what} to the planned bytes ({diff}); "
            "install the same mae-scale and PyAV on every node"
        )


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Build one shard from its plan entries; returns its small result (also saved for resume).

    Samples go in plan order into `NAME.tar` through a temporary name unique to this attempt
    (ShardWriter: fixed tar metadata, fsync, index, rename). Bad videos become rejects here; only
    infrastructure faults (a full disk, an unreadable output folder) raise, and a retry redoes the
    same work. The result: name, samples, bytes, sha256, index file, frames, rejects.
    """
    check_versions(task.versions)
    out = Path(task.out)
    suffix = f".{socket.gethostname()}-{os.getpid()}.tmp"
    runner = video_runner(task.video_fn)
    writer: ShardWriter | None = None
    rejects: list[dict] = []
    frames = 0
    try:
        for index, item in task.items:
            status, result = runner.run((index, item, task.encode, task.limits), hard_timeout(task.limits))
            if status != "ok":
                rejects.append({"source": item.source, "reason": status, "detail": result})
                continue
            if "reject" in result:
                rejects.append(result["reject"])
                continue
            if writer is None:
                writer = ShardWriter(out / task.name, tmp_suffix=suffix)
            meta = result["meta"]
            writer.add(
                result["key"], {"mp4": result["mp4"], "json": json.dumps(meta).encode()}, meta["frames"]
            )
            frames += meta["frames"]
        info = writer.close() if writer is not None else None
        writer = None
    finally:
        if writer is not None:
            writer.abort()
    fsync_dir(out)
    done = {
        "shard": task.shard,
        "name": task.name,
        "samples": info.samples if info else 0,
        "bytes": info.bytes if info else 0,
        "sha256": info.sha256 if info else "",
        "index": info.index if info else "",
        "videos": len(task.items),
        "frames": frames,
        "rejects": rejects,
    }
    (out / PARTS_DIR).mkdir(exist_ok=True)
    write_json_atomic(out / PARTS_DIR / (task.name + ".json"), done, tmp_suffix=suffix)
    return done


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync folders; the files themselves were synced
    finally:
        os.close(fd)


def kept_result(out: Path, name: str) -> dict | None:
    """The saved result of shard `name` if its files still hold what it recorded, else None (and the
    shard's leftovers are removed, so it is rebuilt from nothing)."""
    part, tar = out / PARTS_DIR / (name + ".json"), out / name
    try:
        done = json.loads(part.read_text())
        if done["samples"] == 0:
            tar.unlink(missing_ok=True)
            return done
        ok = tar.is_file() and tar.stat().st_size == done["bytes"] and sha256_file(tar) == done["sha256"]
        ok = ok and read_index(str(out / done["index"])).bytes == done["bytes"]
    except (OSError, ValueError, KeyError, TypeError, ShardIndexError):
        ok = False
    if ok:
        return done
    for path in (part, tar, out / index_name(name)):
        path.unlink(missing_ok=True)
    return None


def remove_temporaries(out: Path) -> None:
    """Temporary files of killed attempts (`*.tmp`); none can be in use: one build per folder at a time."""
    for folder in (out, out / PARTS_DIR):
        if folder.is_dir():
            for path in folder.glob("*.tmp"):
                path.unlink(missing_ok=True)


# ---- the build ---------------------------------------------------------------------------------------


def make_shards(
    inputs: str | Path | Sequence[InputVideo],
    out: str | Path,
    *,
    name: str = "shard",
    shard_bytes: int = 1 << 30,
    max_samples_per_shard: int | None = None,
    video_size: int = DEFAULT_VIDEO_SIZE,
    encode: EncodeOptions | None = None,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = True,
    limits: VideoLimits = SHARD_LIMITS,
    label_from_dir: bool = False,
    progress: bool = True,
    engine: str = "pool",
    ray_address: str | None = None,
    video_fn: str | None = None,
) -> Manifest:
    """Build (or finish, or confirm) a shard set in `out`; returns its manifest.

    A shard holds `max_samples_per_shard` videos, else `max(1, shard_bytes // video_size)` (the
    count is fixed before anything is encoded, so that shards are independent tasks). `engine`:
    "pool" (`workers` processes; 0 = in this process) or "ray" (see engines.run_tasks).
    `limits.timeout_s` is the time limit of one video. `video_fn` (tests): another per-video function.
    """
    if engine not in ENGINES:
        raise ShardBuildError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        try:
            require_ray()
        except EngineError as exc:
            raise ShardBuildError(str(exc)) from exc
    items = list(inputs) if not isinstance(inputs, (str, Path)) else list_inputs(inputs, label_from_dir)
    if not items:
        raise ShardBuildError(f"{inputs}: no input videos found")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ShardBuildError(f"shard name {name!r} must be letters, digits, '_' or '-'")
    per_shard = max_samples_per_shard or max(1, shard_bytes // max(1, video_size))
    if per_shard < 1:
        raise ShardBuildError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    items.sort(key=lambda i: (i.source, i.path))
    if shuffle:
        random.Random(seed).shuffle(items)
    items = [
        InputVideo(i.path if is_url(i.path) else os.path.abspath(i.path), i.source, i.label) for i in items
    ]
    options = {
        "name": name,
        "encode": asdict(encode) if encode else None,
        "seed": seed,
        "shuffle": shuffle,
        "limits": {
            "max_pixels": limits.max_pixels,
            "min_side": limits.min_side,
            "timeout_s": limits.timeout_s,
        },
    }
    plan = Plan(
        "make_shards",
        options,
        tool_versions(),
        plan_rows([(i.source, i.label) for i in items]),
        tuple(i.path for i in items),
        per_shard,
    )
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        old = check_against(out, plan, "shard set")
    except PlanError as exc:
        raise ShardBuildError(str(exc)) from exc
    if (out / MANIFEST_NAME).exists():
        manifest, _ = read_manifest(out)
        if old is None and manifest.build.get("fingerprint") != plan.hash:
            raise ShardBuildError(
                f"{out} already holds a finished shard set from other inputs or options, or from an "
                f"older make_shards (fingerprint {manifest.build.get('fingerprint')} != {plan.hash}); "
                "use another --out"
            )
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
        return manifest
    if old is None and (any(out.glob("*.tar")) or (out / PARTS_DIR).exists()):
        raise ShardBuildError(f"{out} holds shards from an unknown build (no {PLAN_NAME}); use another --out")
    write_plan(out / PLAN_NAME, plan)  # before any shard: a resumed run compares against it
    remove_temporaries(out)
    video_fn = video_fn or os.environ.get(VIDEO_FN_ENV) or DEFAULT_VIDEO_FN
    results: dict[int, dict] = {}
    tasks = []
    for k in range(plan.num_shards):
        kept = kept_result(out, shard_name(name, k))
        if kept is not None:
            results[k] = kept
            continue
        entries = tuple((i, items[i]) for i in plan.shard(k))
        tasks.append(
            ShardTask(str(out), shard_name(name, k), k, entries, encode, limits, plan.versions, video_fn)
        )
    run_with_progress(tasks, results, plan, engine, workers, ray_address, progress, f"shards -> {out}")
    return _finish(out, name, plan, results, options)


def run_with_progress(tasks, results, plan, engine, workers, ray_address, progress, desc, fn=None, videos=-1):
    """Run the tasks (`fn`, build_shard by default), filling `results` (shard number -> result), with
    bars over shards and videos (`videos`: how many in all; -1: the plan's inputs; None: unknown)."""
    from tqdm import tqdm

    total = len(plan.inputs) if videos == -1 else videos
    bars = [
        tqdm(total=plan.num_shards, initial=len(results), unit="shard", desc=desc, disable=not progress),
        tqdm(
            total=total,
            initial=sum(r["videos"] for r in results.values()),
            unit="video",
            desc="videos",
            disable=not progress,
        ),
    ]
    rejects = sum(len(r["rejects"]) for r in results.values())
    try:
        for result in run_tasks(
            fn or build_shard, tasks, engine=engine, workers=workers, ray_address=ray_address
        ):
            results[result["shard"]] = result
            rejects += len(result["rejects"])
            bars[0].update(1)
            bars[1].update(result["videos"])
            bars[1].set_postfix(rejects=rejects, refresh=False)
    except EngineError as exc:
        raise ShardBuildError(str(exc)) from exc
    finally:
        for bar in reversed(bars):
            bar.close()
        close_runners()  # the in-process pool's video worker


def write_rejects(out: Path, results: dict[int, dict]) -> list[dict]:
    """All results' rejects, sorted by input (or shard and key): the same file whatever order the
    shards finished in."""
    rejects = sorted(
        (r for k in sorted(results) for r in results[k]["rejects"]),
        key=lambda r: (
            r.get("source", ""),
            r.get("shard", ""),
            r.get("key", ""),
            json.dumps(r, sort_keys=True),
        ),
    )
    with open(out / (REJECTS_NAME + ".tmp"), "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rejects)
        f.flush()
        os.fsync(f.fileno())
    (out / (REJECTS_NAME + ".tmp")).replace(out / REJECTS_NAME)
    return rejects


def _finish(out: Path, name: str, plan: Plan, results: dict[int, dict], options: dict) -> Manifest:
    """rejects.jsonl, then the manifest (last, atomically), then the resume files go."""
    rejects = write_rejects(out, results)
    shards = [
        ShardInfo(r["name"], r["samples"], r["bytes"], r["sha256"], r["index"])
        for k, r in sorted(results.items())
        if r["samples"] > 0
    ]
    if not shards:
        raise ShardBuildError(f"all {len(plan.inputs)} inputs were rejected; see {out / REJECTS_NAME}")
    build = {"fingerprint": plan.hash, "inputs": len(plan.inputs), "per_shard": plan.per_shard, **options}
    build["versions"] = plan.versions
    manifest = Manifest(shards, name, len(rejects), build)
    write_json_atomic(out / MANIFEST_NAME, manifest.to_dict())
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    remove_temporaries(out)
    return manifest


# ---- command line ------------------------------------------------------------------------------------


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


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--engine, --workers, --ray-address: shared by make_shards and index_shards."""
    g = p.add_argument_group("where the work runs")
    g.add_argument("--engine", choices=ENGINES, default="pool", help="local process pool (default) or Ray")
    g.add_argument(
        "--workers",
        type=int,
        default=max(1, usable_cores() - 1),
        help="pool: processes (0: this process); ray: tasks at a time, and the CPUs of a local instance",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="'auto' (the cluster `ray start` made on this node) or the head's host:port; "
        "default: start a local Ray instance with --workers CPUs",
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("input", help="folder of videos (recursive) or a .csv / .jsonl list of path[,label]")
    p.add_argument("--out", required=True, help="output folder for shards, manifest.json, rejects.jsonl")
    p.add_argument("--name", default="shard", help="shard file prefix: NAME-000000.tar (default: shard)")
    p.add_argument(
        "--shard-size",
        type=parse_size,
        default=parse_size("1GB"),
        help="target bytes per shard: a shard holds shard-size / video-size videos (default 1GB)",
    )
    p.add_argument(
        "--video-size",
        type=parse_size,
        default=DEFAULT_VIDEO_SIZE,
        help="expected bytes per video (default 1MB)",
    )
    p.add_argument(
        "--max-samples-per-shard", type=int, default=None, help="videos per shard (overrides sizes)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the input shuffle (default: 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted input order")
    p.add_argument("--label-from-dir", action="store_true", help="folder input: label = parent folder name")
    p.add_argument("--max-pixels", type=int, default=VideoLimits.max_pixels, help="reject larger frames")
    p.add_argument("--min-side", type=int, default=VideoLimits.min_side, help="reject smaller frames")
    p.add_argument(
        "--video-timeout",
        type=float,
        default=DEFAULT_VIDEO_TIMEOUT_S,
        help=f"seconds for one video (read, decode, encode) before a reject ({DEFAULT_VIDEO_TIMEOUT_S:g})",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(p)
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
            video_size=args.video_size,
            encode=encode,
            workers=args.workers,
            seed=args.seed,
            shuffle=not args.no_shuffle,
            limits=VideoLimits(args.max_pixels, args.min_side, args.video_timeout),
            label_from_dir=args.label_from_dir,
            progress=not args.quiet,
            engine=args.engine,
            ray_address=args.ray_address,
        )
    except ShardBuildError as exc:
        print(f"make_shards: error: {exc}", file=sys.stderr)
        return 2
    print(build_table(manifest, Path(args.out), time.monotonic() - t0))
    per_video = manifest.total_bytes / max(1, manifest.total_samples)
    print(f"{per_video / 1e6:.2f} MB per video: --video-size for runs like this one")
    return 0
