"""On a CUDA GPU only (marked `gpu`; skipped elsewhere, with the reason): tools/gpu/check.sh runs these.

- each attention kernel (SDPA, xformers when it imports) against math attention in float64 on the
  same bf16 inputs, outputs and gradients, at the head sizes of every preset: relative Frobenius
  error <= 1e-2 for outputs and <= 2e-2 for gradients (bf16 operands land between 1e-3 and 1e-2);
- the whole model in bf16 autocast: SDPA (and xformers) against math attention, loss and gradients;
- the main job: 30 steps of ZeRO-3 on the demo shards on one GPU; the loss falls and the start
  record says the kernel `auto` picked (xformers if usable, else sdpa) and precision bf16.
"""

from __future__ import annotations

import os

import pytest
import torch
from launch import metrics, pretrain, step_losses

from mae_scale.model.attention import attention, math_attention, resolve_backend, xformers_available
from mae_scale.model.mae import MaskedAutoencoderViT
from mae_scale.model.presets import ARCHS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu/check.sh runs it)"),
]

# (tokens, heads, head_dim): vit_l's encoder at mask 0.9 (156 visible + class token), the decoder on
# every token (1568 + 1, width 512 / 16 heads), and the head sizes of vit_h, vit_g and vit_2b.
SHAPES = [(157, 16, 64), (1569, 16, 32), (157, 16, 80), (157, 16, 88), (157, 16, 128)]
OUT_TOL, GRAD_TOL = 1e-2, 2e-2
KERNELS = ["sdpa", "xformers"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def need(kernel: str) -> None:
    if kernel == "xformers" and not xformers_available():
        pytest.skip("xformers is not importable here (tools/gpu/wheels.sh --xformers carries PyPI's build)")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("n", "heads", "d"), SHAPES)
def test_attention_kernel_matches_float64_math_in_bf16(kernel, n, heads, d):
    need(kernel)
    assert resolve_backend(kernel, "cuda") == kernel
    g = torch.Generator(device="cuda").manual_seed(n * 1000 + d)
    q, k, v = (torch.randn(2, n, heads, d, device="cuda", generator=g).bfloat16() for _ in range(3))
    dout = torch.randn(2, n, heads, d, device="cuda", generator=g).bfloat16()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, backend=kernel)
    out.backward(dout)
    refs = [t.double().requires_grad_() for t in (q, k, v)]  # the same bf16 values, in float64
    ref = math_attention(*refs)
    ref.backward(dout.double())
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= OUT_TOL, (kernel, n, d, rel(out, ref))
    for name, got, want in zip("qkv", leaves, refs, strict=True):
        assert torch.isfinite(got.grad).all()
        assert rel(got.grad, want.grad) <= GRAD_TOL, (kernel, name, n, d, rel(got.grad, want.grad))


@pytest.mark.parametrize("kernel", KERNELS)
def test_model_in_bf16_autocast_agrees_with_math_attention(kernel):
    need(kernel)
    torch.manual_seed(0)
    kw = dict(ARCHS["tiny"], img_size=64, num_frames=8, pred_t_dim=4, attention="math")
    model = MaskedAutoencoderViT(**kw, device="cuda")
    imgs = torch.randn(2, 3, 8, 64, 64, device="cuda")
    noise = torch.rand(2, model.num_patches, device="cuda")
    runs = {}
    for backend in ("math", kernel):
        model.set_attention(backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = model(imgs, noise=noise)
        loss.backward()
        runs[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (loss_m, grads_m), (loss_k, grads_k) = runs["math"], runs[kernel]
    assert torch.isfinite(loss_k) and abs(loss_k.item() - loss_m.item()) <= 1e-2 * abs(loss_m.item())
    every = [torch.cat([g.flatten() for g in grads.values()]) for grads in (grads_k, grads_m)]
    assert rel(*every) <= 2e-2, rel(*every)
    for name, grad in grads_k.items():
        if name.endswith("attn.k.bias"):  # exactly 0 in exact arithmetic (softmax ignores a shift of
            continue  # every score of a query): both sides are rounding noise, ~1e-6 of the rest
        assert rel(grad, grads_m[name]) <= 5e-2, (name, rel(grad, grads_m[name]))


def test_main_job_zero3_one_gpu_loss_falls(tmp_path, demo_shards):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(WANDB_MODE="offline", MAE_SCALE_NO_BAR="1", PYTHONUNBUFFERED="1")
    args = ["--config", "demo", "train.steps=30", "log.every_steps=1", "checkpoint.every_steps=0"]
    args += ["schedule.warmup_steps=3", "log.wandb=off", "data.workers=1", f"run.dir={run}"]
    pretrain(args, env=env, timeout=240)
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 31))
    values = [losses[s] for s in sorted(losses)]
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5, values
    start = next(m for m in metrics(run) if m.get("event") == "start")
    assert start["attention"] == ("xformers" if xformers_available() else "sdpa")
    assert start["precision"] == "bf16"
    assert start["zero_stage"] == 3 and start["world_size"] == 1
    assert start["hardware"]["cuda"] is True
