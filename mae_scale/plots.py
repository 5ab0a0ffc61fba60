"""Training curves from RUN/metrics.jsonl: loss (raw and smoothed), lr, clips/s, data wait and grad
norm against step, one panel each, for one run or several overlaid (to compare, say, mask ratios).

A resumed run appends to metrics.jsonl, each segment starting with its `"event": "start"` record.
Segments are drawn as separate lines with a dashed mark where each resumed one starts, so the steps
a killed run logged after its last checkpoint (and trained again after the resume) stay visible.
Matplotlib's Agg backend through the object API: no display, no pyplot state.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

PANELS = (  # metrics.jsonl field, panel title
    ("loss", "loss (thin: as logged, thick: smoothed)"),
    ("lr", "learning rate"),
    ("clips_per_s", "clips/s (all ranks)"),
    ("data_wait_frac", "data-wait fraction of step time"),
    ("grad_norm", "grad norm"),
)
IGNORED_CONFIG_KEYS = {"run.name", "run.dir"}  # differ between any two runs: say nothing about them


class MetricsFileError(ValueError):
    """A run folder whose metrics cannot be drawn; the message names the path and why."""


@dataclass
class Segment:
    """What one start of a run logged: the step it started from and its step rows."""

    start: int
    rows: list[dict] = field(default_factory=list)


def read_segments(run_dir: str | Path) -> list[Segment]:
    """RUN/metrics.jsonl as segments, one per start of the run (a resume starts a new one)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise MetricsFileError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise MetricsFileError(f"{path}: no metrics file (has the run started?)")
    segments: list[Segment] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a run killed mid-write leaves a cut line; the rest is still worth drawing
            print(f"[plot] {path}:{number}: not a JSON line, skipped", file=sys.stderr)
            continue
        if record.get("event") == "start" or not segments:
            segments.append(Segment(int(record.get("step", 0))))
        if "loss" in record:
            segments[-1].rows.append(record)
    if not any(segment.rows for segment in segments):
        raise MetricsFileError(f"{path}: no logged training steps yet (empty or only start records)")
    return segments


def smoothed(values: list[float]) -> list[float]:
    """Exponential moving average over about 1/15 of the points (at least 3), debiased at the start."""
    alpha = 2 / (max(3, len(values) / 15) + 1)
    out, mean, weight = [], 0.0, 0.0
    for v in values:
        mean = (1 - alpha) * mean + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(mean / weight)
    return out


def run_labels(runs: list[Path]) -> list[str]:
    """Folder names, plus the config values that differ between the runs (e.g. model.mask_ratio=0.75)."""
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r) for r in runs]
    if len(runs) < 2:
        return names
    configs = [_flat_config(r) for r in runs]
    keys = sorted({k for c in configs for k in c} - IGNORED_CONFIG_KEYS)
    differing = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    return [
        name + "".join(f", {k}={c.get(k)}" for k in differing[:3])
        for name, c in zip(names, configs, strict=True)
    ]


def _flat_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    out: dict = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(yaml.safe_load(path.read_text()) or {}, "")
    return out


def draw(runs: list[str | Path], labels: list[str] | None = None):
    """A matplotlib Figure of the runs' curves (every run read first: a bad one fails before drawing)."""
    from matplotlib.figure import Figure

    runs = [Path(r) for r in runs]
    # segments that logged nothing (a restart of a finished run, a kill before the first log) add nothing
    all_segments = [[seg for seg in read_segments(r) if seg.rows] for r in runs]
    labels = labels or run_labels(runs)
    fig = Figure(figsize=(11, 8), dpi=100, layout="constrained")
    axes = fig.subplots(3, 2, sharex=True).flatten()
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (key, title), ax in zip(PANELS, axes, strict=False):
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        for segments, color in zip(all_segments, colors, strict=True):
            for n, segment in enumerate(segments):
                if n > 0:  # a resumed segment starts here
                    ax.axvline(segment.start, color=color, ls="--", lw=1)
                points = [(r["step"], r[key]) for r in segment.rows if isinstance(r.get(key), (int, float))]
                if not points:
                    continue
                steps, values = zip(*points, strict=True)
                if key == "loss":
                    ax.plot(steps, values, color=color, lw=0.8, alpha=0.35)
                    ax.plot(steps, smoothed(list(values)), color=color, lw=1.8)
                else:
                    ax.plot(steps, values, color=color, lw=1.2)
        if key == "data_wait_frac":
            ax.set_ylim(0, 1)
    for ax in axes[: len(PANELS)]:
        ax.tick_params(labelbottom=True)  # sharex hides them on all but the last row
    for ax in axes[len(PANELS) - 2 : len(PANELS)]:
        ax.set_xlabel("step")
    _legend(axes[-1], all_segments, labels, colors)
    return fig


def _legend(ax, all_segments, labels, colors) -> None:
    """The sixth panel: which color is which run, and where each run was resumed."""
    from matplotlib.lines import Line2D

    ax.axis("off")
    handles, texts = [], []
    for segments, label, color in zip(all_segments, labels, colors, strict=True):
        last = max(r["step"] for segment in segments for r in segment.rows)
        resumes = [segment.start for segment in segments[1:]]
        text = f"{label}\nsteps to {last}" + (
            f"; resumed at {', '.join(map(str, resumes))} (dashed)" if resumes else ""
        )
        handles.append(Line2D([], [], color=color, lw=1.8))
        texts.append(text)
    ax.legend(handles, texts, loc="upper left", frameon=False, fontsize=9)


def plot_runs(runs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Draw the runs' curves into the PNG `out` (written whole, then renamed into place)."""
    out = Path(out)
    fig = draw(runs, labels)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(out)
    return out
