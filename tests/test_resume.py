"""Long runs: exact resume after SIGKILL, SIGTERM checkpoints, damaged checkpoints, N->M ranks, export."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from launch import REPO, cpu_env, metrics, pretrain, script_json, step_losses, torchrun, torchrun_cmd
from PIL import Image

pytestmark = pytest.mark.slow

N = 8  # steps before the interruption
COMMON = [
    "--config",
    "demo",
    "train.precision=fp32",
    "log.every_steps=1",
    "log.wandb=off",
    "schedule.warmup_steps=2",
    "data.workers=1",
    "checkpoint.every_minutes=0",
]


def _samples(run, rank) -> dict[int, list]:
    out = {}
    for line in (run / f"samples_rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["keys"]  # later (resumed) lines replace earlier ones
    return out


def _weights(run, step):
    from mae_scale.export import consolidated_state_dict

    sd, _, tag = consolidated_state_dict(run, step)
    assert tag == f"step_{step:08d}"
    return sd


@contextlib.contextmanager
def _torchrun_job(args, entry=("-m", "mae_scale.pretrain")):
    """A 2-rank job in the background; whatever happens in the test, nothing of it outlives the block."""
    proc = subprocess.Popen(
        torchrun_cmd(args, entry=entry),
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            _kill_job(proc)


def _kill_job(proc) -> None:
    """SIGKILL the launcher, its ranks and their DataLoader workers, as a node failure would.

    torchrun starts each rank in its own session, so killing the launcher's process group would
    leave the ranks running (and training on) behind the test's back.
    """
    try:
        launcher = psutil.Process(proc.pid)
        everyone = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:  # the launcher is gone; its ranks, if any, cannot be found from it
        everyone = []
    for p in everyone:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(everyone, timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"
    proc.wait()


def _wait_for(predicate, proc, timeout=240):
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{proc.stdout.read()[-6000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, demo_shards):
    run = tmp_path_factory.mktemp("straight") / "run"
    torchrun(
        COMMON
        + [f"run.dir={run}", f"train.steps={2 * N}", f"checkpoint.every_steps={N}", "log.sample_keys=true"]
    )
    return run


def test_sigkill_then_resume_is_bit_exact(straight_run, tmp_path):
    run = tmp_path / "killed"
    args = COMMON + [
        f"run.dir={run}",
        f"train.steps={2 * N}",
        f"checkpoint.every_steps={N}",
        "log.sample_keys=true",
    ]
    latest = run / "checkpoints" / "latest"
    with _torchrun_job(args) as proc:
        _wait_for(lambda: latest.exists(), proc)
        _kill_job(proc)  # the launcher, both ranks and their workers: no chance to clean up
    killed_at = max(step_losses(run))
    assert killed_at < 2 * N, "the run finished before the kill: the test did not interrupt it"
    assert latest.read_text() == f"step_{N:08d}"

    torchrun(args)  # same command: --resume auto
    _assert_same_as_straight(run, straight_run)


def _assert_same_as_straight(run, straight_run):
    """Same losses (bit for bit), the same sample keys at every step and the same final weights."""
    straight, resumed = step_losses(straight_run), step_losses(run)
    assert sorted(resumed) == sorted(straight) == list(range(1, 2 * N + 1))
    assert [resumed[s] for s in sorted(resumed)] == [straight[s] for s in sorted(straight)]  # bit for bit
    for rank in (0, 1):  # the same samples at every step: nothing repeated, nothing skipped
        assert len(_samples(straight_run, rank)) == 2 * N
        assert _samples(run, rank) == _samples(straight_run, rank)
    a, b = _weights(straight_run, 2 * N), _weights(run, 2 * N)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_during_save_then_resume_is_bit_exact(straight_run, tmp_path):
    """PAINS: a kill during save leaves a torn checkpoint. `latest` still names the previous one, the
    resumed run replaces the torn folder, and the result equals a run that never stopped."""
    run, marker, torn = tmp_path / "torn", tmp_path / "saving", f"step_{N:08d}"
    args = COMMON + [
        f"run.dir={run}",
        f"train.steps={2 * N}",
        f"checkpoint.every_steps={N // 2}",
        "checkpoint.keep=3",
        "log.sample_keys=true",
    ]
    script = REPO / "tests" / "scripts" / "slow_save_pretrain.py"
    with _torchrun_job(args, entry=(str(script), torn, str(marker))) as proc:
        _wait_for(marker.exists, proc)  # one rank has written a file of step N's checkpoint and stalls
        _kill_job(proc)
    ckpt = run / "checkpoints"
    assert (ckpt / torn).is_dir() and not (ckpt / torn / "complete.json").exists(), "not torn: no test"
    assert (ckpt / "latest").read_text() == f"step_{N // 2:08d}"
    (ckpt / torn / "left_by_the_torn_save").touch()

    proc = torchrun(args)  # the plain command, --resume auto
    assert f"resumed from {ckpt / f'step_{N // 2:08d}'}" in proc.stderr + proc.stdout
    kept = sorted(p.name for p in ckpt.glob("step_*"))
    assert kept == [f"step_{s:08d}" for s in (N, 3 * N // 2, 2 * N)]
    assert all((ckpt / tag / "complete.json").is_file() for tag in kept)
    assert not (ckpt / torn / "left_by_the_torn_save").exists()  # saved afresh, not over the torn files
    _assert_same_as_straight(run, straight_run)


def test_sigterm_checkpoints_then_resumes(tmp_path, demo_shards):
    run = tmp_path / "term"
    with _torchrun_job(COMMON + [f"run.dir={run}", "train.steps=10000", "checkpoint.every_steps=0"]) as proc:
        _wait_for(lambda: (run / "metrics.jsonl").exists() and len(step_losses(run)) >= 3, proc)
        launcher = psutil.Process(proc.pid)
        ranks = launcher.children()
        workers = [w for r in ranks for w in r.children(recursive=True)]
        assert len(ranks) == 2 and workers, "expected 2 ranks with DataLoader workers"
        # Every DataLoader worker and ONE rank get SIGTERM (as when one node's scheduler stops first):
        # all ranks must agree to checkpoint at the same step, and the workers must not die before that.
        for p in [ranks[1], *workers]:
            p.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by signal at step" in out
    tag = (run / "checkpoints" / "latest").read_text()
    step = int(tag.split("_")[1])
    assert (run / "checkpoints" / tag / "complete.json").is_file()
    # rank 0 was not signalled itself: its summary says the stop came from another rank
    assert f"[mae-scale] run summary: {run} (stopped by a signal to another rank)" in out
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["steps"] == {"from": 0, "to": step, "target": 10000}
    assert stopped["checkpoint"] == str(run / "checkpoints" / tag)
    assert stopped["pictures"]["reconstruction"] is None  # no end-of-run picture after a stop

    resumed = torchrun(COMMON + [f"run.dir={run}", f"train.steps={step + 2}", "checkpoint.every_steps=0"])
    assert f"at step {step}" in resumed.stderr
    assert max(step_losses(run)) == step + 2
    assert f"[mae-scale] run summary: {run} (finished)" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == {"from": step, "to": step + 2, "target": step + 2}
    # the curves of the resumed run: two segments, the second from the checkpoint's step
    from mae_scale.plots import read_segments

    assert [s.start for s in read_segments(run)] == [0, step]
    tool = [
        sys.executable,
        str(REPO / "tools" / "plot_metrics.py"),
        str(run),
        "--out",
        str(run / "again.png"),
    ]
    plotted = subprocess.run(tool, capture_output=True, text=True)
    assert plotted.returncode == 0, plotted.stderr
    with Image.open(run / "metrics.png") as im:
        assert im.format == "PNG" and im.size == (1100, 800)


def test_signal_after_the_agreement_waits_for_the_next_one(tmp_path, demo_shards):
    """Rank 1 is signalled right after step 3's agreement: both ranks checkpoint together at step 4
    and exit 0 (acting on the local flag at step 3 hangs the job)."""
    run = tmp_path / "late"
    script = REPO / "tests" / "scripts" / "late_signal_pretrain.py"
    args = COMMON + [f"run.dir={run}", "train.steps=10000", "checkpoint.every_steps=0"]
    with _torchrun_job(args, entry=(str(script), "3")) as proc:
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by signal at step 4" in out
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert (run / "checkpoints" / "step_00000004" / "complete.json").is_file()


def test_dual_masking_resumes_bit_exact(tmp_path, demo_shards):
    """The decoder's mask draws from the checkpointed RNG streams: a run with dual masking stopped by
    SIGTERM at step 4 and resumed gives the losses and weights of one that never stopped."""
    args = COMMON + ["model.decoder_mask_ratio=0.5", f"train.steps={N}", "checkpoint.every_steps=0"]
    straight, run = tmp_path / "straight", tmp_path / "stopped"
    torchrun(args + [f"run.dir={straight}"])
    script = REPO / "tests" / "scripts" / "late_signal_pretrain.py"
    with _torchrun_job(args + [f"run.dir={run}"], entry=(str(script), "3")) as proc:
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert "stopped by signal at step 4" in out
    torchrun(args + [f"run.dir={run}"])  # the plain command: --resume auto
    a, b = step_losses(straight), step_losses(run)
    assert sorted(a) == sorted(b) == list(range(1, N + 1))
    assert [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]  # bit for bit
    wa, wb = _weights(straight, N), _weights(run, N)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, demo_shards):
    """One process, checkpoints at steps 4 and 8."""
    run = tmp_path_factory.mktemp("one") / "run"
    pretrain(COMMON + [f"run.dir={run}", "train.steps=8", "checkpoint.every_steps=4", "checkpoint.keep=3"])
    return run


def _damage_and_resume(src, tmp_path, damage):
    run = tmp_path / "damaged"
    shutil.copytree(src, run)
    ckpt = run / "checkpoints"
    damage(ckpt)
    proc = pretrain(COMMON + [f"run.dir={run}", "train.steps=9", "checkpoint.every_steps=4"])
    return proc.stderr


def test_missing_shard_file_falls_back_to_previous(one_rank_run, tmp_path):
    def damage(ckpt):
        victim = next(p for p in sorted((ckpt / "step_00000008").iterdir()) if "optim_states" in p.name)
        victim.unlink()

    err = _damage_and_resume(one_rank_run, tmp_path, damage)
    assert "skipping step_00000008" in err and "optim_states.pt is missing" in err
    assert "resumed from" in err and "step_00000004 at step 4" in err


def test_truncated_file_falls_back_to_previous(one_rank_run, tmp_path):
    def damage(ckpt):
        victim = next(p for p in sorted((ckpt / "step_00000008").iterdir()) if "model_states" in p.name)
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])

    err = _damage_and_resume(one_rank_run, tmp_path, damage)
    assert "skipping step_00000008" in err and "(truncated or changed)" in err
    assert "step_00000004 at step 4" in err


def test_latest_pointing_nowhere_uses_newest_complete(one_rank_run, tmp_path):
    def damage(ckpt):
        (ckpt / "latest").write_text("step_00000099")

    err = _damage_and_resume(one_rank_run, tmp_path, damage)
    assert "points to 'step_00000099', which does not exist" in err
    assert "step_00000008 at step 8" in err


def test_interrupted_save_is_ignored(one_rank_run, tmp_path):
    def damage(ckpt):  # killed during save: files written, complete.json not yet
        (ckpt / "step_00000008" / "complete.json").unlink()

    err = _damage_and_resume(one_rank_run, tmp_path, damage)
    assert "incomplete: no complete.json" in err and "step_00000004 at step 4" in err


def test_resume_from_another_runs_checkpoint_folder(one_rank_run, tmp_path):
    source = one_rank_run / "checkpoints" / "step_00000004"
    proc = pretrain(
        COMMON
        + [
            f"run.dir={tmp_path / 'new'}",
            "train.steps=6",
            "checkpoint.every_steps=0",
            "--resume",
            str(source),
        ]
    )
    assert f"resumed from {source} at step 4" in proc.stderr
    assert (source / "config.yaml").is_file()  # the resolved config travels with every checkpoint


def _epoch_keys(shards, world: int, epoch: int) -> list[list[str]]:
    """What a fresh run of the demo preset at `world` ranks gets in `epoch`, per rank, in order."""
    from mae_scale.config import Config
    from mae_scale.data.loader import build_loader
    from mae_scale.data.stream import ClipStream

    data = Config.load("demo", [f"data.shards={shards}"]).data
    out = []
    for rank in range(world):
        loader = build_loader(data, batch_size=1, seed=0, rank=rank, world_size=world)
        out.append([item.raw.key for item in ClipStream(loader.spec, [(0, 0)]).epoch_items(rank, epoch)])
    return out


def _first_keys(run, rank, steps) -> list[str]:
    """The sample of each step (batches of 1 video: its R clips share the key). The sample log
    numbers a batch by the step count before it: the batch of optimizer step s is logged as s - 1."""
    logged = _samples(run, rank)
    return [logged[s][0] for s in steps]


def test_resume_two_ranks_killed_mid_epoch_on_one_rank(tmp_path, demo_shards):
    """2 ranks SIGKILLed mid-epoch, resumed on 1 (checkpoint.reshard_data=exact, the default): the
    weights carry over, every sample of the epoch in flight is trained once over both runs, and the
    next epoch is what a fresh 1-rank run trains in it. `skip` still restarts at the next epoch."""
    run = tmp_path / "reshard"
    args = COMMON + [f"run.dir={run}", "train.batch_size=1", "log.sample_keys=true"]
    latest = run / "checkpoints" / "latest"
    with _torchrun_job(args + ["train.steps=1000", "checkpoint.every_steps=3"]) as proc:
        _wait_for(latest.exists, proc)
        _kill_job(proc)
    # 4 demo videos, 2 per step: step 3 ends half-way through epoch 1
    assert latest.read_text() == "step_00000003", "the kill came after a later checkpoint: no mid-epoch test"
    saved = _weights(run, 3)
    expected_l2 = math.sqrt(sum(float(v.detach().double().pow(2).sum()) for v in saved.values()))
    trained = {r: _first_keys(run, r, [0, 1, 2]) for r in (0, 1)}
    shutil.copytree(run, tmp_path / "reshard_skip")
    proc = pretrain(args + ["train.steps=9", "checkpoint.every_steps=9"])
    assert "data stream continues exactly (2 -> 1 ranks)" in proc.stderr, proc.stderr[-3000:]
    starts = [m for m in metrics(run) if m.get("event") == "start"]
    assert starts[-1]["world_size"] == 1 and starts[-1]["step"] == 3
    assert starts[-1]["weights_l2"] == pytest.approx(expected_l2, rel=1e-6)
    losses = step_losses(run)
    assert sorted(losses)[-6:] == [4, 5, 6, 7, 8, 9] and all(math.isfinite(losses[s]) for s in range(4, 10))
    demo = sorted(k for keys in _epoch_keys(demo_shards, 1, 0) for k in keys)
    assert sorted(trained[0][:2] + trained[1][:2]) == demo  # steps 1-2: epoch 0
    after = _first_keys(run, 0, range(3, 9))
    assert sorted([trained[0][2], trained[1][2]] + after[:2]) == demo  # epoch 1: every video once
    assert after[2:] == _epoch_keys(demo_shards, 1, 2)[0]  # epoch 2: as a fresh 1-rank run

    skip_run = tmp_path / "reshard_skip"
    proc = pretrain(
        COMMON
        + [f"run.dir={skip_run}", "train.batch_size=1", "train.steps=4", "checkpoint.reshard_data=skip"]
    )
    restart = re.search(
        r"world size 2 -> 1: data stream restarts at the start of epoch (\d+) \(([^)]*)\)", proc.stderr
    )
    assert restart and restart[2].startswith("checkpoint.reshard_data=skip"), proc.stderr[-3000:]
    assert int(restart[1]) == 2  # the old ranks were inside epoch 1: skip starts at 2


def test_resume_one_rank_on_two_over_shards_without_an_index(tmp_path, demo_shards):
    """An old-format shard set (no index: the loader warns, naming the read factor, and trains) on
    1 rank, stopped mid-epoch, resumed on 2: every sample of that epoch once over both runs, then
    each rank gets what a fresh 2-rank run gets."""
    shards = tmp_path / "old_format"
    shards.mkdir()
    data = json.loads((demo_shards / "manifest.json").read_text())
    for s in data["shards"]:
        shutil.copy(demo_shards / s["name"], shards)
        del s["index"]
    (shards / "manifest.json").write_text(json.dumps(data))
    run = tmp_path / "grow"
    args = COMMON + [f"data.shards={shards}", f"run.dir={run}", "train.batch_size=1", "log.sample_keys=true"]
    first = pretrain(
        args + ["train.steps=6", "checkpoint.every_steps=6"]
    )  # 4 videos a step: epoch 1 half done
    assert "4 of 4 shards have no per-sample index" in first.stderr and "index_shards.py" in first.stderr
    second = torchrun(args + ["train.steps=9", "checkpoint.every_steps=9"])
    assert "data stream continues exactly (1 -> 2 ranks)" in second.stderr, second.stderr[-3000:]
    demo = sorted(k for keys in _epoch_keys(shards, 1, 0) for k in keys)
    before = _first_keys(run, 0, range(0, 6))
    ranks = {r: _first_keys(run, r, [6, 7, 8]) for r in (0, 1)}
    assert sorted(before[:4]) == demo
    assert sorted(before[4:] + [ranks[0][0], ranks[1][0]]) == demo  # epoch 1: every video once
    fresh = _epoch_keys(shards, 2, 2)
    assert [ranks[0][1:], ranks[1][1:]] == fresh  # epoch 2: as a fresh 2-rank run, rank by rank


def test_export_round_trip(tmp_path, demo_shards):
    """The exported model's loss on a fixed batch equals the live (DeepSpeed) model's."""
    result = script_json("export_round_trip.py", str(tmp_path))
    assert result["live_loss"] == result["exported_loss"]
    assert result["encoder_keys"] > 0 and result["decoder_keys_in_encoder_file"] == 0


def test_resume_none_refuses_an_existing_run_unless_overwrite(one_rank_run, tmp_path):
    run = tmp_path / "existing"
    shutil.copytree(one_rank_run, run)
    proc = pretrain(COMMON + [f"run.dir={run}", "train.steps=2", "--resume", "none"], check=False)
    assert proc.returncode == 2 and "already holds checkpoints; pass --overwrite" in proc.stderr
    assert (run / "checkpoints" / "step_00000008").is_dir()  # nothing was touched
    proc = pretrain(
        COMMON
        + [f"run.dir={run}", "train.steps=2", "checkpoint.every_steps=0", "--resume", "none", "--overwrite"]
    )
    assert "resumed from" not in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000002"]
