"""What a run shows a person: labelled reconstruction pictures, curves, fault tallies, closing tables.

Fast, in-process checks on synthetic inputs; the training runs that produce the real files are in
test_train.py, test_resume.py and test_data_faults.py.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mae_scale.viz import BACKGROUND, ROW_LABELS, clip_headers, label_grid, layout_for, save_png

REPO = Path(__file__).resolve().parent.parent


# ---- reconstruction pictures -------------------------------------------------------------------------


def _grid(clips: int, frames: int, size: int, seed: int = 0) -> np.ndarray:
    """What reconstruction_grid returns: clips x 3 rows of `frames` frames, here random patches."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (clips * 3 * size // 16, frames * size // 16, 3), dtype=np.uint8)
    return cells.repeat(16, axis=0).repeat(16, axis=1)  # 16 px patches


def _inked(picture: np.ndarray, box) -> bool:
    x0, y0, x1, y1 = box
    return bool((picture[y0:y1, x0:x1] != BACKGROUND).any())


def _text_boxes(layout):
    for c in range(layout.clips):
        yield layout.header_box(c)
        yield from (layout.index_box(c, f) for f in range(layout.frames))
        yield from (layout.label_box(c, r) for r in range(len(ROW_LABELS)))


def test_reconstruction_picture_has_its_labels_and_sharp_enlarged_frames():
    grid = _grid(clips=2, frames=4, size=64)
    headers = clip_headers(["00000002_bikes", "00000002_bikes"], 300, "random", 0.9)
    picture = label_grid(grid, headers=headers, frames=[0, 2, 4, 7], frame_hw=(64, 64))
    layout = layout_for(2, 4, 64, 64)
    assert (layout.frame_h, layout.frame_w) == (128, 128)  # the demo's 64 px shown twice as large
    assert picture.shape == (layout.size[1], layout.size[0], 3)
    for c in range(2):  # every frame is its grid frame, each pixel repeated 2 x 2 (nearest neighbour)
        for r in range(3):
            for f in range(4):
                x0, y0, x1, y1 = layout.frame_box(c, r, f)
                source = grid[(c * 3 + r) * 64 : (c * 3 + r + 1) * 64, f * 64 : (f + 1) * 64]
                assert np.array_equal(picture[y0:y1, x0:x1], source.repeat(2, 0).repeat(2, 1)), (c, r, f)
    # "without labels" is the background: every label's box has ink, and nothing else outside the frames
    blank = picture.copy()
    for box in _text_boxes(layout):
        assert _inked(picture, box), box
        x0, y0, x1, y1 = box
        blank[y0:y1, x0:x1] = BACKGROUND
    for c in range(2):
        for r in range(3):
            for f in range(4):
                x0, y0, x1, y1 = layout.frame_box(c, r, f)
                blank[y0:y1, x0:x1] = BACKGROUND
    assert (blank == BACKGROUND).all(), "ink outside the label boxes"


def test_headers_say_key_step_and_mask_and_are_drawn_as_given():
    headers = clip_headers(["a", "a", "b"], 120, "tube", 0.75)
    assert headers[0].startswith("a (clip 1)") and headers[1].startswith("a (clip 2)")
    assert headers[2].startswith("b  |") and "step 120" in headers[2] and "mask tube 0.75" in headers[2]
    grid = _grid(clips=2, frames=2, size=224)  # large frames: drawn 1:1
    layout = layout_for(2, 2, 224, 224)
    assert layout.frame_h == 224
    one = label_grid(grid, headers=["key_one", "same"], frames=[0, 7], frame_hw=(224, 224))
    two = label_grid(grid, headers=["key_two", "same"], frames=[0, 7], frame_hw=(224, 224))
    differs = np.argwhere((one != two).any(axis=2))  # (y, x) of every pixel that changed
    x0, y0, x1, y1 = layout.header_box(0)
    assert len(differs) and (differs[:, 0] >= y0).all() and (differs[:, 0] < y1).all()
    with pytest.raises(ValueError, match="2 clips of 2 frames; got 1 headers"):
        label_grid(grid, headers=["x"], frames=[0, 7], frame_hw=(224, 224))


