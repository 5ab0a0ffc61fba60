#!/usr/bin/env python
"""Export a run's pretrained weights: safetensors (whole MAE, encoder), model config JSON, mae_st .pth.

python tools/export.py runs/vit_l [--step 100000] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder (holds config.yaml and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest complete)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/step_XXXXXXXX)")
    args = p.parse_args(argv)
    from mae_scale.export import export_run

    try:
        out = export_run(args.run, args.step, args.out)
    except FileNotFoundError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
