"""Build WebDataset video shards: see mae_scale/data/make_shards.py or run with --help."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_scale.data.make_shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
