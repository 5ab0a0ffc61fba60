"""The epoch plan (plan.py): every sample to one stream, counts within one, contiguous runs, block
order, and exact elastic resume, checked exhaustively on small cases and by simulation at cluster
scale (no I/O)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from mae_scale.data.plan import (
    FRESH,
    EpochPlan,
    Generation,
    Layout,
    PlanError,
    StreamOrder,
    fresh_bounds,
    fresh_read_cost,
    runs,
    slice_read_cost,
)


def all_positions(plan: EpochPlan, epoch: int) -> list[np.ndarray]:
    return [plan.positions(epoch, t) for t in range(plan.streams)]


@pytest.mark.parametrize("seed", range(4))
def test_every_sample_goes_to_one_stream_and_counts_differ_by_at_most_one(seed):
    rng = random.Random(seed)
    for _ in range(60):
        counts = [rng.choice([0, 1, 2, 3, 7]) for _ in range(rng.randint(1, 7))]
        if sum(counts) == 0:
            continue
        streams = rng.randint(1, 12)  # more and fewer streams than shards, and than samples
        plan = EpochPlan(counts, seed, streams, block=4)
        for epoch in range(3):
            parts = all_positions(plan, epoch)
            assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(sum(counts))), (counts, streams)
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            layout = Layout.of(counts, seed, epoch)
            for p in parts:  # a contiguous range: one run per shard it touches
                groups = list(layout.groups(p))
                assert all(len(runs(samples)) == 1 for _, samples in groups)
                assert sorted(s for s, _ in groups) == sorted(set(s for s, _ in groups))


def test_fewer_samples_than_streams_gives_every_stream_samples_in_some_epochs():
    """The rotation by epoch: with 4 samples for 8 streams no stream is empty in every epoch."""
    plan = EpochPlan([1, 1, 1, 1], seed=0, streams=8, block=8)
    got = {t: sum(len(plan.positions(e, t)) for e in range(8)) for t in range(8)}
    assert got == {t: 4 for t in range(8)}  # over 8 epochs, each stream gets 4 samples


def test_layout_maps_positions_to_shards_in_the_epochs_order():
    counts = [3, 0, 2, 4]
    layout = Layout.of(counts, seed=1, epoch=5)
    groups = list(layout.groups(np.arange(9)))
    assert [s for s, _ in groups] == [int(i) for i in layout.order if counts[i]]
    assert all(list(samples) == list(range(counts[s])) for s, samples in groups)


@pytest.mark.parametrize("block", [0, 1, 3, 8])
def test_block_order_is_a_permutation_and_consumed_items_are_its_prefix(block):
    for n in range(0, 20):
        order = StreamOrder(seed=3, epoch=2, tag=FRESH, streams=5, stream=1, block=block)
        out = order.output(n)
        assert sorted(out) == list(range(n))
        size = max(1, block)
        assert all(j // size == i // size for i, j in enumerate(out))  # items stay inside their block
        for c in range(n + 1):
            assert sorted(order.consumed_indices(n, c).tolist()) == sorted(out[:c])
    assert StreamOrder(3, 2, FRESH, 5, 1, 8).output(16) != list(range(16))  # it does shuffle
    assert StreamOrder(3, 2, FRESH, 5, 1, 8).output(16) != StreamOrder(3, 3, FRESH, 5, 1, 8).output(16)


def consume(plan: EpochPlan, stream: int, items: int, taken: dict[int, list[int]]) -> tuple[int, int]:
    """Simulate a stream taking `items` items from the plan's start; record the positions; its position."""
    epoch = plan.start_epoch()
    while True:
        positions = plan.positions(epoch, stream)
        out = plan.order(epoch, stream).output(len(positions))
        take = min(items, len(out))
        taken.setdefault(epoch, []).extend(positions[out[:take]].tolist())
        items -= take
        if items == 0:  # (ending exactly at an epoch's end, the loader reports (epoch, n) too)
            return epoch, take
        epoch += 1


