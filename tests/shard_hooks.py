"""Test doubles of the shard tools' per-video work, named as `video_fn` ("shard_hooks:NAME") or by the
MAE_SCALE_VIDEO_FN environment variable. They run in the video worker child of a shard task (a
pool worker, a Ray worker, or the test process), so tests/ must be on its import path.

Each wraps the real function: on the inputs it is told about it misbehaves, on all others it does
exactly what the real one does, so a run with a hook must give the same shards as one without.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from mae_scale.data.adopt import probe_job
from mae_scale.data.make_shards import prepare

PAUSE_FILE = "PAUSE_ON.json"  # beside the inputs: {"source": ..., "pid_file": ...}


def hang_or_crash(job):
    """An input whose name holds `hang` hangs the decoder forever; one with `crash` kills it."""
    _, item, *_ = job
    if "hang" in Path(item.source).name:
        while True:
            time.sleep(1)
    if "crash" in Path(item.source).name:
        os._exit(139)  # like a segfault in FFmpeg
    return prepare(job)


def pause_once(job):
    """On the input named in PAUSE_ON.json (beside the inputs): the first time, write the pid of the
    shard task's process (this child's parent) to its `pid_file` and wait there until killed.
    Later attempts (the file exists) go straight on."""
    _, item, *_ = job
    plan = Path(item.path).parent / PAUSE_FILE
    if plan.exists():
        spec = json.loads(plan.read_text())
        pid_file = Path(spec["pid_file"])
        if item.source == spec["source"] and not pid_file.exists():
            tmp = pid_file.with_name(pid_file.name + ".tmp")
            tmp.write_text(str(os.getppid()))
            tmp.replace(pid_file)
            while True:  # the child's watchdog ends this process when its parent dies
                time.sleep(0.2)
    return prepare(job)


def probe_hang(job):
    """index_shards' per-video work; a sample whose key holds `hang` hangs."""
    key = job[0]
    if "hang" in key:
        while True:
            time.sleep(1)
    return probe_job(job)
