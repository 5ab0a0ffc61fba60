"""Adopt WebDataset video shards that other tools wrote: our manifest and per-sample index, in place.

    python tools/index_shards.py '/data/webvid/{00000..00999}.tar' --out /data/webvid_index
    python tools/index_shards.py /data/v2d_shards --out /data/v2d_index --engine ray --ray-address auto
    # then train with data.shards=/data/webvid_index: the tars are read where they are

SHARDS are folders (every `*.tar` below them, sorted), brace patterns, paths or URLs (anything the
loader reads: http(s), `pipe:` commands). Every shard is read once, as a stream: its sha256 and size,
each sample's byte span (the index), and each sample's video (the first member named `.mp4`,
`.webm`, `.mkv`, `.avi`, `.mov` or `.m4v`; `.json`, `.txt`, `.cls` or anything else beside it may be
there or not) decoded once to count its frames, which the loader needs to plan clips and which
other tools do not write. The index files, `manifest.json` (naming each tar by its path or URL) and
`rejects.jsonl` go to `--out`; the tars are neither copied nor changed.

Samples that cannot be used (no video member, a video that does not decode, a json that is not an
object or whose `frames` disagree with the video, a duplicate key, ...) are listed in rejects.jsonl
with the reason; they stay in the tar, counted in the manifest like any sample, and the loader skips
them as bad samples (so they count towards `data.max_bad_ratio`). A shard that is truncated or not
a tar is listed and left out of the manifest. Runs on the local pool or on Ray, resumes, and refuses
a resumed run with other shards or options, exactly as make_shards does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae_scale.data.decode import BadVideo, VideoLimits, probe
from mae_scale.data.engines import ENGINES, EngineError, require_ray, video_runner
from mae_scale.data.index import (
    INDEX_SUFFIX,
    SampleSpan,
    ShardIndex,
    ShardIndexError,
    read_index,
    write_index,
)
from mae_scale.data.make_shards import (
    DEFAULT_VIDEO_TIMEOUT_S,
    PARTS_DIR,
    REJECTS_NAME,
    VIDEO_FN_ENV,
    ShardBuildError,
    add_engine_args,
    check_versions,
    fsync_dir,
    hard_timeout,
    remove_temporaries,
    run_with_progress,
    write_rejects,
)
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
    MAX_MEMBER_BYTES,
    HashingReader,
    Manifest,
    ShardInfo,
    adopted_meta,
    is_url,
    is_video_member,
    open_shard,
    read_manifest,
    split_key,
    video_member,
    write_json_atomic,
)

DEFAULT_PROBE_FN = "mae_scale.data.adopt:probe_job"
ADOPT_LIMITS = VideoLimits(timeout_s=DEFAULT_VIDEO_TIMEOUT_S)


def expand_shards(specs: Sequence[str]) -> list[str]:
    """Shard locations from folders, brace patterns (`{00000..00999}`), paths and URLs, in the order
    given (a folder's tars sorted), each once. Local paths become absolute."""
    from braceexpand import braceexpand

    found: list[str] = []
    for spec in specs:
        for item in braceexpand(spec):
            if is_url(item):
                found.append(item)
                continue
            path = Path(item)
            if path.is_dir():
                found += sorted(str(p.resolve()) for p in path.rglob("*.tar") if p.is_file())
            elif path.is_file():
                found.append(str(path.resolve()))
            else:
                raise ShardBuildError(f"{item}: no such shard or folder")
    return list(dict.fromkeys(found))


def shard_names(locations: Sequence[str]) -> list[str]:
    """Unique, readable names: each location less the folder (or URL prefix) they all share."""
    prefix = os.path.commonprefix(list(locations))
    prefix = prefix[: prefix.rfind("/") + 1]
    return [loc[len(prefix) :] for loc in locations]


def index_file(name: str) -> str:
    """Where the index of shard `name` goes, relative to --out."""
    return re.sub(r"[^A-Za-z0-9._/-]+", "_", name).strip("/") + INDEX_SUFFIX


def probe_job(job: tuple[str, bytes, VideoLimits]) -> dict[str, Any]:
    """The per-video work (in a VideoRunner child): decode every frame once, count them."""
    _, data, limits = job
    try:
        info = probe(data, limits)
    except BadVideo as exc:
        return {"reason": exc.reason, "detail": exc.detail}
    return {"frames": info.frames}


@dataclass(frozen=True)
class IndexTask:
    out: str  # the output folder (absolute)
    shard: int  # position in the plan
    name: str  # the shard's name in the manifest
    location: str  # where the tar is read
    index: str  # its index file, relative to `out`
    limits: VideoLimits
    versions: dict[str, str]
    video_fn: str = DEFAULT_PROBE_FN


@dataclass
class _Sample:
    key: str
    start: int
    end: int = 0
    exts: list[str] = field(default_factory=list)
    members: dict[str, bytes] = field(default_factory=dict)
    problem: tuple[str, str] | None = None


def index_shard(task: IndexTask) -> dict[str, Any]:
    """Read one adopted shard: its sha256, size and index (written to `out`), and its rejects."""
    check_versions(task.versions, "index")
    out = Path(task.out)
    suffix = f".{socket.gethostname()}-{os.getpid()}.tmp"
    runner = video_runner(task.video_fn)
    spans: list[SampleSpan] = []
    rejects: list[dict] = []
    seen: set[str] = set()
    frames_total = 0

    def reject(key: str, reason: str, detail: str) -> None:
        rejects.append({"shard": task.name, "key": key, "reason": reason, "detail": detail[:500]})

    def finish(sample: _Sample) -> None:
        nonlocal frames_total
        problem, frames = sample.problem, None
        if sample.key in seen:
            problem = ("duplicate_key", f"key {sample.key!r} appears twice in the shard")
        seen.add(sample.key)
        video = video_member(sample.members)
        if problem is None and video is None:
            problem = ("no_video_member", f"members: {', '.join('.' + e for e in sample.exts)}")
        want = None  # frames the json claims
        if problem is None:
            try:
                want = adopted_meta(sample.members).get("frames")
            except ValueError as exc:
                problem = ("bad_json", str(exc))
        if problem is None:
            status, got = runner.run(
                (sample.key, sample.members[video], task.limits), hard_timeout(task.limits)
            )
            if status != "ok":
                problem = (status, got)
            elif "reason" in got:
                problem = (got["reason"], got["detail"])
            elif want is not None and want != got["frames"]:
                problem = ("frames_mismatch", f"its json says {want} frames, the video has {got['frames']}")
            else:
                frames = got["frames"]
                frames_total += frames
        if problem is not None:
            reject(sample.key, *problem)
        spans.append(SampleSpan(sample.key, sample.start, sample.end - sample.start, frames))

    done = {"shard": task.shard, "name": task.name, "url": task.location, "index": task.index}
    bad = None
    try:
        stream = open_shard(task.location)
    except Exception as exc:  # noqa: BLE001 - reported as the shard's reject
        bad = ("unreadable_shard", f"{task.location}: {exc}")
    else:
        reader = HashingReader(stream)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                current: _Sample | None = None
                for info in tar:
                    key, ext = split_key(info.name)
                    if not info.isreg() or key is None:
                        continue  # folders, and members of no sample, as webdataset skips them
                    if current is None or key != current.key:
                        if current is not None:
                            finish(current)
                        current = _Sample(key, info.offset)
                    current.end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    ext = ext.lower()
                    if ext in current.exts:
                        current.problem = ("duplicate_member", f"{info.name} appears twice")
                    current.exts.append(ext)
                    if ext == "json" or is_video_member(ext):
                        if info.size > MAX_MEMBER_BYTES:
                            current.problem = ("member_too_large", f"{info.name}: {info.size} bytes")
                        else:
                            current.members[ext] = tar.extractfile(info).read()
                if current is not None:
                    finish(current)
            while reader.read(1 << 20):
                pass  # the end blocks and padding count in the size and sha256 too
        except (tarfile.TarError, OSError, EOFError) as exc:
            bad = ("bad_tar", f"truncated or corrupt: {exc}")
        finally:
            try:
                stream.close()
            except Exception as exc:  # noqa: BLE001 - e.g. a pipe: command that failed
                bad = bad or ("unreadable_shard", f"{task.location}: {exc}")
    if bad is None and not spans:
        bad = ("empty_shard", "no samples")
    if bad is not None:  # the whole shard stays out of the manifest
        rejects[:] = [{"shard": task.name, "key": "", "reason": bad[0], "detail": bad[1]}]
        done.update(samples=0, bytes=0, sha256="", usable=0, frames=0, rejects=rejects, videos=0)
    else:
        index = ShardIndex(task.name, reader.size, tuple(spans))
        index.check(task.location)
        (out / task.index).parent.mkdir(parents=True, exist_ok=True)
        write_index(out / task.index, index, tmp_suffix=suffix)
        fsync_dir((out / task.index).parent)
        usable = len(spans) - len({r["key"] for r in rejects})
        done.update(samples=len(spans), bytes=reader.size, sha256=reader.hash.hexdigest(), usable=usable)
        done.update(frames=frames_total, rejects=rejects, videos=len(spans))
    (out / PARTS_DIR).mkdir(exist_ok=True)
    write_json_atomic(out / PARTS_DIR / f"{task.shard:06d}.json", done, tmp_suffix=suffix)
    return done


def _kept(out: Path, task: IndexTask) -> dict | None:
    """A shard indexed by an earlier run, if its result and index are there and (for a local tar)
    its size is unchanged; adopted sets can be terabytes, so they are not hashed again."""
    part = out / PARTS_DIR / f"{task.shard:06d}.json"
    try:
        done = json.loads(part.read_text())
        if done["url"] != task.location:
            return None
        if done["samples"] == 0:
            return done
        ok = read_index(str(out / done["index"])).bytes == done["bytes"]
        ok = ok and (is_url(task.location) or Path(task.location).stat().st_size == done["bytes"])
    except (OSError, ValueError, KeyError, TypeError, ShardIndexError):
        ok = False
    if not ok:
        part.unlink(missing_ok=True)
        return None
    return done


def index_shards(
    shards: Sequence[str] | str,
    out: str | Path,
    *,
    workers: int = 0,
    engine: str = "pool",
    ray_address: str | None = None,
    limits: VideoLimits = ADOPT_LIMITS,
    progress: bool = True,
    video_fn: str | None = None,
) -> Manifest:
    """Adopt (or finish adopting, or confirm) the shards in `out`; returns the manifest written there."""
    if engine not in ENGINES:
        raise ShardBuildError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ray":
        try:
            require_ray()
        except EngineError as exc:
            raise ShardBuildError(str(exc)) from exc
    locations = expand_shards([shards] if isinstance(shards, str) else list(shards))
    if not locations:
        raise ShardBuildError(f"{shards}: no shards found (a folder is searched for *.tar)")
    names = shard_names(locations)
    options = {
        "limits": {
            "max_pixels": limits.max_pixels,
            "min_side": limits.min_side,
            "timeout_s": limits.timeout_s,
        }
    }
    plan = Plan(
        "index_shards",
        options,
        tool_versions(),
        plan_rows([(loc,) for loc in locations]),
        tuple(locations),
        1,
    )
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    try:
        old = check_against(out, plan, "shard index")
    except PlanError as exc:
        raise ShardBuildError(str(exc)) from exc
    if (out / MANIFEST_NAME).exists():
        manifest, _ = read_manifest(out)
        if old is None:
            raise ShardBuildError(
                f"{out} already holds a manifest that index_shards did not plan; use another --out"
            )
        shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
        return manifest
    write_plan(out / PLAN_NAME, plan)
    remove_temporaries(out)
    video_fn = video_fn or os.environ.get(VIDEO_FN_ENV) or DEFAULT_PROBE_FN
    results: dict[int, dict] = {}
    tasks = []
    for k, (location, name) in enumerate(zip(locations, names, strict=True)):
        task = IndexTask(str(out), k, name, location, index_file(name), limits, plan.versions, video_fn)
        kept = _kept(out, task)
        if kept is not None:
            results[k] = kept
        else:
            tasks.append(task)
    run_with_progress(
        tasks,
        results,
        plan,
        engine,
        workers,
        ray_address,
        progress,
        f"index -> {out}",
        fn=index_shard,
        videos=None,
    )
    rejects = write_rejects(out, results)
    infos = [
        ShardInfo(r["name"], r["samples"], r["bytes"], r["sha256"], r["index"], r["url"])
        for _, r in sorted(results.items())
        if r["samples"] > 0
    ]
    if not infos:
        raise ShardBuildError(f"none of the {len(locations)} shards could be used; see {out / REJECTS_NAME}")
    build = {
        "fingerprint": plan.hash,
        "adopted": len(locations),
        "usable_samples": sum(r["usable"] for r in results.values()),
        **options,
        "versions": plan.versions,
    }
    manifest = Manifest(infos, "adopted", len(rejects), build)
    write_json_atomic(out / MANIFEST_NAME, manifest.to_dict())
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    remove_temporaries(out)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("shards", nargs="+", help="folders of .tar, brace patterns, shard paths or URLs")
    p.add_argument("--out", required=True, help="folder for manifest.json, the index files and rejects.jsonl")
    p.add_argument("--max-pixels", type=int, default=VideoLimits.max_pixels, help="reject larger frames")
    p.add_argument("--min-side", type=int, default=VideoLimits.min_side, help="reject smaller frames")
    p.add_argument(
        "--video-timeout", type=float, default=DEFAULT_VIDEO_TIMEOUT_S, help="seconds to decode one video"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_engine_args(p)
    args = p.parse_args(argv)
    try:
        manifest = index_shards(
            args.shards,
            args.out,
            workers=args.workers,
            engine=args.engine,
            ray_address=args.ray_address,
            limits=VideoLimits(args.max_pixels, args.min_side, args.video_timeout),
            progress=not args.quiet,
        )
    except ShardBuildError as exc:
        print(f"index_shards: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {len(manifest.shards)} shards, {manifest.total_samples} samples "
        f"({manifest.build['usable_samples']} usable), {manifest.total_bytes / 1e6:.1f} MB read in place; "
        f"{manifest.rejects} listed in {REJECTS_NAME}; train with data.shards={args.out}"
    )
    return 0
