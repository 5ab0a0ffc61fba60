"""Check shards against their manifest (sha256, counts, members, decoding); exit 1 on any fault."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from mae_scale.data.verify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
