"""The loader at cluster scale: what an epoch reads (simulated, no I/O) and clips/s with and without an index.

    python tools/bench_loader.py --simulate       # the table: before (today's partition) and after
    python tools/bench_loader.py --throughput     # clips/s: the index path, the path without, today's code
    python tools/bench_loader.py --http           # MB/s over http: one streamed GET vs 32 MiB ranges

--simulate plans epochs over synthetic manifests (1 MB samples, 10,000 per shard unless the shard
count says otherwise) with plan.py, the code the loader runs, and computes today's partition (whole
shards dealt round-robin when shards >= streams, else every stream reads every shard and keeps
every S-th sample) from its rule. Also the elastic resume 1,024 -> 768 -> 1,280 streams.

--throughput times one stream (rank R of a world of S ranks, loading in process, so the process's
CPU time is all of it: the machine is shared, and CPU time is what contention disturbs least) over a set of
16 copies of one real video (the demo's bigbuckbunny, 128 px; 4 shards of 4) for: the index path;
the same shards
without an index (read from the shard's start); and today's loader (`--base`, default the merge-base
with main)
extracted with `git archive` and run from a subprocess. Rounds alternate between them; best of
the rounds is reported, with the bytes the readers returned.

--http serves a 300 MB file of random bytes from tests/scripts/http_server.py (the tests' range
server) on 127.0.0.1 and reads one 290 MB run of it, alternately with `source.open_range` (one
streamed GET, read in `--chunk` pieces) and with fsspec `cat_file` range requests of 32 MiB (the
loader before 2026-12-02); best of the rounds in MB/s and the number of GETs each made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = 1 << 20
SPAN = SAMPLE + 3 * 512  # a sample's bytes in its tar: two member headers and the json's block
INDEX_ROW = 48  # bytes per sample of an index file


def manifest(shards: int, total: int):
    import numpy as np

    counts = np.full(shards, total // shards, dtype=np.int64)
    counts[: total % shards] += 1
    return counts, counts * SPAN + 1024


def before(counts, sizes, streams: int) -> dict:
    """Today's partition, by its rule: whole shards per stream, or every stream reads every shard."""
    import numpy as np

    k = len(counts)
    if k >= streams:
        per = [
            counts[s::streams].sum() for s in range(streams)
        ]  # the shard order does not change the sizes much
        opens = [len(counts[s::streams]) for s in range(streams)]
        return dict(read=1.0, opens=max(opens), spread=int(max(per) - min(per)))
    return dict(
        read=float(streams), opens=k, spread=int(np.ceil(counts.sum() / streams) - counts.sum() // streams)
    )


def simulate() -> None:
    import numpy as np

    from mae_scale.data.plan import EpochPlan, Generation, Layout, fresh_read_cost, slice_read_cost
    from mae_scale.data.source import RANGE_CHUNK

    rows = [
        (2, 4, 4),
        (8, 4, 4),  # the demo measurement (4 shards of 1)
        (1280, 1000, 10_000_000),
        (1280, 1279, 10_000_000),
        (1280, 1280, 10_000_000),
        (1280, 1281, 10_000_000),
        (10_240, 1000, 10_000_000),
        (10_240, 10_239, 10_000_000),
        (10_240, 10_240, 10_000_000),
        (10_240, 10_241, 10_000_000),
        (10_240, 100_000, 10_000_000),
    ]
    print(
        "| streams | shards | samples | before: read / data | before: opens per stream (max) | before: "
        "samples per stream, max - min | after, index: read / data | after: opens (max) | after: index "
        "reads (max) | after: http requests (max) | after: other URLs, requests at 64 MiB (max) | after: "
        "max - min | after, no index or pipe: read / data | plan time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for streams, shards, total in rows:
        counts, sizes = manifest(shards, total)
        t0 = time.perf_counter()
        cost = fresh_read_cost(counts, sizes, 0, 0, streams, seekable=True)
        seconds = time.perf_counter() - t0
        blind = fresh_read_cost(counts, sizes, 0, 0, streams, seekable=False)
        index = (cost.index_reads * INDEX_ROW * counts.max()).sum()
        old = before(counts, sizes, streams)
        chunked = np.ceil(cost.bytes / RANGE_CHUNK) + cost.opens  # each run: ceil(bytes / chunk), at most
        cells = [
            f"{streams:,}",
            f"{shards:,}",
            f"{total:,}",
            f"{old['read']:.2f}x",
            f"{old['opens']:,}",
            f"{old['spread']:,}",
            f"{(cost.bytes.sum() + index) / sizes.sum():.4f}x",
            f"{cost.opens.max()}",
            f"{cost.index_reads.max()}",
            f"{int(cost.opens.max()):,}",  # http: one streamed GET per run
            f"{int(chunked.max()):,}",
            f"{cost.samples.max() - cost.samples.min()}",
            f"{blind.bytes.sum() / sizes.sum():.2f}x",
            f"{seconds * 1e3:.0f} ms",
        ]
        print("| " + " | ".join(cells) + " |")
    # elastic: 1,024 -> 768 -> 1,280 streams, each old stream stopped at a random point of epoch 0
    counts, sizes = manifest(1000, 10_000_000)
    rng = np.random.default_rng(0)
    history: list[Generation] = []
    t0 = time.perf_counter()
    for streams in (1024, 768):
        plan = EpochPlan(counts, 0, streams, 64, history)
        positions = []
        for t in range(streams):
            n = len(plan.positions(plan.start_epoch(), t))
            positions.append((plan.start_epoch(), int(rng.integers(0, n + 1))))
        history.append(Generation(streams, tuple(positions), 64))
    last = EpochPlan(counts, 0, 1280, 64, history)
    seconds = time.perf_counter() - t0
    layout = Layout.of(counts, 0, 0)
    costs = [slice_read_cost(layout, last.positions(0, t), sizes, counts, seekable=True) for t in range(1280)]
    left = len(last.remaining[0])
    read = sum(b for b, _ in costs) / (left * SPAN)
    opens = [o for _, o in costs]
    print(
        f"\nelastic 1,024 -> 768 -> 1,280 streams mid-epoch (1,000 x 10,000): {left:,} samples left for the "
        f"1,280 streams, read / those samples' bytes = {read:.4f}, opens per stream max {max(opens)} mean "
        f"{sum(opens) / len(opens):.1f}; both remainders computed in {seconds:.2f} s"
    )


# -- throughput ------------------------------------------------------------------------------------

MEASURE = r"""
import json, sys, time, torch
from mae_scale.config import DataConfig
from mae_scale.data.loader import build_loader
torch.set_num_threads(1)
shards, rank, world, batch, warmup, epochs = sys.argv[1], *map(int, sys.argv[2:7])
cfg = DataConfig(shards=shards, num_frames=16, stride=4, size=112, repeats=4, workers=0, shuffle_buffer=64)
loader = build_loader(cfg, batch_size=batch, seed=0, rank=rank, world_size=world)
it = iter(loader)
for _ in range(warmup):
    next(it)
start, cpu, clips = time.perf_counter(), time.process_time(), 0
for _ in range(epochs):
    clips += next(it)["clips"].shape[0]
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
stats = loader.stats()
print(json.dumps({"clips_per_s": clips / seconds, "clips_per_cpu_s": clips / cpu,
                  "bytes_read": stats.get("bytes_read"), "batches": warmup + epochs}))
"""


READ_ONLY = r"""
import json, sys, time
from mae_scale.config import DataConfig
from mae_scale.data.loader import build_loader
from mae_scale.data.stream import ClipStream
shards, rank, world, epochs = sys.argv[1], *map(int, sys.argv[2:5])
cfg = DataConfig(shards=shards, num_frames=16, stride=4, size=112, repeats=4, workers=0, shuffle_buffer=64)
loader = build_loader(cfg, batch_size=1, seed=0, rank=rank, world_size=world)
stream = ClipStream(loader.spec, [(0, 0)])
cpu, n = time.process_time(), 0
for epoch in range(epochs):
    n += sum(1 for _ in stream.epoch_items(rank, epoch))
print(json.dumps({"ms_per_sample": (time.process_time() - cpu) / n * 1e3, "samples": n}))
"""


def bench_set(root: Path) -> tuple[Path, Path]:
    """16 copies of one real video (the demo's bigbuckbunny, 128 px) in 4 shards of 4, and a copy
    without its index. One video: the partitions compared give streams different samples, and
    equal samples make their clips cost the same."""
    from mae_scale.data.demo import DEMO_ENCODE, demo_sources
    from mae_scale.data.make_shards import make_shards
    from mae_scale.data.shards import write_json_atomic

    indexed, plain = root / "indexed", root / "plain"
    if not (indexed / "manifest.json").exists():
        make_shards(
            demo_sources()[:1] * 16,
            indexed,
            name="bench",
            max_samples_per_shard=4,
            encode=DEMO_ENCODE,
            progress=False,
            seed=0,
        )
    if not (plain / "manifest.json").exists():
        plain.mkdir(parents=True, exist_ok=True)
        for tar in indexed.glob("*.tar"):
            shutil.copy(tar, plain)
        data = json.loads((indexed / "manifest.json").read_text())
        for s in data["shards"]:
            s.pop("index", None)
        write_json_atomic(plain / "manifest.json", data)
    return indexed, plain


def measure(pythonpath: Path, shards: Path, rank: int, world: int, batch: int, epochs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(shards), str(rank), str(world), str(batch), "2", str(epochs)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_only(old: Path, indexed: Path, plain: Path, rank: int, world: int, rounds: int) -> str:
    """CPU ms per sample of the stream stage alone (tar reads and plan, no decode), best of rounds."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (path, shards) in {
            "index": (REPO, indexed),
            "no index": (REPO, plain),
            "today": (old, plain),
        }.items():
            env = {**os.environ, "PYTHONPATH": str(path)}
            out = subprocess.run(
                [sys.executable, "-c", READ_ONLY, str(shards), str(rank), str(world), "300"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                cwd=tempfile.gettempdir(),
            )
            ms = json.loads(out.stdout.strip().splitlines()[-1])["ms_per_sample"]
            best[name] = min(ms, best.get(name, ms))
    return ", ".join(f"{name} {ms:.3f}" for name, ms in best.items())


def throughput(base: str, rounds: int, epochs: int) -> None:
    root = Path(tempfile.gettempdir()) / "mae_scale_bench_loader"
    indexed, plain = bench_set(root)
    old = root / f"base_{base[:12]}"
    if not (old / "mae_scale").is_dir():
        old.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", base, "mae_scale"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", base], capture_output=True, text=True
    ).stdout.strip()
    settings = [  # (what, rank, world): one stream each (1 worker); 16 videos in 4 shards
        ("shards >= streams: 4 shards, 3 streams (rank 1)", 1, 3),
        ("shards >= streams: 4 shards, 4 streams (rank 1)", 1, 4),
        ("shards < streams: 4 shards, 8 streams (rank 3)", 3, 8),
    ]
    for what, rank, world in settings:
        batch = 16 // world  # videos per epoch of this stream, at most: one batch an epoch or so
        variants = {"index": (REPO, indexed), "no index": (REPO, plain), f"today ({commit})": (old, plain)}
        best: dict[str, dict] = {}
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (path, shards) in variants.items():
                r = measure(path, shards, rank, world, batch, epochs)
                rates[name].append(round(r["clips_per_cpu_s"], 1))
                if name not in best or r["clips_per_cpu_s"] > best[name]["clips_per_cpu_s"]:
                    best[name] = r
        today = best[f"today ({commit})"]
        parts = []
        for name, r in best.items():
            read = f", {r['bytes_read'] / 1e6:.2f} MB read" if r["bytes_read"] is not None else ""
            parts.append(
                f"{name} {r['clips_per_cpu_s']:.1f} clips per CPU-s "
                f"({r['clips_per_cpu_s'] / today['clips_per_cpu_s']:.2f}x"
                f" today; wall {r['clips_per_s']:.1f} clips/s{read} in {r['batches']} batches)"
            )
        print(f"{what}: " + " | ".join(parts))
        print(
            "    rounds (clips per CPU-s): " + "; ".join(f"{name} {v}" for name, v in rates.items()),
            flush=True,
        )
        print(
            "    stream stage alone (no decode), CPU ms per sample: "
            + read_only(old, indexed, plain, rank, world, 3)
        )


def http(rounds: int, chunks: list[int]) -> None:
    from mae_scale.data import source

    size, start, end = 300_000_000, 1000, 290_000_000
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "big.tar"), "wb") as f:
            f.write(os.urandom(size))
        server = subprocess.Popen(
            [sys.executable, str(REPO / "tests/scripts/http_server.py"), tmp, "--log", f"{tmp}/log.jsonl"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            url = f"http://127.0.0.1:{int(server.stdout.readline())}/big.tar"

            def streamed(chunk: int) -> int:
                source.HTTP_CHUNK, n = chunk, 0
                with source.open_range(url, start, end) as f:
                    while block := f.read(1 << 20):
                        n += len(block)
                return n

            def ranges() -> int:
                fs, path = source._filesystem(url)
                step = 32 << 20
                return sum(
                    len(fs.cat_file(path, start=a, end=min(a + step, end))) for a in range(start, end, step)
                )

            ways = {f"one streamed GET, {c >> 10} KiB reads": lambda c=c: streamed(c) for c in chunks}
            ways["32 MiB range requests (cat_file)"] = ranges
            best: dict[str, float] = {}
            gets: dict[str, int] = {}
            log = os.path.join(tmp, "log.jsonl")
            for _ in range(rounds):
                for name, read in ways.items():
                    before = sum(1 for _ in open(log)) if os.path.exists(log) else 0
                    t0 = time.perf_counter()
                    assert read() == end - start
                    rate = (end - start) / (time.perf_counter() - t0) / 1e6
                    best[name] = max(best.get(name, 0.0), rate)
                    gets[name] = sum(1 for _ in open(log)) - before
        finally:
            server.terminate()
            server.wait(timeout=30)
    base = best["32 MiB range requests (cat_file)"]
    print("| read of one 290 MB run | MB/s (best of rounds) | / 32 MiB ranges | GETs |")
    print("|---|---|---|---|")
    for name, rate in best.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} | {gets[name]} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--simulate", action="store_true")
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--http", action="store_true")
    p.add_argument("--chunk", type=int, nargs="+", default=[256 << 10, 1 << 20, 4 << 20], help="--http reads")
    p.add_argument(
        "--base", default="", help="the commit whose loader is today's (default: merge-base with main)"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=40, help="batches timed per round")
    args = p.parse_args(argv)
    if not (args.simulate or args.throughput or args.http):
        args.simulate = args.throughput = True
    if args.http:
        http(args.rounds, args.chunk)
    if args.simulate:
        simulate()
    if args.throughput:
        base = (
            args.base
            or subprocess.run(
                ["git", "-C", str(REPO), "merge-base", "HEAD", "main"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        throughput(base, args.rounds, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
