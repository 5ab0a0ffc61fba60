"""`mae_scale.pretrain` whose checkpoint writes stall at one step, so a test can SIGKILL it mid-save.

    torchrun ... tests/scripts/slow_save_pretrain.py STALL_TAG MARKER [pretrain args]

Every `torch.save` into the folder of checkpoint STALL_TAG writes its file, then touches MARKER
and sleeps: the test waits for MARKER and kills the job with that checkpoint half written.
"""

import runpy
import sys
import time
from pathlib import Path

import torch

stall_tag, marker = sys.argv[1], Path(sys.argv[2])
del sys.argv[1:3]
real_save = torch.save


def stalling_save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if isinstance(f, (str, Path)) and stall_tag in Path(f).parts:
        marker.touch()
        time.sleep(600)


torch.save = stalling_save
runpy.run_module("mae_scale.pretrain", run_name="__main__", alter_sys=True)
