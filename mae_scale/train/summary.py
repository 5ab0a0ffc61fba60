"""What a run tells as it goes and when it ends: bad samples by reason over all ranks (each reason's
first example named once), and the closing summary printed and written to RUN/summary.json."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mae_scale.report import by_reason_rows, format_table, human_duration

REPO = Path(__file__).resolve().parents[2]


class FaultTally:
    """Bad samples by reason, summed over every rank's loader since the run's start (on rank 0,
    which gathers the counts; the other ranks' tallies hold no counts of this world's loaders).

    `carried`: loader stats of the ranks of an earlier world size (their counts do not come back
    through this world's loaders, so they are added here once).
    """

    def __init__(self, carried: Iterable[dict] = ()):
        self.carried = [fault_stats(s) for s in carried]
        self.by_reason: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self._named: set[str] = set()

    def update(self, per_rank: list[dict]) -> list[str]:
        """Take every rank's `fault_stats` (rank order); returns a line for each reason not seen before."""
        counts: Counter = Counter()
        for stats in [*self.carried, *per_rank]:
            counts.update(stats["bad"])
            for reason, example in stats["examples"].items():
                self.examples.setdefault(reason, example)
        self.by_reason = dict(sorted(counts.items()))
        new = [reason for reason in self.by_reason if reason not in self._named]
        self._named.update(new)
        return [f"[mae-scale] bad sample ({r}), first: {self.examples.get(r, '?')}" for r in new]

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())


def fault_stats(loader_stats: dict) -> dict:
    """The part of a loader's stats the tally needs (small: it crosses ranks at every log)."""
    return {"bad": dict(loader_stats.get("bad", {})), "examples": dict(loader_stats.get("examples", {}))}


def command(tool: str, *args: object) -> str:
    """A shell command running `tools/TOOL` with this interpreter; paths inside the working directory
    are shown relative to it."""
    return shlex.join([_short(sys.executable), _short(REPO / "tools" / tool), *(str(a) for a in args)])


def _short(path: str | Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def closing_summary(
    *,
    run_dir: Path,
    ended: str,
    start_step: int,
    step: int,
    target_steps: int,
    wall_s: float,
    segment: dict | None,
    last_row: dict | None,
    skipped_steps: int,
    faults: FaultTally,
    checkpoint: str | None,
    pictures: dict[str, Path | None],
) -> dict[str, Any]:
    """The facts of one run segment (what summary.json holds). `segment`: the loop's metrics over
    all of its steps; `last_row`: the last metrics row (its numbers are the "last window")."""

    def pair(key: str) -> dict:
        return {
            "mean": segment.get(key) if segment else None,
            "last_window": last_row.get(key) if last_row else None,
        }

    return {
        "run_dir": str(run_dir),
        "ended": ended,
        "steps": {"from": start_step, "to": step, "target": target_steps},
        "wall_s": wall_s,
        "clips_per_s": pair("clips_per_s"),
        "mfu": pair("mfu"),
        "data_wait_frac": pair("data_wait_frac"),
        "skipped_steps": skipped_steps,
        "bad_samples": faults.total,
        "bad_by_reason": faults.by_reason,
        "bad_examples": {r: faults.examples.get(r) for r in faults.by_reason},
        "checkpoint": checkpoint,
        "pictures": {name: str(path) if path else None for name, path in pictures.items()},
        "commands": {
            "export": command("export.py", run_dir),
            "visualize": command("visualize.py", run_dir),
            "plot": command("plot_metrics.py", run_dir),
        },
    }


def format_summary(s: dict[str, Any]) -> str:
    def both(key: str, percent: bool = False) -> str:
        shown = [
            "-" if v is None else f"{v:.1%}" if percent else f"{v:.1f}"
            for v in (s[key]["mean"], s[key]["last_window"])
        ]
        return f"{shown[0]} mean (saves included), {shown[1]} last window"

    steps = s["steps"]
    rows: list[tuple[str, object]] = [
        ("steps", f"{steps['from']} -> {steps['to']} (train.steps={steps['target']})"),
        ("wall time", f"{human_duration(s['wall_s'])} (the loop: start-up not counted)"),
        ("clips/s", both("clips_per_s")),
        ("MFU", both("mfu", percent=True)),
        ("data wait", both("data_wait_frac", percent=True)),
        ("skipped steps", s["skipped_steps"]),
        *by_reason_rows(s["bad_by_reason"], "bad samples"),
        ("checkpoint", s["checkpoint"] or "none"),
        *((name, path) for name, path in s["pictures"].items() if path),
        ("summary", str(Path(s["run_dir"]) / "summary.json")),
        *s["commands"].items(),
    ]
    ended = s["ended"] if len(s["ended"]) < 200 else s["ended"][:200] + "..."
    return format_table(f"[mae-scale] run summary: {s['run_dir']} ({ended})", rows)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    tmp = path.with_name(".summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    tmp.replace(path)
    return path
