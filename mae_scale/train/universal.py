"""Resume on a different number of ranks: DeepSpeed's universal checkpoint format.

A ZeRO checkpoint is partitioned for the world size that wrote it. DeepSpeed's `ds_to_universal`
rewrites it as one file per parameter (weights and Adam moments), which any world size can load
with `"checkpoint": {"load_universal": true}`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
from pathlib import Path


def convert_to_universal(src: Path, out: Path) -> Path:
    """Convert checkpoint folder `src` (one tag) into `out`, atomically (tmp folder, then rename)."""
    from deepspeed.checkpoint import ds_to_universal

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
        ds_to_universal.main(args)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
