"""Reading the samples a stream wants from one shard: one `RawSample` per wanted sample, in tar order.

Exactly one item per wanted sample, whatever happens (a sample, or a fault standing for it), so the
order in which a stream's items leave it depends on the plan alone, never on the data
(plan.py recomputes it on resume). Two ways to read:

- *ranges*: the shard has a per-sample index (index.py) and its source can seek (source.py):
  each run of consecutive wanted samples is one byte range, [span(k0).offset, span(k1-1).end).
  Each sample's key is checked against the index; a stale or unreadable index falls back to the
  next way.
- *from the start*: the tar is read from its first byte and the samples before the wanted ones
  are skipped (read, not kept); reading stops after the last wanted one. Shards without an index,
  `pipe:` sources, servers that ignore range requests (noted once per host, `no_range_requests`),
  and shards a stream wants whole (no index needed) go this way.

**Retries.** Where the shard has an index and its source can seek, a read that fails in the
source (a dropped connection, a stalled server, a refused request; not a 404 and not bad tar
bytes) is asked again from the first sample not yet read, up to `RETRIES` times after `RETRY_WAIT_S`
x attempt seconds (noted as `retried_read`): a network blip costs a request, not the rest of the
run. What still fails is a fault for each sample not read. Without an index (or from a `pipe:`)
nothing can be asked for from the middle, so the rest of the shard is lost at once.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from mae_scale.data.index import ShardIndex, ShardIndexError, read_index
from mae_scale.data.plan import runs
from mae_scale.data.shards import RawSample, iter_tar
from mae_scale.data.source import RangeIgnored, ShortFile, can_seek, open_range, open_stream

RETRIES = 2  # requests again of a run whose source failed mid-way, from the sample where it stopped
RETRY_WAIT_S = 1.0  # seconds before retry a: a * RETRY_WAIT_S


@dataclass(frozen=True)
class ShardRef:
    url: str
    name: str
    samples: int  # from the manifest: lets a truncated or missing shard count its lost samples
    index: str = ""  # URL of its per-sample index, "" if none
    bytes: int = 0  # the tar's size from the manifest


@dataclass
class ReadCounts:
    """What reading cost; travels with each batch like the other stream stats."""

    bytes: int = 0  # shard bytes the sources returned
    index_bytes: int = 0  # index bytes
    opens: int = 0  # runs opened (a file open + seek, or a range read), shards read from the start
    notes: Counter = field(default_factory=Counter)  # usable but notable: bad_index, retried_read, ...
    examples: dict = field(default_factory=dict)

    def note(self, reason: str, detail: str) -> None:
        self.notes[reason] += 1
        self.examples.setdefault(reason, detail[:300])

    def pop(self) -> dict:
        out = {"bytes_read": self.bytes, "index_bytes_read": self.index_bytes, "opens": self.opens}
        self.bytes = self.index_bytes = self.opens = 0
        return out

    def add_bytes(self, n: int) -> None:
        self.bytes += n

    def add_index_bytes(self, n: int) -> None:
        self.index_bytes += n


class ShardReader:
    """Reads wanted samples of shards; keeps the last few indices it loaded (one stream's worth)."""

    def __init__(self, counts: ReadCounts, max_member_bytes: int, cached_indices: int = 8):
        self.counts, self.max_member_bytes = counts, max_member_bytes
        self._indices: OrderedDict[str, tuple[ShardIndex | None, set[int]]] = OrderedDict()
        self._cached = cached_indices
        self._no_ranges: set[str] = set()  # hosts that answered a range request with the whole file

    def read(self, ref: ShardRef, wanted: np.ndarray) -> Iterator[RawSample]:
        """One RawSample per entry of `wanted` (sorted sample indices of `ref`), in that order."""
        if len(wanted) == 0:
            return
        whole = len(wanted) == ref.samples and int(wanted[-1]) == len(wanted) - 1
        seekable = bool(ref.index) and can_seek(ref.url) and _host(ref.url) not in self._no_ranges
        if whole or not seekable:
            done, lost = yield from self._from_start(ref, wanted)
            if lost is None:
                return
            if seekable and lost[0] in ("unreadable_shard", "bad_tar"):  # the source failed: go on
                self.counts.note("retried_read", f"{lost[1]} (asked again from sample {done})")
                yield from self._ranges(ref, wanted[done:])
            else:
                yield from _lost(wanted[done:], lost)
            return
        yield from self._ranges(ref, wanted)

    def _ranges(self, ref: ShardRef, wanted: np.ndarray) -> Iterator[RawSample]:
        index, duplicates = self._index(ref)
        if index is None:
            yield from self._from_start_or_lost(ref, wanted)
            return
        spans = index.samples
        for k0, k1 in runs(wanted):
            k, attempt = k0, 0
            while k < k1:
                lost, stale, again = None, False, False
                try:
                    f = open_range(ref.url, spans[k].offset, spans[k1 - 1].end, self.counts.add_bytes)
                except RangeIgnored as exc:  # this host cannot be read mid-shard: from the start, always
                    self._no_ranges.add(_host(ref.url))
                    self.counts.note("no_range_requests", str(exc))
                    yield from self._from_start_or_lost(ref, wanted[wanted >= k])
                    return
                except FileNotFoundError as exc:
                    lost = ("unreadable_shard", f"{ref.url}: {exc}")
                except Exception as exc:  # noqa: BLE001 - a refused or timed-out request: asked again
                    lost, again = ("unreadable_shard", f"{ref.url}: {exc}"), True
                else:
                    self.counts.opens += 1
                    try:
                        for sample in iter_tar(f, self.max_member_bytes):
                            if sample.fault == "bad_tar":
                                lost = ("bad_tar", f"{ref.url}: {sample.detail}")
                                break
                            if k >= k1 or sample.key != spans[k].key:
                                stale = True
                                break
                            if k in duplicates:
                                sample = RawSample(
                                    sample.key,
                                    fault="duplicate_key",
                                    detail=f"key {sample.key!r} appears twice in the shard",
                                )
                            yield sample
                            k, attempt = k + 1, 0
                    except Exception as exc:  # noqa: BLE001 - e.g. a connection that drops mid-run
                        lost = ("bad_tar", f"{ref.url}: {type(exc).__name__}: {exc}")
                    finally:
                        _close_quietly(f)
                    if lost is None and k < k1:
                        lost = ("bad_tar", f"{ref.url}: bytes of samples [{k0}, {k1}) ended after {k - k0}")
                    error = getattr(f, "error", None)  # the source failed (not the tar), not for good
                    again = error is not None and not isinstance(error, ShortFile)
                if stale:
                    self.counts.note(
                        "bad_index",
                        f"{ref.index}: sample {k} of {ref.name} is not {spans[k].key!r}"
                        if k < k1
                        else f"{ref.index}: run [{k0}, {k1}) holds more samples",
                    )
                    self._indices[ref.index] = (None, set())
                    yield from self._from_start_or_lost(ref, wanted[wanted >= k])
                    return
                if lost is None:
                    break
                if again and attempt < RETRIES:
                    attempt += 1
                    self.counts.note("retried_read", f"{lost[1]} (asked again from sample {k})")
                    time.sleep(RETRY_WAIT_S * attempt)
                    continue
                yield from _lost(np.arange(k, k1), lost, spans)
                break

    def _from_start_or_lost(self, ref: ShardRef, wanted: np.ndarray) -> Iterator[RawSample]:
        """`_from_start`, then a fault for each wanted sample it could not read: one item each."""
        done, lost = yield from self._from_start(ref, wanted)
        yield from _lost(wanted[done:], lost)

    def _from_start(
        self, ref: ShardRef, wanted: np.ndarray
    ) -> Generator[RawSample, None, tuple[int, tuple[str, str] | None]]:
        """Yields the wanted samples it reads; returns how many, and why it stopped short (None: it
        did not): "unreadable_shard" or "bad_tar" where the source failed, "missing" for a source
        that is not there (a 404), "tar_bytes" for bytes that arrived but do not hold the samples."""
        j, seen, lost, done = 0, 0, None, False
        try:
            f = open_stream(ref.url, self.counts.add_bytes)
        except FileNotFoundError as exc:
            return 0, ("missing", f"{ref.url}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any failure to open is a fault, named
            return 0, ("unreadable_shard", f"{ref.url}: {exc}")
        self.counts.opens += 1
        try:
            for i, sample in enumerate(iter_tar(f, self.max_member_bytes)):
                if sample.fault == "bad_tar":
                    lost = ("bad_tar", f"{ref.url}: {sample.detail}")
                    break
                seen = i + 1
                if j == len(wanted):  # read whole: a sample the manifest does not count
                    self.counts.note(
                        "extra_samples",
                        f"{ref.url}: holds more than the manifest's "
                        f"{ref.samples} samples (they are never read; verify_shards)",
                    )
                    break
                if i == wanted[j]:
                    yield sample
                    j += 1
                    if j == len(wanted) and int(wanted[-1]) != ref.samples - 1:
                        done = True  # stop reading: the rest of the shard is other streams'
                        break
            done = done or j == len(wanted)
        except Exception as exc:  # noqa: BLE001 - e.g. a stream that fails mid-read
            lost = ("bad_tar", f"{ref.url}: {type(exc).__name__}: {exc}")
        finally:
            error = _close_quietly(f)
        if error and not done and lost is None:  # e.g. a pipe: command that failed
            lost = ("unreadable_shard", f"{ref.url}: {error}")
        if j == len(wanted):
            return j, None
        if lost is not None and getattr(f, "error", None) is None and lost[0] == "bad_tar":
            lost = ("tar_bytes", lost[1])  # the bytes arrived but are not a tar: asking again won't help
        return j, lost or ("tar_bytes", f"{ref.url}: ended after {seen} of {ref.samples} samples")

    def frames(self, ref: ShardRef, key: str) -> int | None:
        """The frame count `ref`'s index holds for `key` (adopted shards: their json may have none);
        None without a usable index. The index is the one cached for range reads, read once."""
        index = self._index(ref)[0] if ref.index else None
        return None if index is None else index.frames_by_key.get(key)

    def _index(self, ref: ShardRef) -> tuple[ShardIndex | None, set[int]]:
        """The shard's index (None if it is unusable: noted as bad_index) and its repeated keys."""
        if ref.index in self._indices:
            self._indices.move_to_end(ref.index)
            return self._indices[ref.index]
        try:
            index = read_index(ref.index, lambda url: open_stream(url, self.counts.add_index_bytes))
            problems = [
                f"{what} {got} (manifest: {want})"
                for what, got, want in (
                    ("it indexes", index.shard, ref.name),
                    ("a tar of", index.bytes, ref.bytes or index.bytes),
                    ("samples", len(index.samples), ref.samples),
                )
                if got != want
            ]
            if problems:
                raise ShardIndexError(f"{ref.index}: does not fit its shard: {'; '.join(problems)}")
        except ShardIndexError as exc:
            self.counts.note("bad_index", str(exc))
            entry: tuple[ShardIndex | None, set[int]] = (None, set())
        else:
            seen: set[str] = set()
            duplicates = set()
            for k, span in enumerate(index.samples):
                if span.key in seen:
                    duplicates.add(k)
                seen.add(span.key)
            entry = (index, duplicates)
        self._indices[ref.index] = entry
        while len(self._indices) > self._cached:
            self._indices.popitem(last=False)
        return entry


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _lost(samples: np.ndarray, lost: tuple[str, str] | None, spans=None) -> Iterator[RawSample]:
    """A fault standing for each sample not read (keyed by the index where there is one)."""
    if lost is None:
        return
    reason = {"missing": "unreadable_shard", "tar_bytes": "bad_tar"}.get(lost[0], lost[0])
    for k in samples:
        yield RawSample(spans[int(k)].key if spans is not None else "", fault=reason, detail=lost[1])


def _close_quietly(f) -> str:
    try:
        f.close()
    except Exception as exc:  # noqa: BLE001 - reported by the caller when it matters
        return str(exc)
    return ""
