"""The GPU recipe (tools/gpu/), kept from rotting on CPU: the wheel plan and its checks, the mae_st-way
baseline, and the device check's dry run (the same code paths at tiny sizes, the same JSON schema).

The file sorts after test_hardware.py on purpose: nothing here builds DeepSpeed's cpu_adam (the dry
run leaves the offload part out, saying why), but if it ever does, the build is then already cached.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from launch import REPO, cpu_env
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

sys.path.insert(0, str(REPO / "tools" / "gpu"))
import wheels_check as wc  # noqa: E402
from mae_st_way import OfficialWayMAE  # noqa: E402

from mae_scale.model.mae import MaskedAutoencoderViT  # noqa: E402
from mae_scale.model.presets import ARCHS  # noqa: E402

# --- the wheel plan ------------------------------------------------------------------------------


def test_wheel_plan_covers_every_need_the_image_lacks_within_setup_cfg():
    pins = wc.read_pins()
    image = wc.read_image(REPO / "tools" / "gpu" / "device_image.txt.missing")  # our copy of the list
    by_name = {}
    for pin in pins:
        assert pin.name not in by_name, f"{pin.name} pinned twice"
        by_name[pin.name] = pin
    for req in wc.setup_requires():
        name = canonicalize_name(req.name)
        if name in image.names:
            assert name not in by_name or by_name[name].how == "fallback", f"{name}: the image has it"
            continue
        assert name in by_name, f"setup.cfg needs {req}: neither on the device image nor in wheels.txt"
        pin = by_name[name]
        if pin.how != "skip":
            assert req.specifier.contains(pin.version), f"{name}=={pin.version} is outside setup.cfg's {req}"
    for pin in pins:  # nothing pinned may be the image's CUDA stack
        assert not wc.PROTECTED.match(pin.name) or pin.how == "xformers", pin
        assert pin.how in ("wheel", "sdist", "fallback", "xformers", "skip"), pin
        assert pin.how == "skip" or pin.version, pin
    assert by_name["wandb"].how == "skip" and "log.wandb=off" in by_name["wandb"].why


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


IMAGE = wc.Image({"torch", "triton", "numpy", "typing-extensions"}, {"torch": "2.11.0"}, "test")


def _verify(tmp_path, wheels, pins, needs=()):
    for folder, name, version, requires in wheels:
        _fake_wheel(tmp_path / folder, name, version, requires)
    return wc.verify(tmp_path, pins, IMAGE, xformers=False, needs=[Requirement(n) for n in needs])[0]


def pin(name, version, how="wheel"):
    return wc.Pin(name, version, how, "test")


def test_wheels_check_passes_a_set_whose_needs_are_met(tmp_path):
    faults = _verify(
        tmp_path,
        [(".", "alpha", "1.0", ["beta>=2", "torch>=2.4", "numpy", "gamma; extra == 'docs'"]),
         (".", "beta", "2.1", ["typing-extensions>=4.16; python_version >= '3.8'"]),
         ("fallback", "typing-extensions", "4.16.0", [])],
        [pin("alpha", "1.0"), pin("beta", "2.1"), pin("typing-extensions", "4.16.0", "fallback")],
        needs=["alpha>=1", "numpy<3"],
    )  # fmt: skip
    assert faults == []


@pytest.mark.parametrize(
    ("wheels", "pins", "needs", "fault"),
    [
        ([(".", "alpha", "1.0", ["torch>=2.12"])], [pin("alpha", "1.0")], [], "torch 2.11.0 does not"),
        ([(".", "torch", "2.12.0", [])], [pin("torch", "2.12.0")], [], "replace the image's CUDA stack"),
        ([(".", "nvidia-cublas", "13.1", [])], [pin("nvidia-cublas", "13.1")], [], "CUDA stack"),
        ([(".", "numpy", "2.0.0", [])], [pin("numpy", "2.0.0")], [], "carry it only as a fallback"),
        ([(".", "alpha", "1.0", ["beta"])], [pin("alpha", "1.0")], [], "neither carried nor on the device"),
        ([(".", "alpha", "1.0", ["triton>=3"])], [pin("alpha", "1.0")], [], "must never be replaced"),
        ([(".", "alpha", "1.1", [])], [pin("alpha", "1.0")], [], "pinned 1.0"),
        ([(".", "alpha", "1.0", [])], [pin("alpha", "1.0"), pin("beta", "2")], [], "beta==2 (wheel)"),
        ([(".", "alpha", "1.0", [])], [pin("alpha", "1.0")], ["webdataset>=1"], "setup.cfg needs"),
        ([(".", "alpha", "1.0", ["typing-extensions>=4.17"]), ("fallback", "typing-extensions", "4.16", [])],
         [pin("alpha", "1.0"), pin("typing-extensions", "4.16", "fallback")], [], "fallback wheel"),
    ],
    ids=["torch-too-new", "carries-torch", "carries-nvidia", "shadows-image", "missing-dep", "triton-unknown",
         "wrong-version", "pin-missing", "setup-cfg-need", "fallback-too-old"],
)  # fmt: skip
def test_wheels_check_names_each_fault(tmp_path, wheels, pins, needs, fault):
    faults = _verify(tmp_path, wheels, pins, needs)
    assert any(fault in f for f in faults), faults


def test_wheels_check_reads_the_live_device_list_when_given(tmp_path):
    kinds = tmp_path / "KINDS.md"
    kinds.write_text("x\nnvidia-h200: their image, 'cuda', holds these. Packages: torch, Foo_Bar, numpy.\n")
    image = wc.read_image(kinds)
    assert image.names == {"torch", "foo-bar", "numpy"} and image.versions["torch"] == "2.11.0"
    assert "torch" in wc.read_image(tmp_path / "absent.md").names  # else our copy


# --- the baseline --------------------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "pred_t_dim", "ratio"), [(8, 4, 0.75), (4, 2, 0.9), (8, 8, 0.5)])
def test_official_way_baseline_computes_the_same_loss_as_the_model(frames, pred_t_dim, ratio):
    """The speed comparison is fair only if both compute one function: same weights, clip, noise."""
    torch.manual_seed(0)
    kw = dict(ARCHS["tiny"], depth=2, decoder_depth=2, img_size=48, num_frames=frames, pred_t_dim=pred_t_dim)
    ours = MaskedAutoencoderViT(**kw, mask_ratio=ratio).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    official = OfficialWayMAE(**kw, mask_ratio=ratio).double()
    official.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(2, 3, frames, 48, 48, dtype=torch.float64)
    noise = torch.rand(2, ours.num_patches, dtype=torch.float64)
    loss, pred, mask = ours(imgs, noise=noise)
    loss_o, pred_o, mask_o = official(imgs, noise=noise)
    assert torch.equal(mask, mask_o.to(mask.dtype))
    torch.testing.assert_close(pred_o, pred, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(loss_o, loss, atol=1e-10, rtol=1e-10)
    loss_o.backward()
    loss.backward()
    for (name, p), (name_o, p_o) in zip(ours.named_parameters(), official.named_parameters(), strict=True):
        assert name == name_o
        torch.testing.assert_close(p_o.grad, p.grad, atol=1e-10, rtol=1e-8, msg=name)


# --- the dry run ---------------------------------------------------------------------------------


def gpu_only(m: dict) -> bool:
    """What a CPU dry run may leave out: xformers, the #19 hook, sizes the largest search did not
    need, and the offload part (said why)."""
    return (
        "xformers" in m["name"]
        or "decoder_mask_ratio" in m["name"]
        or m["reason"].startswith(("not needed:", "dry run: zero3_offload.json"))
    )


def _numbers_have_units(node, where=""):
    """Every number under a `values` dict is {"value": x, "unit": "..."}."""
    for key, item in node.items():
        assert isinstance(item, dict) and set(item) >= {"value", "unit"}, f"{where}.{key}: {item}"
        assert isinstance(item["value"], (int, float)) and isinstance(item["unit"], str) and item["unit"]


@pytest.mark.slow
def test_dry_run_writes_every_part_with_results_or_a_reason(tmp_path):
    out = tmp_path / "out"
    env = cpu_env(OUT=str(out))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        ["bash", "tools/gpu/check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "gpu_check.json", "profile_vit_l.txt"]
    assert "[check] summary" in (out / "check.log").read_text()
    result = json.loads((out / "gpu_check.json").read_text())
    import check

    assert result["schema"] == check.SCHEMA and result["mode"] == "dry-run"
    assert list(result["parts"]) == list(check.PARTS)  # every part, in order, none silently missing
    for name, part in result["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part["status"], part.get("reason"))
        if part["status"] != "ok":
            assert part["reason"], name
        for m in part["measurements"]:
            assert m["name"] and m["status"] in ("ok", "n/a"), (name, m)
            if m["status"] == "ok":
                assert m["values"], (name, m["name"])
                _numbers_have_units(m["values"], f"{name}/{m['name']}")
                assert m.get("command"), (name, m["name"])
            else:  # on CPU only what needs a GPU, xformers or another branch may be missing
                assert gpu_only(m), (name, m)
    parts = result["parts"]
    # on CPU the GPU tests are collected and every one skips, with the reason
    assert parts["gpu_tests"]["status"] == "skipped" and "needs a CUDA GPU" in parts["gpu_tests"]["reason"]
    assert {t["outcome"] for t in parts["gpu_tests"]["tests"]} == {"skipped"}
    assert any("test_main_job_zero3_one_gpu_loss_falls" in t["name"] for t in parts["gpu_tests"]["tests"])
    for name in ("matmul", "steps", "profile", "baseline", "encoder", "data", "largest"):
        assert parts[name]["status"] == "ok", (name, parts[name].get("reason"))
    names = {m["name"] for m in parts["steps"]["measurements"] if m["status"] == "ok"}
    assert {"vit_l auto ckpt0", "vit_l auto ckpt1", "vit_b auto ckpt0", "vit_b math ckpt0"} <= names
    base = {m["name"]: m for m in parts["baseline"]["measurements"]}
    assert base["vit_l deepspeed vs mae_st_way"]["values"]["speed_ratio"]["value"] > 0
    assert parts["offload"]["status"] == "skipped" and len(parts["offload"]["measurements"]) == 2
    assert parts["largest"]["largest_that_trains"]["preset"] == "vit_2b"
    cores = parts["data"]["cores_per_gpu"]
    _numbers_have_units({k: v for k, v in cores.items() if k != "assumes"}, "cores_per_gpu")
    assert "top 15" in (out / "profile_vit_l.txt").read_text()
    assert result["goals"]["note"].startswith("dry run")
    assert os.path.getsize(out / "gpu_check.json") < 16 * 2**20
