"""Adopt WebDataset video shards that other tools wrote: see mae_scale/data/adopt.py or run with --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_scale.data.adopt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
