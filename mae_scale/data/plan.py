"""Which samples each loader stream reads in an epoch, and in which order: a pure function of the
manifest's sample counts, the seed, the epoch and the number of streams, computed without I/O.

Every rank computes the same plan, and it can be simulated for thousands of streams in
milliseconds (tests/test_data_plan.py, tools/bench_loader.py).

**Layout.** An epoch's shards are put in a seeded order (`shard_order`), their samples in tar order,
and numbered 0..N-1 as one sequence: a sample's *position*.

**Split.** Stream t of S takes the v-th of S contiguous ranges, v = (t + epoch) mod S, each of
floor(N / S) or floor(N / S) + 1 positions: every sample goes to exactly one stream and the counts
differ by at most one, whatever the number of shards. The cuts are those of the even spread
[floor(v N / S), floor((v+1) N / S)), moved onto a shard boundary where the counts allow
(`fresh_bounds`: it saves sources that cannot seek a shard's first part). A range touches at
most ceil(N / S / shard size) + 1 shards and is read as one run per shard (one seek with a
per-sample index, index.py). The rotation by the epoch matters only when N < S (some ranges are
empty): it gives every stream samples in some epochs, so no stream, and no rank, waits forever.

**Order within a stream.** Positions are read in order and leave in blocks of B (`shuffle_buffer`)
consecutive positions, each block in a seeded permutation: the "py1b" shape of MosaicML streaming's
shuffles (shard order shuffled, then samples within fixed blocks). A sliding shuffle buffer would
mix about as locally, but which samples it has emitted after c outputs depends on every draw
before; after a block shuffle it is a closed form (`consumed_indices`), so the position of an
epoch can be recomputed exactly on any other number of streams (below). The trade-off: a stream's
samples stay near their tar neighbours (within B of them, and the tars' order is the
build's shuffle); the epoch's new shard order moves the ranges, hence the neighbourhoods, every
epoch. Shuffling blocks of the whole epoch across streams (MosaicML's chunking) would mix more but
cost one seek per block instead of one per shard.

**Elastic resume.** A run stops with every stream at (epoch, items consumed in it). A *generation*
is one run's streams between two changes of the stream count: `Generation(streams, positions)`.
The next generation recomputes, for every epoch a stream of the old one had started but not
finished, the positions no old stream consumed (`EpochPlan.remaining`), and splits that remainder
(sorted) over its own streams exactly like a whole epoch: contiguous, counts within one. Epochs no
old stream reached are planned fresh, as a run started at the new size would plan them. The saved
state stays small (two integers per old stream per generation), however large the epoch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

FRESH = "fresh"  # the block-permutation tag of an epoch planned from scratch (not a remainder)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from parts, equal in every process (unlike `hash()` on strings)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The manifest indices of the shards in the order epoch `epoch` lays them out."""
    order = list(range(num_shards))
    random.Random(stable_seed(seed, "shards", epoch)).shuffle(order)
    return order


# -- one epoch's sequence ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """One epoch's sequence: `order[p]` is the manifest index of the p-th placed shard, whose samples
    hold positions [starts[p], ends[p])."""

    order: np.ndarray  # (K,) int64
    starts: np.ndarray  # (K,) int64
    ends: np.ndarray  # (K,) int64

    @classmethod
    def of(cls, counts: Sequence[int] | np.ndarray, seed: int, epoch: int) -> Layout:
        counts = np.asarray(counts, dtype=np.int64)
        order = np.asarray(shard_order(len(counts), seed, epoch), dtype=np.int64)
        ends = np.cumsum(counts[order])
        return cls(order, ends - counts[order], ends)

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def groups(self, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(manifest shard index, its sample indices in tar order) for sorted `positions`, shard by shard."""
        if len(positions) == 0:
            return
        places = np.searchsorted(self.ends, positions, side="right")  # (n,) the placed shard of each
        cuts = np.flatnonzero(np.diff(places)) + 1
        for chunk in np.split(np.arange(len(positions)), cuts):
            place = int(places[chunk[0]])
            yield int(self.order[place]), positions[chunk] - self.starts[place]


