"""Every place where behaviour follows the host, with each answer of its probe forced, so the suite
proves the same things on an Intel Xeon, an AMD EPYC (with or without AVX-512) and a GPU node.

The probes: DeepSpeed's accelerator answers (is_fp16_supported, is_bf16_supported), the CPU flags
(`amx_bf16` in auto precision), CUDA present or not, the shell scripts' nvidia-smi and nproc,
/dev/shm room, the affinity mask, the instruction set that compiled ops are cached by, and the
DataLoader's start method (fork, spawn, forkserver).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import REPO, cpu_env, script_json

from mae_scale import hardware
from mae_scale.config import Config, ConfigError
from mae_scale.train import dist as D
from mae_scale.train import metrics
from mae_scale.train.engine import PrecisionError, auto_precision, check_dtypes, resolve_precision

INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_fp16 amx_bf16 amx_tile

processor\t: 1
model name\t: another
"""
AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16
"""


def test_cpuinfo_is_read_from_the_first_processor(tmp_path):
    for text, model, flags in [
        (INTEL_CPUINFO, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", {"amx_bf16", "avx512_fp16"}),
        (AMD_CPUINFO, "AMD EPYC 9B14", {"avx512_bf16", "avx2"}),
    ]:
        path = tmp_path / f"cpuinfo-{model[:3]}"  # _cpuinfo caches per path
        path.write_text(text)
        info = hardware._cpuinfo(str(path))
        assert info["model name"] == model and flags <= set(info["flags"].split())
    assert hardware._cpuinfo(str(tmp_path / "missing")) == {}  # macOS, or a sandbox without /proc


@pytest.fixture
def host(monkeypatch):
    """Force the host: `host(cuda=..., cuda_bf16=..., flags=..., ds_bf16=...)`."""

    def force(cuda=False, cuda_bf16=False, flags=(), ds_bf16=True, ds_fp16=None):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(
            hardware,
            "accelerator_answers",
            lambda: {"name": "cuda" if cuda else "cpu", "bf16": ds_bf16, "fp16": ds_fp16},
        )

    return force


@pytest.mark.parametrize(
    "forced, expected",
    [
        (dict(cuda=True, cuda_bf16=True), "bf16"),
        (dict(cuda=True, cuda_bf16=False), "fp32"),  # V100, T4
        (dict(flags={"avx2", "amx_bf16"}), "bf16"),  # Sapphire Rapids and later
        (dict(flags={"amx_bf16"}, ds_bf16=False), "fp32"),
        (dict(flags={"avx512_bf16", "avx512_fp16"}), "fp32"),  # measured slower in bf16 (BENCHMARKS.md)
        (dict(flags={"avx2"}), "fp32"),  # AMD EPYC without AVX-512
        (dict(flags=()), "fp32"),  # no /proc/cpuinfo
    ],
)
def test_auto_precision_follows_the_host(host, forced, expected):
    host(**forced)
    assert auto_precision() == expected
    assert resolve_precision(Config.load("demo", ["train.precision=auto"])) == expected
    assert resolve_precision(Config.load("demo", ["train.precision=fp32"])) == "fp32"


def test_bf16_on_a_device_without_it_fails_naming_the_key(host):
    host(ds_bf16=False)
    with pytest.raises(ConfigError, match=r"train.precision='bf16': the cpu accelerator reports no bf16"):
        resolve_precision(Config.load("demo", ["train.precision=bf16"]))
    host(ds_bf16=True)
    assert resolve_precision(Config.load("demo", ["train.precision=bf16"])) == "bf16"


# The main job's engine under every answer DeepSpeed's CPU accelerator can give: fp16 True (Intel with
# AVX512-FP16), None (what it returns without it: AMD EPYC, older Xeons) and False; bf16 both ways.
ENGINE_CASES = [
    {"config": config, "precision": precision, "fp16": fp16, "bf16": True}
    for config in ("zero3.json", "zero2.json", "zero3_offload.json")
    for precision in ("fp32", "bf16")
    for fp16 in (True, None)
] + [
    {"config": "zero3.json", "precision": "fp32", "fp16": False, "bf16": False},
    {"config": "zero3.json", "precision": "bf16", "fp16": False, "bf16": False},
]


@pytest.mark.slow
def test_engine_dtypes_follow_the_run_precision_whatever_deepspeed_is_told():
    """zero.Init ignored the dtype we passed on an accelerator without fp16 and built bf16 parameters
    for fp32 runs (the AMD crash in conv3d). Every case: parameters, ZeRO partitions and input in the
    run's dtype, the optimizer's master copy and the loss in fp32, and no shm_comm op built."""
    out = script_json("precision_matrix.py", json.dumps(ENGINE_CASES), timeout=600)
    results = out["cases"]
    assert len(results) == len(ENGINE_CASES)
    for case in results:
        if case["precision"] == "bf16" and not case["bf16"]:
            assert "train.precision='bf16': the cpu accelerator reports no bf16 support" in case["error"]
            continue
        want = {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[case["precision"]]
        assert "error" not in case, case
        assert case["resolved"] == case["precision"], case
        assert case["params"] == [want] and case["input"] == want, case
        assert case["masters"] == ["torch.float32"], case
        assert case["loss"] == "torch.float32" and case["loss_finite"], case
    assert not out["shm_comm_op_built"]


def test_dtype_guard_names_the_parameter_both_dtypes_and_the_cause():
    class Engine:
        module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(torch.bfloat16))

    with pytest.raises(PrecisionError) as err:
        check_dtypes(Engine(), "fp32")
    text = str(err.value)
    assert "parameter '1.weight' is torch.bfloat16" in text and "fp32 (torch.float32)" in text
    assert "2 parameters differ" in text and "capability answers" in text
    check_dtypes(type("E", (), {"module": torch.nn.Linear(2, 2)})(), "fp32")

    partitioned = torch.nn.Linear(2, 2)
    partitioned.weight.ds_tensor = torch.zeros(2, dtype=torch.bfloat16)  # a ZeRO-3 partition
    with pytest.raises(PrecisionError, match="parameter 'weight' is torch.bfloat16"):
        check_dtypes(type("E", (), {"module": partitioned})(), "fp32")


def test_device_backend_and_peak_follow_cuda(monkeypatch):
    monkeypatch.setattr(metrics, "measured_matmul_tflops", lambda precision: 1.25)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D._backend() == "gloo" and D.device() == torch.device("cpu")
    assert metrics.device_peak_tflops("fp32") == (1.25, "measured matmul on CPU")
    assert metrics.device_peak_tflops("fp32", override=7.0) == (7.0, "given")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert D._backend() == "nccl" and D.device() == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert metrics.device_peak_tflops("bf16") == (989.0, "datasheet H200")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA RTX 9000")
    assert metrics.device_peak_tflops("bf16") == (1.25, "measured matmul on NVIDIA RTX 9000")


def _host_plan(tmp_path: Path, nvidia_smi: str | None, cores: int, **env: str) -> dict[str, str]:
    """tools/host.sh's decisions with fake nvidia-smi and nproc first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in (("nvidia-smi", nvidia_smi), ("nproc", f"echo {cores}")):
        path = bin_dir / name
        path.unlink(missing_ok=True)
        if body is not None:
            path.write_text(f"#!/bin/sh\n{body}\n")
            path.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "NPROC")}
    clean.update(env, PATH=f"{bin_dir}:/usr/bin:/bin")
    out = subprocess.run(
        ["bash", "-c", "source tools/host.sh && host_plan"],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.split())


