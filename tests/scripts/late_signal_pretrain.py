"""`mae_scale.pretrain` in which rank 1 gets SIGTERM right after the ranks agreed on step K's stop flag.

    torchrun ... tests/scripts/late_signal_pretrain.py K [pretrain args]

The signal lands in the window a real scheduler hits only sometimes: after this step's agreement,
before the step ends. A rank that acted on its own flag would checkpoint alone while the other
trains on, and the job would hang in the save's collectives.
"""

import os
import runpy
import signal
import sys

from mae_scale.train import dist as D

late_step = int(sys.argv.pop(1))
agreements = 0
real_all_reduce_sum = D.all_reduce_sum


def all_reduce_sum_then_signal(values):
    global agreements
    out = real_all_reduce_sum(values)
    # the per-step agreement is the one reduce of 4 values (loss, non-finite, stop, checkpoint time)
    if len(values) == 4 and os.environ.get("RANK") == "1":
        agreements += 1
        if agreements == late_step:
            os.kill(os.getpid(), signal.SIGTERM)
    return out


D.all_reduce_sum = all_reduce_sum_then_signal
runpy.run_module("mae_scale.pretrain", run_name="__main__", alter_sys=True)
