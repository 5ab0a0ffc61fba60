"""The training data loader: infinite, exactly resumable streams of uint8 clip batches.

    loader = build_loader(cfg.data, batch_size=8, seed=0, rank=rank, world_size=world)
    for step, batch in zip(range(steps), loader):   # batch["clips"]: (B*R, C, T, H, W) uint8
        ...
    ckpt["data"] = loader.state_dict()               # position after the last batch received

Each DataLoader worker runs one `ClipStream` and builds whole batches (a batch is one worker's
videos); the DataLoader hands them out round-robin, in order. The position is therefore counted
here, in the main process, from the batches the trainer actually received (never from what the
workers prefetched): per worker (epoch, items consumed) plus which worker comes next. Every rank
yields forever, epochs following each other, so ranks running a fixed number of steps never wait
on each other at the end of the data.

On another number of ranks or workers, `load_elastic` continues the unfinished epochs exactly:
from every old rank's position it recomputes what the old streams consumed (plan.py) and splits
the rest over the new streams; the saved history of such changes is a few integers per old stream.
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import queue
import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from mae_scale.data.decode import VideoLimits
from mae_scale.data.plan import EpochPlan, Generation, PlanError, fresh_read_cost
from mae_scale.data.shards import MAX_MEMBER_BYTES, beside_manifest, manifest_location, read_manifest
from mae_scale.data.source import can_seek
from mae_scale.data.stream import (
    HEARTBEAT_ITEMS,
    BadDataError,
    BatchReturns,
    ClipStream,
    ShardRef,
    StreamSpec,
    stable_seed,
)
from mae_scale.data.transforms import ClipSpec, clip_pixels

__all__ = ["BadDataError", "ClipLoader", "DataStateError", "build_loader"]

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: block-shuffled balanced plan (plan.py) and its elastic history
RESHARD_POLICIES = (
    "exact",
    "replay",
    "skip",
)  # load_elastic, load_nearest_safe_point (config.py keeps a copy)


class DataStateError(ValueError):
    """A saved loader position that does not fit this loader; the message names the field."""


class _Totals:
    """Stats summed over the batches received (their deltas ride along with each batch)."""

    def __init__(self, d: dict[str, Any] | None = None):
        d = d or {}
        self.samples, self.decoded = int(d.get("samples", 0)), int(d.get("decoded", 0))
        self.bad, self.info = Counter(d.get("bad", {})), Counter(d.get("info", {}))
        self.examples: dict[str, str] = dict(d.get("examples", {}))

    def add(self, delta: dict[str, Any]) -> None:
        self.samples += delta["samples"]
        self.decoded += delta["decoded"]
        self.bad.update(delta["bad"])
        self.info.update(delta["info"])
        for reason, example in delta["examples"].items():
            self.examples.setdefault(reason, example)

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "decoded": self.decoded,
            "bad": dict(self.bad),
            "info": dict(self.info),
            "examples": dict(self.examples),
        }


class ClipLoader:
    """Iterable over batch dicts: "clips" uint8 (batch_size * R, C, T, H, W), "keys" and "labels"
    (one entry per clip, so each sample's key appears R times in a row) and "epoch" (the epoch of
    the batch's first sample, counted per worker stream).

    "clips" is laid out channels-last in memory (`torch.channels_last_3d`, as the resize makes it):
    `.to(device)` keeps that layout, conv3d takes it as is; use `.reshape`/einops, not `.view`.

    Clip batches are reused: once every tensor, view or storage on a batch's memory is gone, its
    worker writes a later batch into it (`BatchPool`), so keeping a batch or a view of it is safe.
    Not covered: a raw pointer, or a `.numpy()` array taken before the tensor was moved into new
    memory by `share_memory_()` or by sending it to another process. With `pin_memory` every batch
    is new (the copy into pinned memory is made out of our sight).
    """

    def __init__(
        self,
        spec: StreamSpec,
        *,
        manifest_id: str,
        num_workers: int,
        max_bad_ratio: float,
        min_samples: int = 20,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        timeout_s: float = 0.0,
        multiprocessing_context: str | None = None,
        source: str = "",
    ):
        self.spec, self.manifest_id, self.source = spec, manifest_id, source
        self.num_workers, self.max_bad_ratio, self.min_samples = num_workers, max_bad_ratio, min_samples
        self.pin_memory, self.prefetch_factor, self.timeout_s = pin_memory, prefetch_factor, timeout_s
        self.multiprocessing_context = multiprocessing_context
        self._positions: list[tuple[int, int]] = [(0, 0)] * spec.workers
        self._next = 0  # logical worker whose batch comes next
        self._totals = _Totals()
        # After an elastic resume: the generations before this one (plan.Generation), and this rank's
        # share of the epochs they left unfinished: _window[slot][epoch] = positions.
        self._history: tuple[Generation, ...] = ()
        self._window: dict[int, dict[int, np.ndarray]] = {}
        self._window_last = -1  # the window's last epoch
        self._batches_allocated = 0  # by the workers of this loader object: a memory figure, not saved
        # what this loader object's readers fetched: an I/O figure, not saved (a resumed run reads
        # the block it resumes in again, so the figure differs where the data does not)
        self._io = Counter(bytes_read=0, index_bytes_read=0, opens=0)
        self._bad_run = 0  # bad items since this rank's streams last gave a good sample
        # ... and how many make "no usable sample": more than the rank's share of an epoch
        self._bad_run_limit = max(HEARTBEAT_ITEMS, -(-sum(s.samples for s in spec.shards) // spec.world_size))

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        # Batch reuse: a batch's id goes back to its worker once every tensor on its memory has died.
        # The leases' finalizers only put on `released` (a queue.SimpleQueue, safe in __del__); the ids
        # are forwarded to the workers here, between batches. Both are made anew for each DataLoader,
        # so an id from an earlier iteration can never reach a later one's workers.
        returns, released = None, queue.SimpleQueue()
        if not self.pin_memory:
            if self.num_workers > 0:
                context = multiprocessing.get_context(self.multiprocessing_context)
                queues = [context.SimpleQueue() for _ in range(self.spec.workers)]
            else:
                queues = [queue.SimpleQueue()]
            # kept per worker: in flight, held by the trainer, released but not yet sent back
            returns = BatchReturns(queues, keep=self.prefetch_factor + 3)
        dataset = ClipStream(
            self.spec,
            list(self._positions),
            worker_offset=self._next,
            returns=returns,
            window=self._window,
            window_tag=f"g{len(self._history)}",
        )
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = dict(
                persistent_workers=True,
                prefetch_factor=self.prefetch_factor,
                multiprocessing_context=self.multiprocessing_context,
                timeout=self.timeout_s,
            )
        if self.num_workers > 0:
            extra["worker_init_fn"] = _ignore_stop_signals
        # Our own generator: without one, iter() draws the workers' base seed from the global torch RNG,
        # so the masks drawn after it would depend on when the loader (re)started. The stream itself is
        # seeded per sample and does not use the workers' seeds.
        generator = torch.Generator().manual_seed(stable_seed(self.spec.seed, "loader", self.spec.rank))
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            generator=generator,
            **extra,
        )
        batches = iter(loader)
        try:
            for batch in batches:
                worker = batch.pop("_worker")
                if worker != self._next:
                    raise RuntimeError(
                        f"batch from worker {worker} where worker {self._next} was due: order is lost"
                    )
                epoch, consumed = batch.pop("_position")
                self._positions[worker] = (int(epoch), int(consumed))
                self._next = (worker + 1) % self.spec.workers
                delta = batch.pop("_stats")
                self._batches_allocated += delta.pop("batches_allocated")
                for key in self._io:
                    self._io[key] += delta.pop(key)
                self._totals.add(delta)
                self._bad_run = 0 if delta["samples"] else self._bad_run + sum(delta["bad"].values())
                self._check_bad_ratio()
                if batch.pop("_heartbeat", False):  # a stream finding only bad samples: nothing to train
                    continue
                buffer = batch.pop("_buffer")
                if buffer >= 0:
                    give_back = functools.partial(released.put, (worker, buffer))
                    batch["clips"] = _leased(batch["clips"], give_back)
                yield batch
                del batch
                while not released.empty():
                    w, b = released.get()
                    returns.queues[w].put(b)
        finally:  # an error, or a consumer that stops early: end the workers now, not at exit
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _check_bad_ratio(self) -> None:
        t = self._totals
        if self._bad_run >= self._bad_run_limit:
            raise BadDataError(
                f"rank {self.spec.rank}: its streams gave no usable sample in {self._bad_run} items, more "
                f"than the rank's share of an epoch; bad: {dict(t.bad)}; examples: {t.examples}. Check "
                f"the shards with: python tools/verify_shards.py {self.source or '<shards dir>'}"
            )
        bad = sum(t.bad.values())
        seen = bad + t.samples
        if seen < self.min_samples or bad <= self.max_bad_ratio * seen:
            return
        reasons = "; ".join(
            f"{reason} x{n} (e.g. {t.examples.get(reason, '?')})" for reason, n in t.bad.most_common(3)
        )
        raise BadDataError(
            f"rank {self.spec.rank}: {bad} of {seen} samples are bad ({bad / seen:.1%}), above "
            f"data.max_bad_ratio={self.max_bad_ratio:.1%}. Most frequent: {reasons}. "
            f"Check the shards with: python tools/verify_shards.py {self.source or '<shards dir>'}"
        )

    def stats(self) -> dict[str, Any]:
        """Counts over the batches received so far (restored ones included): samples, bad per reason, ..."""
        d = self._totals.as_dict()
        bad = sum(self._totals.bad.values())
        d["clips"] = d["samples"] * self.spec.clip.repeats
        d["bad_total"] = bad
        d["bad_ratio"] = bad / max(1, bad + d["samples"])
        d["batches_allocated"] = self._batches_allocated  # new clip batches, not reused ones
        d.update(self._io)  # bytes_read (shards), index_bytes_read, opens: by this loader object
        d["epoch"] = min(e for e, _ in self._positions)
        return d

    @property
    def slots(self) -> range:
        """This rank's streams (global stream indices)."""
        first = self.spec.rank * self.spec.workers
        return range(first, first + self.spec.workers)

    # -- position -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position after the last batch the caller received.

        `positions[w]` = [epoch, items consumed in that epoch] of logical worker w (items are
        samples and tar faults, one per planned sample, out of the block shuffle); `epoch` is the
        coarse position, the epoch every stream of this rank has reached. `history`: the earlier
        generations (plan.Generation) while a stream of this rank still reads what they left of an
        epoch; empty once all have moved past it.
        """
        past_window = all(e > self._window_last for e, _ in self._positions)
        return {
            "version": STATE_VERSION,
            "manifest": self.manifest_id,
            "seed": self.spec.seed,
            "rank": self.spec.rank,
            "world_size": self.spec.world_size,
            "workers": self.spec.workers,
            "shuffle_buffer": self.spec.shuffle_buffer,
            "batch_size": self.spec.batch_size,
            "next_worker": self._next,
            "positions": [list(p) for p in self._positions],
            "epoch": min(e for e, _ in self._positions),
            "history": [] if past_window else [g.to_dict() for g in self._history],
            "stats": self._totals.as_dict(),
        }

    def _check_state(self, d: dict[str, Any], fields: Sequence[str], versions=(STATE_VERSION,)) -> None:
        if not isinstance(d, dict) or d.get("version") not in versions:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise DataStateError(
                f"data loader state version {got!r} is not {' or '.join(map(str, versions))}"
            )
        mine = self.state_dict()
        bad = [f"{k}: saved {d.get(k)!r}, now {mine[k]!r}" for k in fields if d.get(k) != mine[k]]
        if bad:
            raise DataStateError(
                "saved data loader position does not fit this loader (" + "; ".join(bad) + "). "
                "For another world size, worker count or shuffle buffer use load_elastic()."
            )

    def fits(self, d: dict[str, Any]) -> bool:
        """Whether `load_state_dict(d)` continues exactly (else: `load_elastic`, with every old rank's)."""
        keys = ("world_size", "workers", "shuffle_buffer", "rank")
        return (
            isinstance(d, dict)
            and d.get("version") == STATE_VERSION
            and all(d.get(k) == getattr(self.spec, k) for k in keys)
        )

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Continue exactly where a loader with the same data, seed, rank, world size, workers and
        shuffle buffer stopped.

        Call before iter(). The batch size may differ: each worker's stream continues exactly,
        only the grouping of samples into batches changes. A state of the version-1 loader (another
        sample order) restarts at the start of its earliest epoch, with a warning.
        """
        if isinstance(d, dict) and d.get("version") == 1:
            epoch = self.load_nearest_safe_point([d], policy="replay")
            log.warning(
                "data position saved by an older loader (state version 1, another sample order): "
                "rank %d restarts at the start of epoch %d",
                self.spec.rank,
                epoch,
            )
            return
        self._check_state(d, ("manifest", "seed", "rank", "world_size", "workers", "shuffle_buffer"))
        positions = d["positions"]
        if len(positions) != self.spec.workers or not 0 <= d["next_worker"] < self.spec.workers:
            raise DataStateError(
                f"saved positions {positions} / next_worker {d['next_worker']} are malformed"
            )
        try:
            self._set_history(tuple(Generation.from_dict(g) for g in d.get("history", [])))
        except PlanError as exc:
            raise DataStateError(f"saved data history does not fit this data: {exc}") from exc
        self._positions = [(int(e), int(c)) for e, c in positions]
        self._next = int(d["next_worker"])
        self._totals = _Totals(d.get("stats"))

    def load_elastic(self, states: Sequence[dict[str, Any]]) -> int:
        """Continue exactly from the states of every rank of a run with another number of ranks,
        workers per rank or shuffle buffer; returns the old number of ranks.

        Every sample of the epochs the old run had started and not finished is read once by the
        streams of both runs together: none repeated, none skipped. The epochs after those are
        planned as a run started at this size plans them. Stats restart from zero.
        """
        if not states:
            raise DataStateError("load_elastic needs the saved state of every old rank, got none")
        if any(isinstance(d, dict) and d.get("version") == 1 for d in states):
            epoch = self.load_nearest_safe_point(states, policy="replay")
            log.warning(
                "data positions saved by an older loader (state version 1, another sample order): "
                "the stream restarts at the start of epoch %d",
                epoch,
            )
            return len(states)
        for d in states:
            self._check_state(d, ("manifest", "seed"))
        world = {int(d["world_size"]) for d in states}
        workers = {int(d["workers"]) for d in states}
        blocks = {int(d["shuffle_buffer"]) for d in states}
        ranks = sorted(int(d["rank"]) for d in states)
        one_run = len(world) == len(workers) == len(blocks) == 1
        if not one_run or ranks != list(range(min(world))):
            raise DataStateError(
                f"load_elastic needs one state per old rank, all of one run: got ranks {ranks}, "
                f"world sizes {sorted({int(d['world_size']) for d in states})}, workers {sorted(workers)}, "
                f"shuffle buffers {sorted(blocks)}"
            )
        ordered = sorted(states, key=lambda d: int(d["rank"]))
        positions = tuple((int(e), int(c)) for d in ordered for e, c in d["positions"])
        histories = {json.dumps(d.get("history", []), sort_keys=True) for d in ordered if d.get("history")}
        if len(histories) > 1:
            raise DataStateError("the old ranks' states disagree on the data history (mixed checkpoints?)")
        try:
            history = tuple(Generation.from_dict(g) for g in json.loads(histories.pop())) if histories else ()
            old = Generation(len(positions), positions, blocks.pop())
            plan = self._set_history((*history, old))
        except PlanError as exc:
            raise DataStateError(f"the old ranks' data positions do not fit this data: {exc}") from exc
        self._positions = [(plan.start_epoch(), 0)] * self.spec.workers
        self._next = 0
        self._totals = _Totals()
        return len(ordered)

    def _set_history(self, history: tuple[Generation, ...]) -> EpochPlan | None:
        """Adopt earlier generations: compute this rank's share of what they left unfinished."""
        self._history, self._window, self._window_last = history, {}, -1
        if not history:
            return None
        counts = [s.samples for s in self.spec.shards]
        plan = EpochPlan(counts, self.spec.seed, self.spec.slots, self.spec.shuffle_buffer, history)
        self._window = {slot: {e: plan.positions(e, slot) for e in plan.remaining} for slot in self.slots}
        self._window_last = max(plan.remaining, default=-1)
        return plan

    def load_nearest_safe_point(self, states: Sequence[dict[str, Any]], policy: str = "replay") -> int:
        """Resume from the states of all old ranks at an epoch boundary; returns the epoch.

        `replay`: the earliest epoch any old stream was in; samples the old run saw in that epoch
        (and any later one) are seen again, none is skipped. `skip`: the epoch after the latest one
        any old stream had started; the unseen rest of unfinished epochs is skipped, nothing is
        repeated. Stats restart from zero. (`load_elastic` continues exactly instead.)
        """
        if not states:
            raise DataStateError("load_nearest_safe_point needs the saved state of at least one rank")
        for d in states:
            self._check_state(d, ("manifest", "seed"), versions=(1, STATE_VERSION))
        positions = [(int(e), int(c)) for d in states for e, c in d["positions"]]
        if policy == "replay":
            epoch = min(e for e, _ in positions)
        elif policy == "skip":
            epoch = max(e + (c > 0) for e, c in positions)
        else:
            raise ValueError(f"policy must be 'replay' or 'skip', got {policy!r}")
        self._set_history(())
        self._positions = [(epoch, 0)] * self.spec.workers
        self._next = 0
        self._totals = _Totals()
        return epoch


class _Lease:
    """What numpy reads a clip batch's memory through; `on_release` runs when the last tensor on it dies.

    Tensors made with `torch.from_numpy` keep their array, and the array this object, alive through
    any view, slice or storage reference, so the release cannot come while anything can still read it.
    """

    def __init__(self, pixels: torch.Tensor, on_release: Callable[[], None]):
        self.pixels, self.on_release = pixels, on_release  # pixels keeps the (shared) memory mapped
        self.__array_interface__ = {
            "shape": tuple(pixels.shape),
            "typestr": "|u1",
            "data": (pixels.data_ptr(), False),
            "version": 3,
        }

    def __del__(self):
        self.on_release()


def _leased(clips: torch.Tensor, on_release: Callable[[], None]) -> torch.Tensor:
    """The same clips (B*R, C, T, H, W), on the same memory, as a tensor whose death calls `on_release`."""
    pixels = clip_pixels(clips, "clip batch")  # (B*R, T, H, W, C): the memory order
    return torch.from_numpy(np.asarray(_Lease(pixels, on_release))).permute(0, 4, 1, 2, 3)


WORKER_STOP_GRACE_S = 20  # a worker outlives a SIGTERM this long, so the trainer can finish its step


def _ignore_stop_signals(_worker_id: int) -> None:
    """Ctrl-C, or a scheduler's SIGTERM to every process of the job, must reach the trainer (which
    finishes the step, checkpoints and exits 0), not kill the workers first and turn a clean stop into
    a crash. SIGINT is ignored; SIGTERM ends the worker after a grace period (SIGALRM), so that
    `Process.terminate()` still works; a second SIGTERM ends it at once. Workers also end when the
    trainer exits (DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _sigterm_after_grace)


def _sigterm_after_grace(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.alarm(WORKER_STOP_GRACE_S)  # SIGALRM's default action ends the process


def build_loader(
    data_cfg: Any,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    timeout_s: float = 0.0,
    decode_timeout_s: float = 60.0,
    min_samples: int = 20,
    prefetch_factor: int = 2,
    multiprocessing_context: str | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> ClipLoader:
    """A `ClipLoader` for one rank from a `DataConfig` (see mae_scale.config for the fields).

    `batch_size` counts videos per batch (each gives `data.repeats` clips). `timeout_s` > 0 makes a
    wait of that long for one batch an error instead of a silent hang; `decode_timeout_s` caps the
    wall time of one video's decode; `min_samples` is how many samples must be seen before the
    bad-sample ratio can stop the run.
    """
    errors = []
    if batch_size < 1:
        errors.append(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        errors.append(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    for key, ok, allowed in (
        ("workers", data_cfg.workers >= 0, ">= 0"),
        ("shuffle_buffer", data_cfg.shuffle_buffer >= 0, ">= 0"),
        ("max_bad_ratio", 0 <= data_cfg.max_bad_ratio <= 1, "in [0, 1]"),
        ("max_pixels", data_cfg.max_pixels > 0, "> 0"),
        ("min_side", data_cfg.min_side >= 1, ">= 1"),
    ):
        if not ok:
            errors.append(f"data.{key} must be {allowed}, got {getattr(data_cfg, key)!r}")
    try:
        clip = ClipSpec(
            data_cfg.num_frames,
            data_cfg.stride,
            data_cfg.size,
            data_cfg.repeats,
            tuple(data_cfg.crop_scale),
            tuple(data_cfg.crop_aspect),
            data_cfg.flip,
            data_cfg.short_video,
            data_cfg.repeat_span,
        )
    except ValueError as exc:
        errors.append(str(exc))
    if errors:
        raise ValueError("bad data loader settings: " + "; ".join(errors))

    manifest, urls = read_manifest(data_cfg.shards)
    workers = max(1, data_cfg.workers)
    slots = world_size * workers
    if manifest.total_samples == 0:
        raise ValueError(f"{data_cfg.shards}: the manifest lists no samples")
    if rank == 0:
        _warn_about_reads(manifest, urls, slots, seed, str(data_cfg.shards))
    location = manifest_location(data_cfg.shards)
    refs = tuple(
        ShardRef(url, s.name, s.samples, beside_manifest(location, s.index) if s.index else "", s.bytes)
        for url, s in zip(urls, manifest.shards, strict=True)
    )
    spec = StreamSpec(
        shards=refs,
        clip=clip,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        workers=workers,
        shuffle_buffer=data_cfg.shuffle_buffer,
        limits=VideoLimits(data_cfg.max_pixels, data_cfg.min_side, decode_timeout_s),
        max_member_bytes=max_member_bytes,
    )
    return ClipLoader(
        spec,
        manifest_id=manifest.fingerprint(),
        num_workers=data_cfg.workers,
        max_bad_ratio=data_cfg.max_bad_ratio,
        min_samples=min_samples,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        timeout_s=timeout_s,
        multiprocessing_context=multiprocessing_context,
        source=str(data_cfg.shards),
    )


def shared_memory_per_rank(data_cfg: Any, batch_size: int, prefetch_factor: int = 2) -> int:
    """Bytes of /dev/shm one rank's workers may hold: each keeps `prefetch_factor + 3` batches for
    reuse (`BatchReturns.keep`) and up to 2 more while the trainer holds on to batches."""
    if data_cfg.workers == 0:
        return 0
    clip = data_cfg.num_frames * data_cfg.size**2 * 3  # uint8 (C, T, H, W)
    return data_cfg.workers * (prefetch_factor + 5) * batch_size * data_cfg.repeats * clip


def _warn_about_reads(manifest, urls: Sequence[str], slots: int, seed: int, source: str) -> None:
    """One line at start when an epoch will read more than the data (no index, or no seeking),
    naming the read factor and the fix; and one when some streams get no sample in an epoch."""
    seekable = all(can_seek(url) for url in urls)
    unindexed = sum(1 for s in manifest.shards if not s.index)
    if unindexed or not seekable:
        counts, sizes = [s.samples for s in manifest.shards], [s.bytes for s in manifest.shards]
        seeks = [bool(s.index) and can_seek(url) for s, url in zip(manifest.shards, urls, strict=True)]
        read = fresh_read_cost(counts, sizes, seed, 0, slots, seekable=seeks).bytes.sum()
        factor = read / max(1, manifest.total_bytes)
        if seekable:
            why = f"{unindexed} of {len(manifest.shards)} shards have no per-sample index"
            fix = f"add one: python tools/index_shards.py {source} --out DIR (or rebuild with make_shards)"
        else:
            why = "its shards come from a source that cannot seek (pipe:, or a URL with no fsspec backend)"
            fix = "serve them from a path, http(s) or an fsspec URL, with an index"
        log.warning(
            "%s: %s, so streams read those shards from their start: an epoch at %d streams reads about "
            "%.2fx the data (1.00x with an index); %s",
            source,
            why,
            slots,
            factor,
            fix,
        )
    if manifest.total_samples < slots:
        log.warning(
            "%s: %d samples for %d streams (ranks x workers): each stream gets a sample only in some "
            "epochs (%d of every %d); fine for a demo, slow for training",
            source,
            manifest.total_samples,
            slots,
            manifest.total_samples,
            slots,
        )