def runs(samples: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [k0, k1) of consecutive sample indices in a sorted array."""
    if len(samples) == 0:
        return []
    cuts = np.flatnonzero(np.diff(samples) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(samples, cuts)]


# -- the split and the order within a stream --------------------------------------------------------


def split_bounds(n: int, streams: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi), each (streams,): stream t takes indices [lo[t], hi[t]) of an n-long sequence."""
    v = (np.arange(streams, dtype=np.int64) + epoch) % streams
    return v * n // streams, (v + 1) * n // streams


def fresh_bounds(layout: Layout, streams: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """`split_bounds` of a whole epoch, with each cut moved onto a shard boundary where the counts
    allow it: every stream still takes floor(N / S) or that + 1 samples, in one contiguous range.

    A cut on a boundary costs nothing; a cut inside a shard makes the stream after it read the
    shard's first part too when the source cannot seek (no index, `pipe:`). With shards of equal
    counts (within one) and as many as the streams, every cut lands on a boundary: 1.0x read
    without an index. Greedy over the streams in order (10,000 in about 10 ms).
    """
    n = layout.total
    q, extra = divmod(n, streams)  # every stream takes q, `extra` of them q + 1
    if q == 0:  # fewer samples than streams: the even spread, rotating (see the module's docstring)
        return split_bounds(n, streams, epoch)
    ends = set(layout.ends.tolist())
    cuts = [0]
    c = 0
    for i in range(streams):
        left = streams - i
        if extra == 0 or extra == left:
            step = q + (extra > 0)
        else:
            shorter, longer = c + q in ends, c + q + 1 in ends
            if shorter != longer:
                step = q + longer
            else:  # follow the even spread's cut
                step = q + (c + q < (i + 1) * n // streams)
        c += step
        extra -= step - q
        cuts.append(c)
    cut = np.asarray(cuts, dtype=np.int64)
    v = (np.arange(streams, dtype=np.int64) + epoch) % streams
    return cut[v], cut[v + 1]


def block_permutation(
    seed: int, epoch: int, tag: str, streams: int, stream: int, index: int, length: int
) -> list[int]:
    """The order in which the `length` items of a stream's block number `index` leave it."""
    perm = list(range(length))
    random.Random(stable_seed(seed, "block", epoch, tag, streams, stream, index)).shuffle(perm)
    return perm


@dataclass(frozen=True)
class StreamOrder:
    """How one stream's n positions of one epoch leave it: blocks of `block`, each permuted."""

    seed: int
    epoch: int
    tag: str  # FRESH, or the generation that reads a remainder (its permutations differ)
    streams: int
    stream: int
    block: int  # <= 1: tar order

    def permutation(self, j: int, length: int) -> list[int]:
        if self.block <= 1:
            return list(range(length))
        return block_permutation(self.seed, self.epoch, self.tag, self.streams, self.stream, j, length)

    @property
    def size(self) -> int:
        return max(1, self.block)

    def consumed_indices(self, n: int, consumed: int) -> np.ndarray:
        """Indices (into the stream's n positions) of the first `consumed` items to leave it."""
        if consumed >= n:
            return np.arange(n)
        j = consumed // self.size
        whole = j * self.size
        perm = self.permutation(j, min(self.size, n - whole))
        return np.concatenate(
            [np.arange(whole), whole + np.asarray(perm[: consumed - whole], dtype=np.int64)]
        )

    def output(self, n: int) -> list[int]:
        """All n indices in the order they leave (for tests and simulations)."""
        out: list[int] = []
        for j, start in enumerate(range(0, n, self.size)):
            out += [start + i for i in self.permutation(j, min(self.size, n - start))]
        return out


# -- generations and the remainder of an epoch ------------------------------------------------------


class PlanError(ValueError):
    """A saved position that cannot be a position of this plan; the message says which."""


@dataclass(frozen=True)
class Generation:
    """One run's streams, between two changes of the stream count: where each one stopped."""

    streams: int
    positions: tuple[tuple[int, int], ...]  # per stream: (epoch, items consumed in that epoch)
    block: int  # its streams' shuffle block (data.shuffle_buffer): the order its items left in

    def __post_init__(self) -> None:
        if self.streams < 1 or len(self.positions) != self.streams:
            raise PlanError(f"a generation of {self.streams} streams has {len(self.positions)} positions")
        if any(e < 0 or c < 0 for e, c in self.positions):
            raise PlanError(f"negative epoch or count in {self.positions[:8]}...")

    def to_dict(self) -> dict:
        return {
            "streams": self.streams,
            "block": self.block,
            "positions": [[int(e), int(c)] for e, c in self.positions],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Generation:
        try:
            return cls(int(d["streams"]), tuple((int(e), int(c)) for e, c in d["positions"]), int(d["block"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"a generation needs streams, block and positions [[epoch, consumed], ...] ({exc!r})"
            ) from exc


class EpochPlan:
    """The positions each stream of the current generation reads, epoch by epoch.

    `history`: the earlier generations of this chain, oldest first (empty for a run that never
    changed its stream count). `remaining[e]`: the sorted positions of epoch e left for this
    generation, for the epochs an earlier generation had started and not finished (the *window*);
    every other epoch is planned whole.
    """

    def __init__(self, counts: Sequence[int], seed: int, streams: int, block: int, history=()):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        self.seed, self.streams, self.block = seed, streams, block
        self.history: tuple[Generation, ...] = tuple(history)
        self.generation = len(self.history)  # this generation's index in the chain
        self.remaining: dict[int, np.ndarray] = {}
        self._layouts: dict[int, Layout] = {}
        for g, gen in enumerate(self.history):
            self.remaining = self._advance(self.remaining, g, gen)

    def tag(self, epoch: int) -> str:
        return f"g{self.generation}" if epoch in self.remaining else FRESH

    def start_epoch(self) -> int:
        """Where this generation's streams begin: the first epoch of the window (0 without one)."""
        return min(self.remaining) if self.remaining else 0

    def layout(self, epoch: int) -> Layout:
        if epoch not in self._layouts:
            self._layouts = {epoch: Layout.of(self.counts, self.seed, epoch)}  # one epoch at a time
        return self._layouts[epoch]

    def bounds(self, epoch: int, streams: int, rest: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Each stream's [lo, hi) in the epoch (rest None) or in the remainder `rest`."""
        if rest is None:
            return fresh_bounds(self.layout(epoch), streams, epoch)
        return split_bounds(len(rest), streams, epoch)

    def positions(self, epoch: int, stream: int) -> np.ndarray:
        """Sorted positions that `stream` reads in `epoch` (int64)."""
        rest = self.remaining.get(epoch)
        lo, hi = self.bounds(epoch, self.streams, rest)
        a, b = int(lo[stream]), int(hi[stream])
        return np.arange(a, b, dtype=np.int64) if rest is None else rest[a:b]

    def order(self, epoch: int, stream: int) -> StreamOrder:
        return StreamOrder(self.seed, epoch, self.tag(epoch), self.streams, stream, self.block)

    def _advance(self, remaining: dict[int, np.ndarray], g: int, gen: Generation) -> dict[int, np.ndarray]:
        """What generation g (whose remainders were `remaining`) left for the next one."""
        epochs = [e for e, _ in gen.positions]
        first, last = min(epochs), max([*epochs, *remaining])
        out: dict[int, np.ndarray] = {}
        for epoch in range(first, last + 1):
            rest = remaining.get(epoch)
            n = self.total if rest is None else len(rest)
            tag = FRESH if rest is None else f"g{g}"
            lo, hi = self.bounds(epoch, gen.streams, rest)
            taken = np.zeros(n, dtype=bool)  # (n,) consumed by some stream of generation g
            for t, (e, c) in enumerate(gen.positions):
                a, b = int(lo[t]), int(hi[t])
                if e > epoch:
                    taken[a:b] = True
                elif e == epoch:
                    if c > b - a:
                        raise PlanError(
                            f"generation {g}: stream {t} of {gen.streams} consumed {c} items of epoch "
                            f"{epoch}, which holds {b - a} for it"
                        )
                    order = StreamOrder(self.seed, epoch, tag, gen.streams, t, gen.block)
                    taken[a + order.consumed_indices(b - a, c)] = True
            left = np.flatnonzero(~taken)
            out[epoch] = left if rest is None else rest[left]
        return out

    def next_history(self, positions: Sequence[tuple[int, int]]) -> tuple[Generation, ...]:
        """The history a generation after this one starts from, this one stopped at `positions`."""
        return (*self.history, Generation(self.streams, tuple(positions), self.block))

    def window_done(self, positions: Sequence[tuple[int, int]]) -> bool:
        """Whether streams at these positions have left the window (then the history is not needed)."""
        return not self.remaining or all(e > max(self.remaining) for e, _ in positions)


# -- what reading a plan costs (no I/O: byte sizes from the manifest) --------------------------------


@dataclass(frozen=True)
class ReadCost:
    bytes: np.ndarray  # (streams,) shard bytes each stream reads in the epoch
    opens: np.ndarray  # (streams,) runs each opens: a file open + seek, or a first range request
    samples: np.ndarray  # (streams,) samples each gets
    index_reads: np.ndarray  # (streams,) per-sample indices each loads (for shards it reads only part of)


def fresh_read_cost(
    counts: Sequence[int],
    shard_bytes: Sequence[int],
    seed: int,
    epoch: int,
    streams: int,
    *,
    seekable: bool | Sequence[bool],
) -> ReadCost:
    """Bytes and opens per stream for a whole epoch, vectorized (10,000 streams in milliseconds).

    Sample sizes are taken as uniform within a shard (its bytes / samples): exact for the simulated
    sets, an estimate for real ones. `seekable` (for all shards, or per manifest shard): an index and
    a source that seeks, so a stream reads exactly its samples; otherwise it reads each shard it
    needs from the start up to its last sample.
    """
    counts = np.asarray(counts, dtype=np.int64)
    layout = Layout.of(counts, seed, epoch)
    per_sample = np.asarray(shard_bytes, dtype=np.float64)[layout.order] / np.maximum(counts[layout.order], 1)
    start_bytes = np.concatenate([[0.0], np.cumsum(per_sample * counts[layout.order])])  # (K+1,)

    def byte_at(pos: np.ndarray, place: np.ndarray) -> np.ndarray:  # bytes before position `pos`
        return start_bytes[place] + (pos - layout.starts[place]) * per_sample[place]

    lo, hi = fresh_bounds(layout, streams, epoch)
    has = hi > lo
    first = np.searchsorted(layout.ends, lo, side="right")  # place of each stream's first sample
    last = np.searchsorted(layout.ends, np.maximum(hi - 1, 0), side="right")
    first, last = np.minimum(first, len(counts) - 1), np.minimum(last, len(counts) - 1)
    seeks = np.broadcast_to(np.asarray(seekable, dtype=bool), counts.shape)[layout.order]  # (K,) placed
    begin = np.where(seeks[first], byte_at(lo, first), start_bytes[first])
    read = np.where(has, byte_at(hi, last) - begin, 0.0)
    opens = np.where(has, last - first + 1, 0)
    # a shard read whole needs no index: only the first and last shard of a range can be partial
    partial_first = (lo > layout.starts[first]) | ((first == last) & (hi < layout.ends[first]))
    partial_last = (last != first) & (hi < layout.ends[last])
    index_reads = np.where(
        has, (partial_first & seeks[first]).astype(np.int64) + (partial_last & seeks[last]), 0
    )
    return ReadCost(read, opens, hi - lo, index_reads)


def slice_read_cost(
    layout: Layout,
    positions: np.ndarray,
    shard_bytes: Sequence[int],
    counts: Sequence[int],
    *,
    seekable: bool,
) -> tuple[float, int]:
    """(bytes, opens) of one stream reading any sorted positions (a remainder's scattered ones too)."""
    total, opens = 0.0, 0
    for shard, samples in layout.groups(positions):
        per = shard_bytes[shard] / max(1, counts[shard])
        if seekable:
            total += len(samples) * per
            opens += len(runs(samples))
        else:
            total += (int(samples[-1]) + 1) * per
            opens += 1
    return total, opens