@pytest.mark.parametrize("seed", range(6))
def test_elastic_chains_train_every_sample_of_every_epoch_exactly_once(seed):
    """Random chains of stream counts (3 changes), streams stopping at random points (some an epoch
    ahead, as bad samples make them): every epoch's samples, over all generations, exactly once;
    epochs after the window follow the fresh plan of the last size."""
    rng = random.Random(seed)
    counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 6))] + [rng.randint(1, 9)]
    total = sum(counts)
    block = rng.choice([1, 3, 4, 64])
    history: list[Generation] = []
    taken: dict[int, list[int]] = {}
    for _ in range(3):
        streams = rng.randint(1, 9)
        plan = EpochPlan(counts, seed, streams, block, history)
        share = -(-total // streams)
        positions = [consume(plan, t, rng.randint(0, 2 * share + 1), taken) for t in range(streams)]
        history.append(Generation(streams, tuple(positions), block))
    last = EpochPlan(counts, seed, rng.randint(1, 9), block, history)
    window = sorted(last.remaining)
    assert window and window == list(range(window[0], window[-1] + 1))
    for t in range(last.streams):  # the last generation reads the whole window
        for epoch in window:
            taken.setdefault(epoch, []).extend(last.positions(epoch, t).tolist())
    for epoch in range(window[-1] + 1):
        assert sorted(taken[epoch]) == list(range(total)), (epoch, counts, block)
    for epoch in window:
        sizes = [len(last.positions(epoch, t)) for t in range(last.streams)]
        assert max(sizes) - min(sizes) <= 1
    fresh = EpochPlan(counts, seed, last.streams, block)
    after = window[-1] + 1
    assert last.tag(after) == FRESH
    assert all(
        np.array_equal(last.positions(after, t), fresh.positions(after, t)) for t in range(last.streams)
    )


def test_a_position_past_its_plan_is_refused():
    gen = Generation(2, ((0, 99), (0, 0)), 4)
    with pytest.raises(PlanError, match="stream 0 of 2 consumed 99 items of epoch 0"):
        EpochPlan([3, 3], 0, 1, 4, [gen])
    with pytest.raises(PlanError, match="has 1 positions"):
        Generation(2, ((0, 0),), 4)


# -- at cluster scale, by simulation (no I/O) --------------------------------------------------------

NODES, GPUS, WORKERS = 128, 8, 10
STREAMS = NODES * GPUS * WORKERS  # 10,240
SAMPLE = 1 << 20  # bytes of video per sample
SPAN = SAMPLE + 3 * 512  # its span in the tar: headers of two members and the json's padded block
INDEX_ROW = 48  # bytes per sample of an index file (["00001234_name", offset, length, frames])
TOTAL = 1000 * 10_000  # 10M videos


def manifest(shards: int) -> tuple[np.ndarray, np.ndarray]:
    counts = np.full(shards, TOTAL // shards, dtype=np.int64)
    counts[: TOTAL % shards] += 1
    return counts, counts * SPAN + 1024  # + the tar's end blocks


@pytest.mark.parametrize("shards", [1000, STREAMS - 1, STREAMS, STREAMS + 1])
def test_at_scale_an_epoch_reads_the_data_once_in_balanced_contiguous_runs(shards):
    """10M samples of 1 MB for 128 nodes x 8 GPUs x 10 workers: every sample once, counts within one,
    bytes <= 1.05x the shards', a handful of runs per stream (one per shard it touches), each one
    seek in a file or one streamed GET over http (source.py), plus at most 2 index files."""
    counts, sizes = manifest(shards)
    for epoch in (0, 1):
        cost = fresh_read_cost(counts, sizes, seed=0, epoch=epoch, streams=STREAMS, seekable=True)
        lo, hi = fresh_bounds(Layout.of(counts, 0, epoch), STREAMS, epoch)
        order = np.argsort(lo, kind="stable")  # coverage: the ranges tile [0, N) exactly
        assert lo[order][0] == 0 and hi[order][-1] == TOTAL and np.array_equal(lo[order][1:], hi[order][:-1])
        assert cost.samples.sum() == TOTAL and cost.samples.max() - cost.samples.min() <= 1
        index_bytes = (cost.index_reads * INDEX_ROW * counts.max()).sum()
        assert (cost.bytes.sum() + index_bytes) / sizes.sum() <= 1.05
        per_stream = TOTAL / STREAMS / counts.min()  # shards' worth of samples per stream
        assert cost.opens.max() <= math.ceil(per_stream) + 1 and cost.index_reads.max() <= 2
        http_requests = cost.opens + cost.index_reads  # per stream: a GET per run and per index
        assert http_requests.max() <= math.ceil(per_stream) + 3
        # without an index (or seeking) a stream reads each of its shards from the start: at most
        # ceil(streams / shards) times the data when shards < streams
        blind = fresh_read_cost(counts, sizes, seed=0, epoch=epoch, streams=STREAMS, seekable=False)
        factor = blind.bytes.sum() / sizes.sum()
        assert factor <= max(2, math.ceil(STREAMS / shards)), factor
        if shards == STREAMS:  # shard counts within one of each other: every cut on a boundary
            assert factor == 1.0 and cost.opens.max() == 1 and cost.index_reads.max() == 0


def test_at_scale_a_resume_1024_768_1280_streams_continues_the_epoch_exactly():
    """Mid-epoch 1,024 streams -> 768 -> 1,280 over 1,000 shards x 10,000 samples: across the three
    generations every sample of the epochs in flight once; the new streams' shares within one; what
    they read is exactly what is left (no byte twice) in a few runs each; the next epoch is planned
    as a fresh run at 1,280 plans it."""
    counts, sizes = manifest(1000)
    block = 64
    rng = np.random.default_rng(0)
    hits = {0: np.zeros(TOTAL, np.int8), 1: np.zeros(TOTAL, np.int8)}  # times each sample was consumed
    history: list[Generation] = []
    for streams in (1024, 768):
        plan = EpochPlan(counts, 0, streams, block, history)
        positions = []
        for t in range(streams):
            epoch = plan.start_epoch()
            first = plan.positions(epoch, t)
            if epoch == 0 and rng.random() < 0.05:  # a stream that got ahead into epoch 1 (bad samples)
                np.add.at(hits[0], first, 1)
                epoch, first = 1, plan.positions(1, t)
            c = int(rng.integers(0, len(first) + 1))
            np.add.at(hits[epoch], first[plan.order(epoch, t).consumed_indices(len(first), c)], 1)
            positions.append((epoch, c))
        history.append(Generation(streams, tuple(positions), block))
    last = EpochPlan(counts, 0, 1280, block, history)
    assert sorted(last.remaining) == [0, 1]
    layout = {e: Layout.of(counts, 0, e) for e in (0, 1)}
    worst_opens = 0
    for epoch in (0, 1):
        parts = all_positions(last, epoch)
        sizes_now = [len(p) for p in parts]
        assert max(sizes_now) - min(sizes_now) <= 1
        read = opens = 0.0
        for p in parts:
            np.add.at(hits[epoch], p, 1)
            b, o = slice_read_cost(layout[epoch], p, sizes, counts, seekable=True)
            read, opens, worst_opens = read + b, opens + o, max(worst_opens, o)
        left = len(last.remaining[epoch])
        assert read == pytest.approx(left * sizes[0] / counts[0])  # exactly the samples left
        assert np.all(hits[epoch] == 1), f"epoch {epoch}: {np.bincount(hits[epoch])}"
    # each old stream left its tail (one run) and at most block - 1 scattered samples of its block
    assert worst_opens <= 2 * (block + 2)
    fresh = EpochPlan(counts, 0, 1280, block)
    assert last.tag(2) == FRESH
    assert all(np.array_equal(last.positions(2, t), fresh.positions(2, t)) for t in range(1280))


def test_read_cost_takes_seekability_per_shard():
    """A set where only some shards have an index (or a source that seeks): the estimate lies between
    all and none, and all-True / all-False per shard equal the single flags."""
    counts, sizes = manifest(1000)
    cost = {
        flag: fresh_read_cost(counts, sizes, 0, 0, 1280, seekable=flag).bytes.sum() for flag in (True, False)
    }
    every = [
        fresh_read_cost(counts, sizes, 0, 0, 1280, seekable=[flag] * 1000).bytes.sum()
        for flag in (True, False)
    ]
    assert every == [cost[True], cost[False]]
    half = fresh_read_cost(counts, sizes, 0, 0, 1280, seekable=[k % 2 == 0 for k in range(1000)]).bytes.sum()
    assert cost[True] < half < cost[False]