def test_shell_scripts_choose_gpu_or_cpu_from_what_nvidia_smi_lists(tmp_path):
    two_gpus = 'echo "GPU 0: NVIDIA H200 (UUID: GPU-a)"; echo "GPU 1: NVIDIA H200 (UUID: GPU-b)"'
    gpu = _host_plan(tmp_path, two_gpus, cores=32)
    assert gpu == {"NGPU": "2", "TORCH_SPEC": "'torch>=2.4,<2.14'", "NPROC": "2"}  # no CPU accelerator
    for smi in (None, "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9"):  # no binary; no driver
        cpu = _host_plan(tmp_path, smi, cores=16)
        assert cpu == {
            "NGPU": "0",
            "TORCH_SPEC": "'torch==2.13.0'",
            "NPROC": "2",
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "8",
        }
    assert _host_plan(tmp_path, None, cores=1)["OMP_NUM_THREADS"] == "1"
    assert _host_plan(tmp_path, None, cores=16, OMP_NUM_THREADS="3")["OMP_NUM_THREADS"] == "3"
    for script in ("tools/setup_env.sh", "tools/demo.sh"):
        text = (REPO / script).read_text()
        assert 'eval "$(host_plan)"' in text and "nvidia-smi" not in text  # one place decides


def test_shared_memory_too_small_fails_before_any_work(monkeypatch, capsys, demo_shards, tmp_path):
    from mae_scale import pretrain
    from mae_scale.data.loader import shared_memory_per_rank

    cfg = Config.load("vit_l")
    assert shared_memory_per_rank(cfg.data, cfg.train.batch_size) == (
        cfg.data.workers * 7 * 8 * 4 * 16 * 224 * 224 * 3  # 7 batches of 77 MB per worker
    )
    assert shared_memory_per_rank(Config.load("demo", ["data.workers=0"]).data, 2) == 0

    monkeypatch.setattr(hardware, "shm_free_bytes", lambda path=hardware.SHM_PATH: 64 << 20)  # docker
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    run_dir = tmp_path / "run"
    assert pretrain.main(["--config", "vit_l", f"data.shards={demo_shards}", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "8 rank(s) x data.workers=8 loader workers need about 32.16 GiB of shared memory" in err
    assert "in /dev/shm, which has 0.06 GiB free" in err and "--shm-size" in err
    assert not run_dir.exists()  # before any work

    monkeypatch.setattr(hardware, "shm_free_bytes", lambda path=hardware.SHM_PATH: None)  # none to ask
    hardware.require_shared_memory(1 << 40, "anything")
    monkeypatch.setattr(hardware, "shm_free_bytes", lambda path=hardware.SHM_PATH: 1 << 40)
    hardware.require_shared_memory(1 << 39, "anything")


def test_cores_come_from_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert hardware.usable_cores() == 3
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    assert hardware.usable_cores() == 12


def test_compiled_ops_are_cached_per_instruction_set(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    dirs = set()
    for flags in ({"avx2"}, {"avx2", "avx512f", "avx512bw"}, {"avx2"}):
        monkeypatch.setattr(hardware, "cpu_flags", lambda f=flags: frozenset(f))
        monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
        path = hardware.pin_extension_cache()
        assert (
            path.startswith(str(tmp_path / "torch_extensions")) and os.environ["TORCH_EXTENSIONS_DIR"] == path
        )
        dirs.add(path)
    assert len(dirs) == 2  # AVX2 and AVX-512 builds never share a folder
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/mine")
    assert hardware.pin_extension_cache() == "/mine"


def test_report_names_the_cpu_flags_and_deepspeed_answers(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_model", lambda: "AMD EPYC 7B13")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "sse2"}))
    info = hardware.report()
    assert info["cpu"] == "AMD EPYC 7B13" and info["flags"] == ["avx2"]
    assert info["deepspeed_accelerator"]["name"] == "cpu" and info["cores"] >= 1
    out = subprocess.run(
        [sys.executable, "-m", "mae_scale.hardware"], cwd=REPO, env=cpu_env(), capture_output=True, text=True
    ).stdout
    assert "[hardware] cpu:" in out and "deepspeed accelerator: {'name': 'cpu'" in out
    assert "train.precision=auto -> fp" in out


@pytest.mark.slow
def test_loader_gives_the_same_batches_under_every_start_method(demo_shards):
    """fork is Linux's default for DataLoader workers; spawn is macOS's and forkserver Python 3.14's
    on Linux: workers must rebuild their state from what is picked, not from what fork copied."""
    from mae_scale.config import DataConfig
    from mae_scale.data.loader import build_loader

    data = DataConfig(shards=str(demo_shards), num_frames=4, stride=2, size=32, repeats=2, workers=1)
    seen = {}
    for method in ("fork", "spawn", "forkserver"):
        loader = build_loader(data, batch_size=2, seed=3, multiprocessing_context=method)
        batches = [b for _, b in zip(range(3), loader, strict=False)]
        seen[method] = ([b["keys"] for b in batches], torch.stack([b["clips"] for b in batches]))
    for method in ("spawn", "forkserver"):
        assert seen[method][0] == seen["fork"][0]
        assert torch.equal(seen[method][1], seen["fork"][1])
