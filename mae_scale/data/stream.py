"""One loader worker's stream of batches: a pure function of (seed, epoch, rank, worker, world size, workers).

Which samples a stream ("slot": rank x workers + worker) reads in an epoch and in which order is
planned by plan.py without I/O: a contiguous, balanced share of the epoch's sample sequence, read
as runs of samples (reader.py: byte ranges with a per-sample index, from the shard's start
without one), leaving in seeded blocks of `shuffle_buffer` samples. After an elastic resume the
loader hands each stream its share of what the old run left of the unfinished epochs (`window`).
Positions count raw items (samples and faults, one per planned sample) out of the block shuffle,
so resuming skips whole blocks without reading them and decodes nothing that was skipped.
Augmentation is seeded per (seed, epoch, shard, key): a sample looks the same whichever worker reads it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mae_scale.data.decode import DEFAULT_LIMITS, BadVideo, RGBConverter, VideoLimits, decode_frames
from mae_scale.data.plan import FRESH, Layout, StreamOrder, fresh_bounds, shard_order, stable_seed
from mae_scale.data.reader import ReadCounts, ShardReader, ShardRef
from mae_scale.data.shards import MAX_MEMBER_BYTES, VIDEO_MEMBERS, RawSample, video_member
from mae_scale.data.transforms import ClipSpec, empty_clips, make_clips, plan_clips

__all__ = ["BadDataError", "ClipStream", "Item", "ShardRef", "StreamSpec", "shard_order", "stable_seed"]

BAD = object()  # marks a sample that was skipped (and counted)
# A stream that has consumed this many items since it last handed anything out, none of them good,
# sends a "heartbeat" (its position and stats, no clips): the main process then sees the bad
# samples (and its ratio rule can stop the run) instead of waiting on a worker that finds none.
HEARTBEAT_ITEMS = 64


class BadDataError(RuntimeError):
    """Too many bad samples (or none good): the message names the ratio, the limit and the main reasons."""


@dataclass
class Item:
    """A planned sample leaving the block shuffle: the sample, or a fault standing for `bad` lost samples."""

    shard: str
    raw: RawSample
    bad: int = 1


@dataclass
class StreamStats:
    """Counts since the last batch; they travel with each batch so the main process sees them."""

    samples: int = 0  # good videos
    decoded: int = 0  # videos handed to the decoder (fast-forward must add none)
    batches_allocated: int = 0  # new clip batches (not reused by the BatchPool)
    bad: Counter = field(default_factory=Counter)
    info: Counter = field(default_factory=Counter)  # notable but usable (short-video policies)
    examples: dict = field(default_factory=dict)  # reason -> "shard/key: detail" (first seen)
    read: ReadCounts = field(default_factory=ReadCounts)  # bytes and opens of the shard readers

    def add_bad(self, reason: str, item: Item, detail: str, count: int = 1) -> None:
        self.bad[reason] += count
        self.examples.setdefault(reason, f"{item.shard}/{item.raw.key}: {detail}"[:300])

    def pop(self) -> dict:
        """The counts as a plain dict; the counters restart from zero."""
        info = self.info + self.read.notes
        examples = {**self.read.examples, **self.examples}
        out = {
            "samples": self.samples,
            "decoded": self.decoded,
            "batches_allocated": self.batches_allocated,
            "bad": dict(self.bad),
            "info": dict(info),
            "examples": examples,
            **self.read.pop(),
        }
        self.samples, self.decoded, self.batches_allocated = 0, 0, 0
        self.bad, self.info, self.examples = Counter(), Counter(), {}
        self.read.notes, self.read.examples = Counter(), {}
        return out


@dataclass(frozen=True)
class BatchReturns:
    """The way back for batches the trainer let go of: `queues[w]` carries logical worker w's batch
    ids (a `queue.SimpleQueue` in process, a multiprocessing `SimpleQueue` across processes); each
    worker keeps at most `keep` batches for reuse. Made anew for every DataLoader: ids are only
    meaningful to the one `BatchPool` per worker that handed them out."""

    queues: Sequence[Any]
    keep: int


class BatchPool:
    """Clip batches written again once the trainer has let go of them, instead of a fresh one each time.

    A fresh batch costs the kernel's allocation and zeroing of every page it writes: 5-15% of a
    worker's time at 224 px (BENCHMARKS.md). The main process sends back the id of each batch whose
    every tensor has died (`ClipLoader`); a batch is never written before its id comes back. With
    none free, a new batch is made, and kept for reuse while fewer than `keep` are.
    """

    def __init__(self, make: Callable[[], torch.Tensor], returns: Any | None, keep: int):
        self.make, self.returns, self.keep = make, returns, keep  # returns: this worker's id queue
        self.batches: list[torch.Tensor] = []
        self.free: list[int] = []
        self.allocated = 0  # new batches made, kept or not

    def take(self) -> tuple[torch.Tensor, int]:
        """A batch to write and its id, -1 for a batch that is not kept (nothing comes back for it)."""
        while self.returns is not None and not self.returns.empty():
            self.free.append(self.returns.get())
        if self.free:
            i = self.free.pop()
            return self.batches[i], i
        batch = self.make()
        self.allocated += 1
        if self.returns is None or len(self.batches) >= self.keep:
            return batch, -1
        self.batches.append(batch)
        return batch, len(self.batches) - 1


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[ShardRef, ...]
    clip: ClipSpec
    batch_size: int
    seed: int
    rank: int
    world_size: int
    workers: int  # streams per rank (DataLoader workers, 1 when loading in-process)
    shuffle_buffer: int = 64  # samples per shuffled block (plan.StreamOrder)
    limits: VideoLimits = DEFAULT_LIMITS
    max_member_bytes: int = MAX_MEMBER_BYTES

    @property
    def slots(self) -> int:
        return self.world_size * self.workers


class ClipStream(IterableDataset):
    """The worker side of the loader; `start[w]` = (epoch, items already consumed) for logical worker w.

    DataLoader worker `p` plays logical worker `(p + worker_offset) % workers`, so a loader resumed
    after a batch of worker 1 starts with worker 1's stream and batches keep their order.
    `returns`: how the trainer gives batches back for reuse (`BatchReturns`); None: every batch is new.
    `window[slot][epoch]`: the positions that slot reads in an epoch an earlier run left unfinished
    (plan.EpochPlan), with `window_tag` seeding their block order; other epochs are planned whole.
    """

    def __init__(
        self,
        spec: StreamSpec,
        start: list[tuple[int, int]],
        worker_offset: int = 0,
        returns: BatchReturns | None = None,
        window: dict[int, dict[int, np.ndarray]] | None = None,
        window_tag: str = FRESH,
    ):
        super().__init__()
        self.spec, self.start, self.worker_offset, self.returns = spec, start, worker_offset, returns
        self.window, self.window_tag = window or {}, window_tag
        self._counts = np.array([s.samples for s in spec.shards], dtype=np.int64)

    # -- which raw items a slot sees in an epoch ------------------------------------------------
    def plan(self, slot: int, epoch: int) -> tuple[np.ndarray, StreamOrder]:
        """The sorted positions the slot reads in `epoch` and the order they leave it in."""
        spec = self.spec
        mine = self.window.get(slot, {})
        if epoch in mine:
            return mine[epoch], StreamOrder(
                spec.seed, epoch, self.window_tag, spec.slots, slot, spec.shuffle_buffer
            )
        lo, hi = fresh_bounds(self._layout(epoch), spec.slots, epoch)
        positions = np.arange(lo[slot], hi[slot], dtype=np.int64)
        return positions, StreamOrder(spec.seed, epoch, FRESH, spec.slots, slot, spec.shuffle_buffer)

    def epoch_items(
        self, slot: int, epoch: int, skip: int = 0, reader: ShardReader | None = None
    ) -> Iterator[Item]:
        """The slot's items for one epoch in the order they leave it, from the `skip`-th on.

        Reads tars from the block holding item `skip` on (earlier blocks are not read); decodes nothing.
        """
        positions, order = self.plan(slot, epoch)
        n, size = len(positions), order.size
        if skip >= n:
            return
        reader = reader or ShardReader(ReadCounts(), self.spec.max_member_bytes)
        first = skip // size
        items = self._read(self._layout(epoch), positions[first * size :], reader)
        for j in range(first, -(-n // size)):
            block = list(islice(items, size))  # the block's items in tar order
            for i in order.permutation(j, len(block))[skip - first * size if j == first else 0 :]:
                yield block[i]

    def _layout(self, epoch: int) -> Layout:
        cached = getattr(self, "_cached_layout", None)
        if cached is None or cached[0] != epoch:
            self._cached_layout = (epoch, Layout.of(self._counts, self.spec.seed, epoch))
        return self._cached_layout[1]

    def _read(self, layout: Layout, positions: np.ndarray, reader: ShardReader) -> Iterator[Item]:
        """One item per position, in order: the sample, or a fault standing for it."""
        for shard, samples in layout.groups(positions):
            ref = self.spec.shards[shard]
            for raw in reader.read(ref, samples):
                yield Item(ref.name, raw)

    # -- the stream ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        spec = self.spec
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != spec.workers:
            raise RuntimeError(
                f"ClipStream built for {spec.workers} workers runs in a loader with {num_workers}"
            )
        worker = (physical + self.worker_offset) % spec.workers
        slot = spec.rank * spec.workers + worker
        epoch, skip = self.start[worker]
        stats = StreamStats()
        reader = ShardReader(stats.read, spec.max_member_bytes)
        to_rgb = RGBConverter()
        clip = spec.clip
        pool = BatchPool(
            lambda: empty_clips(spec.batch_size * clip.repeats, clip, shared=info is not None),
            None if self.returns is None else self.returns.queues[worker],
            0 if self.returns is None else self.returns.keep,
        )
        batch, buffer = pool.take()
        filled, keys, labels, first_epoch = 0, [], [], None
        since = 0  # items consumed since this stream last handed out a batch or a heartbeat
        while True:
            consumed = skip
            for item in self.epoch_items(slot, epoch, skip, reader):  # fast-forward: no decoding
                consumed += 1
                since += 1
                out = batch[filled * clip.repeats : (filled + 1) * clip.repeats]
                label = self._clips(item, epoch, stats, to_rgb, out, reader)
                if label is BAD:
                    if filled == 0 and since >= HEARTBEAT_ITEMS:
                        yield {
                            "_worker": worker,
                            "_buffer": -1,
                            "_position": (epoch, consumed),
                            "_stats": stats.pop(),
                            "_heartbeat": True,
                        }
                        since = 0
                    continue
                filled += 1
                first_epoch = epoch if first_epoch is None else first_epoch
                keys += [item.raw.key] * clip.repeats
                labels += [label] * clip.repeats
                if filled == spec.batch_size:
                    stats.batches_allocated, pool.allocated = pool.allocated, 0
                    yield {
                        "clips": batch,  # (B*R, C, T, H, W) uint8
                        "keys": keys,
                        "labels": labels,
                        "epoch": first_epoch,
                        "_worker": worker,
                        "_buffer": buffer,
                        "_position": (epoch, consumed),
                        "_stats": stats.pop(),
                    }
                    batch, buffer = pool.take()
                    filled, keys, labels, first_epoch, since = 0, [], [], None, 0
            epoch, skip = epoch + 1, 0  # an epoch with no samples for this stream happens (N < S)

    def _clips(
        self,
        item: Item,
        epoch: int,
        stats: StreamStats,
        to_rgb: RGBConverter,
        out: torch.Tensor,
        reader: ShardReader,
    ):
        """Decode one sample into R clips written to `out` (R, C, T, H, W); its label, or BAD (counted)."""
        raw = item.raw
        if raw.fault:
            stats.add_bad(raw.fault, item, raw.detail, item.bad)
            return BAD
        video = video_member(raw.members)
        if video is None:
            stats.add_bad("missing_member", item, f"no video member (.{' .'.join(VIDEO_MEMBERS)})")
            return BAD
        try:  # frames from the json, else from the shard's index (adopted shards: any json, or none)
            meta = json.loads(raw.members["json"]) if "json" in raw.members else {}
            if not isinstance(meta, dict):
                raise TypeError(f"expected a JSON object, got {type(meta).__name__}")
            frames = meta["frames"] if "frames" in meta else reader.frames(self._ref(item.shard), raw.key)
            if frames is None and "json" not in raw.members:
                stats.add_bad("missing_member", item, "no .json, and no frame count in the shard's index")
                return BAD
            if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
                raise ValueError(f"'frames' must be a positive int (json, else index), got {frames!r}")
        except (ValueError, KeyError, TypeError) as exc:
            stats.add_bad("bad_json", item, repr(exc))
            return BAD
        rng = random.Random(stable_seed(self.spec.seed, "sample", epoch, item.shard, raw.key))
        try:
            plan, note = plan_clips(frames, self.spec.clip, rng)
            wanted = sorted({i for clip in plan for i in clip})
            stats.decoded += 1
            decoded = decode_frames(raw.members[video], wanted, to_rgb, self.spec.limits)
            make_clips(decoded, plan, self.spec.clip, rng, out=out)
        except BadVideo as exc:
            stats.add_bad(exc.reason, item, exc.detail)
            return BAD
        except Exception as exc:  # noqa: BLE001 - a crafted file must not kill the run; it is named
            stats.add_bad("decode_error", item, f"{type(exc).__name__}: {exc}")
            return BAD
        if note:
            stats.info[note] += 1
        stats.samples += 1
        return meta.get("label")

    def _ref(self, name: str) -> ShardRef:
        """The shard named `name` (a dict built once per stream: manifests can list 100,000 shards)."""
        refs = self.__dict__.get("_refs")
        if refs is None:
            refs = self.__dict__["_refs"] = {ref.name: ref for ref in self.spec.shards}
        return refs[name]
