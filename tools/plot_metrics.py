#!/usr/bin/env python
"""Training curves of one run or several overlaid: loss, lr, clips/s, data wait, grad norm vs step.

python tools/plot_metrics.py runs/demo                          # -> runs/demo/metrics.png
python tools/plot_metrics.py runs/mr75 runs/mr90 --out cmp.png  # overlay (legend: differing config)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument(
        "--out",
        default=None,
        help="PNG path (default: RUN/metrics.png for one run, metrics_compare.png here for several)",
    )
    args = p.parse_args(argv)

    from mae_scale.plots import MetricsFileError, plot_runs

    default = Path(args.runs[0]) / "metrics.png" if len(args.runs) == 1 else Path("metrics_compare.png")
    try:
        out = plot_runs(args.runs, args.out or default)
    except MetricsFileError as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
