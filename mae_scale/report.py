"""The plain-text table that ends a long command's output (make_shards, verify_shards, a training run):
what it did, in one place, aligned for a person to read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def format_table(title: str, rows: Sequence[tuple[str, object]]) -> str:
    """`title`, then one `name  value` line per row; a name starting with spaces is shown indented."""
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join([title, *(f"  {name:<{width}}  {value}" for name, value in rows)])


def by_reason_rows(counts: Mapping[str, int], total_name: str) -> list[tuple[str, object]]:
    """A total row, then one indented row per reason (most frequent first)."""
    rows: list[tuple[str, object]] = [(total_name, sum(counts.values()))]
    rows += [(f"  {reason}", n) for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return rows


def human_bytes(n: float) -> str:
    units, i = ("B", "KB", "MB", "GB", "TB"), 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def human_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min" if hours else f"{m} min {s:02d} s"