def test_png_round_trip(tmp_path):
    picture = label_grid(_grid(1, 4, 64), headers=["k"], frames=[0, 2, 4, 7], frame_hw=(64, 64))
    path = save_png(picture, tmp_path / "sub" / "r.png")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == layout_for(1, 4, 64, 64).size
        assert np.array_equal(np.asarray(im.convert("RGB")), picture)


# ---- curves --------------------------------------------------------------------------------------------


def _write_run(run: Path, segments: list[tuple[int, range]], mask_ratio: float) -> Path:
    """A run folder with metrics.jsonl: per segment a start record at `start`, then rows at `steps`."""
    run.mkdir(parents=True)
    lines = []
    for start, steps in segments:
        lines.append({"step": start, "event": "start", "world_size": 2})
        for s in steps:
            lines.append(
                {
                    "step": s,
                    "loss": 1.0 / (1 + s / 50),
                    "lr": 1e-3,
                    "grad_norm": 0.5,
                    "clips_per_s": 40.0,
                    "data_wait_frac": 0.02,
                    "mfu": None,  # as on a device without a known peak: skipped, not drawn as 0
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run / "config.yaml").write_text(f"run: {{name: {run.name}}}\nmodel: {{mask_ratio: {mask_ratio}}}\n")
    return run


def _vertical_lines(ax) -> list[float]:
    return [line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1]


@pytest.fixture()
def two_runs(tmp_path):
    straight = _write_run(tmp_path / "mr90", [(0, range(10, 101, 10))], 0.9)
    resumed = _write_run(tmp_path / "mr75", [(0, range(10, 61, 10)), (40, range(50, 101, 10))], 0.75)
    return straight, resumed


def test_curves_mark_where_a_run_was_resumed_and_label_runs_by_what_differs(two_runs):
    from mae_scale.plots import PANELS, draw, read_segments

    straight, resumed = two_runs
    assert [(s.start, len(s.rows)) for s in read_segments(resumed)] == [(0, 6), (40, 6)]
    fig = draw([straight, resumed])
    panels = fig.axes[: len(PANELS)]
    assert [ax.get_title().split(" ")[0] for ax in panels] == [
        "loss",
        "learning",
        "clips/s",
        "data-wait",
        "grad",
    ]
    for ax in panels:
        assert _vertical_lines(ax) == [40.0]  # the resumed run's second segment, in every panel
    legend = [t.get_text() for t in fig.axes[-1].get_legend().get_texts()]
    assert legend[0].startswith("mr90, model.mask_ratio=0.9") and "resumed" not in legend[0]
    assert legend[1].startswith("mr75, model.mask_ratio=0.75") and "resumed at 40" in legend[1]
    loss = panels[0]
    assert len(loss.lines) == 2 * 1 + 2 * 2 + 1  # raw + smoothed per segment, and the resume mark


def test_plot_metrics_tool_overlays_runs_and_names_what_is_missing(two_runs, tmp_path):
    straight, resumed = two_runs
    out = tmp_path / "cmp.png"
    tool = [sys.executable, str(REPO / "tools" / "plot_metrics.py")]
    proc = subprocess.run(
        [*tool, str(straight), str(resumed), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == str(out), proc.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (1100, 800)
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 10 and (pixels < 100).mean() > 0.005  # curves and text, not an empty canvas
    missing = subprocess.run([*tool, str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 1 and f"{tmp_path / 'nope'}: no such run folder" in missing.stderr


def test_plot_metrics_errors_and_cut_lines(tmp_path, capsys):
    from mae_scale.plots import MetricsFileError, plot_runs, read_segments

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(MetricsFileError, match="no metrics file"):
        plot_runs([run], tmp_path / "x.png")
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(MetricsFileError, match=r"metrics.jsonl: no logged training steps yet"):
        plot_runs([run], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    # a kill mid-write, then a resume appending: the cut line is skipped (and said), the rest is read
    from mae_scale.train.metrics import MetricsLogger

    (run / "metrics.jsonl").write_text(
        '{"step": 0, "event": "start"}\n{"step": 1, "loss": 1.0}\n{"step": 2, "lo'
    )
    logger = MetricsLogger(
        run, {}, enabled=True, wandb_mode="off", project="x", total_steps=9, start_step=1, resumed=True
    )
    logger.log(1, {"event": "start"})
    logger.log(2, {"loss": 0.9})
    logger.close()
    assert [(s.start, [r["step"] for r in s.rows]) for s in read_segments(run)] == [(0, [1]), (1, [2])]
    assert "metrics.jsonl:3: not a JSON line, skipped" in capsys.readouterr().err


# ---- faults by reason, wandb ---------------------------------------------------------------------------


def test_fault_tally_sums_ranks_and_names_each_reason_once():
    from mae_scale.train.summary import FaultTally

    old_world = [{"bad": {"undecodable": 2}, "examples": {"undecodable": "s0/k0: old"}}]
    tally = FaultTally(carried=old_world)
    rank0 = {"bad": {"undecodable": 1}, "examples": {"undecodable": "s1/k1: moov atom not found"}}
    rank1 = {"bad": {"too_small": 3}, "examples": {"too_small": "s2/k2: 16x16"}}
    lines = tally.update([rank0, rank1])
    assert tally.by_reason == {"too_small": 3, "undecodable": 3} and tally.total == 6
    assert lines == [
        "[mae-scale] bad sample (too_small), first: s2/k2: 16x16",
        "[mae-scale] bad sample (undecodable), first: s0/k0: old",
    ]
    rank1 = {"bad": {"too_small": 4, "bad_json": 1}, "examples": {"bad_json": "s3/k3: {"}}
    assert tally.update([rank0, rank1]) == ["[mae-scale] bad sample (bad_json), first: s3/k3: {"]
    assert tally.by_reason == {"bad_json": 1, "too_small": 4, "undecodable": 3}


def test_wandb_gets_bad_by_reason_as_numbers(tmp_path):
    from mae_scale.train.metrics import MetricsLogger

    class Recorder:  # stands in for the wandb run: what it would have been given
        calls = []

        def log(self, values, step):
            self.calls.append((step, values))

        def finish(self):
            pass

    logger = MetricsLogger(
        tmp_path, {}, enabled=True, wandb_mode="off", project="x", total_steps=9, start_step=0, resumed=False
    )
    logger.wandb = Recorder()
    logger.log(7, {"loss": 0.5, "bad_samples": 3, "bad_by_reason": {"undecodable": 2, "too_small": 1}})
    logger.close()
    assert Recorder.calls == [
        (7, {"loss": 0.5, "bad_samples": 3, "bad_by_reason/undecodable": 2, "bad_by_reason/too_small": 1})
    ]
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["bad_by_reason"] == {"undecodable": 2, "too_small": 1} and row["bad_samples"] == 3


# ---- closing tables of the shard tools -----------------------------------------------------------------


def _table(stdout: str, title_start: str) -> dict[str, str]:
    """The `name  value` rows of the table that ends `stdout`, whose title starts with `title_start`."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(title_start))
    rows = {}
    for line in lines[start + 1 :]:
        name, _, value = line.strip().partition("  ")
        rows[name] = value.strip()
    return rows


def test_make_shards_ends_with_a_table_of_what_it_did(tmp_path, synthetic_videos):
    (tmp_path / "junk.mp4").write_bytes(b"no video at all")
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows(
            [[str(synthetic_videos / "synthetic_00.mp4")], [str(synthetic_videos / "synthetic_01.mp4")]]
            + [[str(tmp_path / "junk.mp4")], [str(tmp_path / "missing.mp4")]]
        )
    out = tmp_path / "shards"
    tool = [sys.executable, str(REPO / "tools" / "make_shards.py")]
    proc = subprocess.run(
        [*tool, str(listing), "--out", str(out), "--workers", "0", "--quiet"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows = _table(proc.stdout, "make_shards:")
    manifest = json.loads((out / "manifest.json").read_text())
    assert rows["inputs"] == "4" and rows["samples written"] == "2 in 1 shards"
    assert rows["rejects"] == "2" and rows["undecodable"] == "1" and rows["unreadable"] == "1"
    assert rows["bytes"].endswith(f"({manifest['total_bytes']})") and rows["time"].endswith(" s")
