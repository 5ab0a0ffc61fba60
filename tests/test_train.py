"""Pretraining through DeepSpeed on CPU: 2 real ranks (gloo), ZeRO-3/ZeRO-2, 2 'nodes' on localhost."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from launch import BIN, REPO, cpu_env, free_port, metrics, pretrain, run, script_json, step_losses, torchrun
from PIL import Image

from mae_scale.model.presets import ARCHS
from mae_scale.viz import layout_for

STEPS = 24
BASE = [
    "--config",
    "demo",
    f"train.steps={STEPS}",
    "log.every_steps=1",
    "checkpoint.every_steps=0",
    "schedule.warmup_steps=3",
    "train.precision=bf16",
    "data.workers=1",
]  # bf16 path on CPU
METRIC_KEYS = (
    "loss",
    "lr",
    "grad_norm",
    "clips_per_s",
    "tflops_per_device",
    "mfu",
    "data_wait_frac",
    "peak_mem_gb",
)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, demo_shards):
    run = tmp_path_factory.mktemp("zero3") / "run"
    proc = torchrun(BASE + [f"run.dir={run}", "log.image_every_steps=12"])
    (run.parent / "console.txt").write_text(proc.stdout + proc.stderr)
    return run


def _start(run):
    return next(m for m in metrics(run) if m.get("event") == "start")


def _falls(losses: dict[int, float]) -> bool:
    values = [losses[s] for s in sorted(losses)]
    return sum(values[-5:]) / 5 < sum(values[:5]) / 5


@pytest.mark.slow
def test_zero3_two_ranks_loss_falls_and_parameters_are_partitioned(zero3_run):
    losses = step_losses(zero3_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert _falls(losses), losses
    start = _start(zero3_run)
    assert start["zero_stage"] == 3 and start["world_size"] == 2
    host = start["hardware"]  # which machine ran it, as `python -m mae_scale.hardware` prints it
    assert host["cpu"] and host["cores"] >= 1 and host["deepspeed_accelerator"]["name"] == "cpu"
    total, per_rank = start["params_total"], start["params_per_rank"]
    assert len(per_rank) == 2
    for held in per_rank:  # each rank holds about half (ZeRO pads partitions to equal size)
        assert abs(held - total / 2) <= 0.01 * total, (held, total)


@pytest.mark.slow
def test_metrics_jsonl_wandb_offline_and_outputs(zero3_run):
    records = [m for m in metrics(zero3_run) if "loss" in m]
    for record in records:
        for key in METRIC_KEYS:
            assert key in record and record[key] is not None and math.isfinite(record[key]), (key, record)
    assert 0 <= records[-1]["data_wait_frac"] <= 1 and records[-1]["clips_per_s"] > 0
    lrs = [r["lr"] for r in records]  # lr of the next step: warmup up, cosine down to 0 after the last
    assert max(lrs) == pytest.approx(0.05 * 8 / 256, rel=0.05) and lrs[-1] < lrs[len(lrs) // 2]
    offline_runs = list((zero3_run / "wandb").glob("offline-run-*"))
    assert offline_runs, "wandb offline run folder missing"
    assert (zero3_run / "config.yaml").is_file()
    assert sorted(p.name for p in (zero3_run / "images").iterdir()) == [
        "step_00000012.png",
        "step_00000024.png",
    ]
    labelled = layout_for(clips=4, frames=4, height=64, width=64).size  # the demo: pred_t_dim 4, 64 px
    for picture in [zero3_run / "reconstruction.png", *(zero3_run / "images").iterdir()]:
        with Image.open(picture) as im:
            assert im.format == "PNG" and im.size == labelled, picture
            assert np.asarray(im.convert("L")).std() > 20, f"{picture} looks blank"
    with Image.open(zero3_run / "metrics.png") as im:
        assert im.format == "PNG" and im.size == (1100, 800)
    assert (zero3_run / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    for record in records:  # clean data: every row says so, by reason
        assert record["bad_samples"] == 0 and record["bad_by_reason"] == {}


@pytest.mark.slow
def test_closing_summary_agrees_with_the_metrics(zero3_run):
    summary = json.loads((zero3_run / "summary.json").read_text())
    last = [m for m in metrics(zero3_run) if "loss" in m][-1]
    assert summary["ended"] == "finished" and summary["steps"] == {"from": 0, "to": STEPS, "target": STEPS}
    for key in ("clips_per_s", "mfu", "data_wait_frac"):
        assert summary[key]["last_window"] == last[key], key
        assert 0 < summary[key]["mean"] < 2 * max(m[key] for m in metrics(zero3_run) if "loss" in m), key
    assert summary["skipped_steps"] == last["skipped_steps"] == 0
    assert summary["bad_by_reason"] == last["bad_by_reason"] == {} and summary["bad_samples"] == 0
    assert summary["checkpoint"] == str(zero3_run / "checkpoints" / f"step_{STEPS:08d}")
    assert summary["pictures"] == {
        "reconstruction": str(zero3_run / "reconstruction.png"),
        "curves": str(zero3_run / "metrics.png"),
    }
    console = (zero3_run.parent / "console.txt").read_text()
    table = console[console.index(f"[mae-scale] run summary: {zero3_run} (finished)") :]
    for name, command in summary["commands"].items():
        assert f"{name}  " in table and command in table
    assert summary["commands"]["visualize"].endswith(f"tools/visualize.py {zero3_run}")


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses(zero3_run, tmp_path):
    run = tmp_path / "ckpt"
    torchrun(BASE + [f"run.dir={run}", "model.checkpoint_activations=1", "log.wandb=off"])
    plain, ckpt = step_losses(zero3_run), step_losses(run)
    tiny = ARCHS["tiny"]
    assert _start(zero3_run)["checkpointed_blocks"] == 0
    assert _start(run)["checkpointed_blocks"] == tiny["depth"] + tiny["decoder_depth"]
    assert sorted(plain) == sorted(ckpt)
    for step in plain:  # same weights, data and masks: recomputation changes nothing
        assert ckpt[step] == pytest.approx(plain[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_dual_masking_trains_with_zero3_on_two_ranks(zero3_run, tmp_path):
    """VideoMAE V2's dual masking in the main job: ZeRO-3 on 2 ranks, the loss falls, the FLOPs (and
    so TFLOP/s and MFU) count the smaller decoder, the end picture still decodes every patch."""
    from mae_scale.config import Config
    from mae_scale.model.flops import train_step_flops
    from mae_scale.train.engine import model_kwargs

    run = tmp_path / "dual"
    dual = ["model.decoder_mask_ratio=0.5", "model.decoder_mask_type=running_cell"]
    torchrun(BASE + [f"run.dir={run}", "log.wandb=off", *dual])
    losses, plain = step_losses(run), step_losses(zero3_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert _falls(losses), losses
    assert losses[1] != plain[1]  # same weights and data: another loss, so the decoder mask was on
    start = _start(run)
    assert start["zero_stage"] == 3 and start["world_size"] == 2
    cfg = Config.load("demo", dual)
    assert (
        start["flops_per_clip"] == train_step_flops(model_kwargs(cfg)) < _start(zero3_run)["flops_per_clip"]
    )
    assert (run / "reconstruction.png").stat().st_size > 1000


@pytest.mark.slow
def test_zero2_with_grad_accumulation_trains_with_whole_parameters_on_each_rank(tmp_path):
    run = tmp_path / "zero2"
    torchrun(
        BASE
        + [
            f"run.dir={run}",
            "deepspeed.config=zero2.json",
            "log.wandb=off",
            "train.precision=fp32",
            "train.grad_accum=2",
        ]
    )
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))  # optimizer steps, each of 2 micro-steps
    assert _falls(losses)
    start = _start(run)
    assert start["zero_stage"] == 2 and start["params_per_rank"] == [start["params_total"]] * 2
    assert start["clips_per_step"] == 2 * 2 * 2 * 2  # videos x repeats x accumulation x ranks


@pytest.mark.slow
def test_two_nodes_on_localhost_agree_with_one_node(zero3_run, tmp_path):
    """Two launcher invocations (node ranks 0 and 1, one process each) = one node with 2 ranks."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    run = tmp_path / "two_nodes"
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        cmd = [
            str(BIN / "deepspeed"),
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node_rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            "--module",
            "mae_scale.pretrain",
            *BASE,
            f"run.dir={run}",
            "log.wandb=off",
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-6000:]
    one_node, two_nodes = step_losses(zero3_run), step_losses(run)
    assert sorted(two_nodes) == sorted(one_node)
    for step in one_node:
        assert two_nodes[step] == pytest.approx(one_node[step], rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize(
    "overrides, env, needle",
    [
        (["data.shards=/nonexistent/shards"], {}, "data.shards='/nonexistent/shards': no manifest.json"),
        (["train.global_batch_size=6"], {"WORLD_SIZE": "4"}, "must divide across 4 ranks x 1 grad_accum"),
        (["deepspeed.config=zero9.json"], {}, "deepspeed.config='zero9.json': no such file"),
        (["model.mask_type=tubes"], {}, "model.mask_type='tubes': must be one of random, tube, frame, cube"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, overrides, env, needle):
    run = tmp_path / "bad"
    t0 = time.monotonic()
    proc = pretrain(["--config", "demo", f"run.dir={run}", *overrides], env=cpu_env(**env), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in proc.stderr
    assert not run.exists(), "a bad config must not create the run folder"
    assert time.monotonic() - t0 < 60


def test_conflicting_deepspeed_file_is_named(tmp_path):
    ds = tmp_path / "mine.json"
    ds.write_text(
        json.dumps(
            {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 7, "gradient_clipping": 5.0}
        )
    )
    proc = pretrain(
        ["--config", "demo", f"run.dir={tmp_path / 'run'}", f"deepspeed.config={ds}"], check=False
    )
    assert proc.returncode == 2
    assert "train_micro_batch_size_per_gpu=7 (run config gives 4)" in proc.stderr
    assert "gradient_clipping=5.0 (run config gives 1.0)" in proc.stderr


@pytest.mark.slow
def test_non_finite_losses_are_skipped_counted_then_stop_the_run(tmp_path, demo_shards):
    """A huge lr drives the weights to inf: steps are skipped (no backward), then the run stops clearly."""
    run = tmp_path / "nan"
    proc = pretrain(
        [
            "--config",
            "demo",
            f"run.dir={run}",
            "train.steps=60",
            "optim.base_lr=1e9",
            "schedule.warmup_steps=0",
            "train.grad_clip=0",
            "train.max_nonfinite_steps=3",
            "log.every_steps=1",
            "log.wandb=off",
            "checkpoint.every_steps=0",
            "data.workers=0",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "3 consecutive non-finite losses" in proc.stderr
    assert "batch skipped" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())  # an error still ends with the summary
    assert summary["ended"].startswith("error: NonFiniteLossError: 3 consecutive non-finite losses")
    assert summary["skipped_steps"] == 3
    assert f"[mae-scale] run summary: {run} (error: NonFiniteLossError" in proc.stderr


def test_zero3_init_gives_the_same_weights_as_a_plain_build(tmp_path):
    """DeepSpeed #2650: under zero.Init a model-level init sees empty partitions and silently does
    nothing. We init one gathered module at a time: the weights equal a plain build's, bit for bit."""
    result = script_json("zero3_init.py")
    assert result["partitioned"] and result["mismatched"] == [] and result["tensors"] > 20
    assert result["linear_within_xavier_bound"] and result["biases_zero"] and result["layernorm_ones"]
    assert 0.015 < result["pos_embed_std"] < 0.025


@pytest.mark.slow
def test_visualize_and_export_tools_work_on_any_checkpoint(zero3_run, tmp_path):
    """tools/visualize.py draws a run's checkpoint (or an export); tools/export.py writes the export."""
    picture = tmp_path / "recon.png"
    tool = [sys.executable, str(REPO / "tools" / "visualize.py")]
    run([*tool, str(zero3_run), "--step", "24", "--out", str(picture)], timeout=300, env=None, check=True)
    with Image.open(picture) as im:  # 4 clips of pred_t_dim=4 frames, labelled
        assert im.size == layout_for(clips=4, frames=4, height=64, width=64).size
    export = tmp_path / "export"
    export_tool = [sys.executable, str(REPO / "tools" / "export.py")]
    run([*export_tool, str(zero3_run), "--out", str(export)], timeout=300, env=None, check=True)
    assert {p.name for p in export.iterdir()} >= {
        "mae.safetensors",
        "encoder.safetensors",
        "model_config.json",
        "mae_st.pth",
    }
    import torch

    from mae_scale.model.convert import from_mae_st, load_state_dict_strict
    from mae_scale.model.mae import MaskedAutoencoderViT

    official = torch.load(export / "mae_st.pth", weights_only=True)  # tensors and plain types only
    kwargs = json.loads((export / "model_config.json").read_text())["model_kwargs"]
    load_state_dict_strict(MaskedAutoencoderViT(**kwargs), from_mae_st(official))
    run([*tool, str(export), "--out", str(tmp_path / "from_export.png")], timeout=300, env=None, check=True)
    missing = run([*tool, str(zero3_run), "--step", "7"], timeout=300, env=None, check=False)
    assert missing.returncode == 1 and "no usable checkpoint for step 7" in missing.stderr


def test_wandb_online_without_network_or_key_never_stops_training(tmp_path):
    """No API key and no network: wandb must neither hang the run nor crash it; logging goes on without it."""
    code = (
        "import sys; from pathlib import Path; from mae_scale.train.metrics import MetricsLogger\n"
        f"m = MetricsLogger(Path({str(tmp_path)!r}), {{}}, enabled=True, wandb_mode='online', project='x',"
        " total_steps=2, start_step=0, resumed=False)\n"
        "m.log(1, {'loss': 1.0}); m.close(); print('wandb' if m.wandb else 'no-wandb')\n"
    )
    env = {k: v for k, v in cpu_env().items() if not k.startswith("WANDB")}
    env.update(WANDB_DIR=str(tmp_path), HOME=str(tmp_path), MAE_SCALE_NO_BAR="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("no-wandb") and "wandb disabled" in proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text().count('"loss": 1.0') == 1
    assert time.monotonic() - t0 < 120


def test_progress_bar_shows_no_loss_before_there_is_one(tmp_path, monkeypatch):
    """An event record (no loss) left "loss=nan" on the bar until the first logged step."""
    from mae_scale.train.metrics import MetricsLogger

    monkeypatch.delenv("MAE_SCALE_NO_BAR", raising=False)
    m = MetricsLogger(
        tmp_path, {}, enabled=True, wandb_mode="off", project="x", total_steps=2, start_step=0, resumed=False
    )
    m.log(0, {"event": "start"})
    assert "loss" not in (m.bar.postfix or "")
    m.log(1, {"loss": 1.25, "lr": 1e-3})
    assert "loss=1.2500" in m.bar.postfix
    m.close()


@pytest.mark.slow
def test_slow_data_source_is_reported(tmp_path, demo_shards):
    """PAINS: the accelerator waits on the data and nobody sees it. Shards behind a slow `pipe:`
    (an object store answering in 0.5 s) make the loader the bottleneck: the metrics show it and a
    warning names the setting to change."""
    run = tmp_path / "slow"
    slow = f"pipe:sleep 0.5; cat {demo_shards / 'manifest.json'}"  # every shard goes through the same command
    proc = pretrain(
        [
            "--config",
            "demo",
            f"run.dir={run}",
            f"data.shards={slow}",
            "train.steps=6",
            "log.every_steps=2",
            "log.wandb=off",
            "checkpoint.every_steps=0",
            "data.workers=1",
        ]
    )
    waits = [m["data_wait_frac"] for m in metrics(run) if "loss" in m]
    assert len(waits) == 3 and min(waits[1:]) > 0.5, waits
    assert "of the time waiting for data; the loader is the bottleneck (raise data.workers=1" in proc.stderr


def test_clips_are_normalized_per_channel_on_the_device():
    """The one host-to-device path (trainer, pictures, tools): uint8 in, (x / 255 - mean) / std out."""
    from mae_scale.train.batch import normalize_clips

    clips = torch.randint(0, 256, (2, 3, 4, 8, 8), dtype=torch.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    out = normalize_clips(clips, mean, std, torch.float32)
    for c in range(3):
        want = (clips[:, c].double() / 255 - mean[c]) / std[c]
        assert torch.allclose(out[:, c].double(), want, atol=1e-6)
    assert normalize_clips(clips, mean, std, torch.bfloat16).dtype == torch.bfloat16
    assert clips.dtype == torch.uint8  # the loader's batch is left as it was (it is reused)
