"""Parameter and FLOP counts, computed from the architecture (never typed in).

`spec` everywhere is a preset name (`"vit_l"`), a dict of `MaskedAutoencoderViT` kwargs, or a built
model (its `.config` is used); keyword overrides replace single kwargs. For the trainer:

    train_step_flops(model.config, batch_size=clips_per_step)        # FLOPs of one optimizer step
    train_step_flops("vit_l", batch_size=8, img_size=224, num_frames=16)

FLOPs count matrix multiplies as 2*m*n*k (attention scores and the weighted sum included, norms,
softmax and GELU left out). One forward = patch embedding of every patch + encoder blocks on the
visible tokens (+ class token) + `decoder_embed` on the visible tokens + decoder blocks and
`decoder_pred` on all tokens (+ class token), or with dual masking (`decoder_mask_ratio` > 0) on the
N - int(N * decoder_mask_ratio) tokens the decoder keeps (+ class token). Training = 3 x forward
(backward = 2 x forward).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from mae_scale.model.mae import MaskedAutoencoderViT
from mae_scale.model.masking import DEFAULT_CUBE, num_decoder_dropped, num_visible
from mae_scale.model.presets import arch

Spec = str | dict | nn.Module


def model_kwargs(spec: Spec, **overrides: Any) -> dict:
    """Full constructor kwargs (defaults filled in) for a preset name, a kwargs dict or a model."""
    if isinstance(spec, str):
        kwargs = arch(spec)
    elif isinstance(spec, nn.Module):
        kwargs = dict(spec.config)
    else:
        kwargs = dict(spec)
    kwargs.update(overrides)
    kwargs.pop("device", None)
    params = inspect.signature(MaskedAutoencoderViT.__init__).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"unknown MaskedAutoencoderViT kwargs {unknown}; known: {sorted(set(params) - {'self'})}"
        )
    defaults = {
        n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty and n != "device"
    }
    return {**defaults, **kwargs}


def count_params(spec: Spec, **overrides: Any) -> dict[str, int]:
    """{"encoder", "decoder", "total"} parameter counts; a spec that is not a model is built on meta.

    Encoder = patch embedding, class token, position tables, blocks and final norm (what fine-tuning
    keeps); decoder = everything named `decoder_*` plus the mask token.
    """
    if isinstance(spec, nn.Module) and not overrides:
        model = spec
    else:
        kwargs = {**model_kwargs(spec, **overrides), "attention": "math"}  # the kernel has no weights
        model = MaskedAutoencoderViT(**kwargs, device="meta")
    counts = {"encoder": 0, "decoder": 0}
    for name, p in model.named_parameters():
        part = "decoder" if name.startswith("decoder") or name == "mask_token" else "encoder"
        counts[part] += int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 keeps the full count in ds_numel
    counts["total"] = counts["encoder"] + counts["decoder"]
    return counts


def _block_flops(n: int, dim: int, mlp_ratio: float) -> int:
    """One pre-norm transformer block on n tokens of width dim."""
    hidden = round(dim * mlp_ratio)
    projections = 4 * 2 * n * dim * dim  # q, k, v, proj
    attention = 2 * 2 * n * n * dim  # Q K^T and weights @ V, all heads together
    mlp = 2 * 2 * n * dim * hidden  # fc1 and fc2
    return projections + attention + mlp


def forward_flops(
    spec: Spec, *, mask_ratio: float | None = None, decoder_mask_ratio: float | None = None, **overrides: Any
) -> dict[str, int]:
    """FLOPs of one forward pass on ONE clip, by part: patch_embed, encoder, decoder, total.

    `mask_ratio` and `decoder_mask_ratio` override the spec's, as they do in the model's forward.
    """
    k = model_kwargs(spec, **overrides)
    ratio = k["mask_ratio"] if mask_ratio is None else mask_ratio
    dec_ratio = k["decoder_mask_ratio"] if decoder_mask_ratio is None else decoder_mask_ratio
    p, tp, D, Dd = k["patch_size"], k["t_patch_size"], k["embed_dim"], k["decoder_embed_dim"]
    grid = (k["num_frames"] // tp, k["img_size"] // p, k["img_size"] // p)
    n_all = grid[0] * grid[1] * grid[2]
    n_vis = num_visible(k["mask_type"], grid, ratio, tuple(k.get("mask_cube", DEFAULT_CUBE)))
    n_dec = n_all - num_decoder_dropped(k["decoder_mask_type"], grid, dec_ratio, n_vis)  # decoder's tokens
    cls = 1 if k["cls_embed"] else 0
    pred_dim = tp * k["pred_t_dim"] // k["num_frames"] * p * p * k["in_chans"]

    patch_embed = 2 * n_all * (k["in_chans"] * tp * p * p) * D
    encoder = k["depth"] * _block_flops(n_vis + cls, D, k["mlp_ratio"])
    decoder = (
        2 * n_vis * D * Dd  # decoder_embed
        + k["decoder_depth"] * _block_flops(n_dec + cls, Dd, k["mlp_ratio"])
        + 2 * (n_dec + cls) * Dd * pred_dim  # decoder_pred
    )
    return {
        "patch_embed": patch_embed,
        "encoder": encoder,
        "decoder": decoder,
        "total": patch_embed + encoder + decoder,
    }


def train_step_flops(
    spec: Spec,
    batch_size: int = 1,
    *,
    mask_ratio: float | None = None,
    decoder_mask_ratio: float | None = None,
    **overrides: Any,
) -> int:
    """FLOPs of forward + backward on `batch_size` clips (3 x forward): divide by step time for FLOP/s."""
    fwd = forward_flops(spec, mask_ratio=mask_ratio, decoder_mask_ratio=decoder_mask_ratio, **overrides)
    return 3 * batch_size * fwd["total"]
