"""Agreement with facebookresearch/mae_st: parameter names and shapes, the loss, weight conversion.

`reference_loss` below is an independent, deliberately plain re-statement of mae_st's
`MaskedAutoencoderViT(sep_pos_embed=True, cls_embed=True, norm_pix_loss=True)` forward (read from
its models_mae.py / util/video_vit.py): explicit loops over patches, heads and samples, position
tables added *after* masking as mae_st does, working on a state dict with the official names. The
model must give the same loss (in float64, to 1e-10) for the same weights, clip and noise.
With `decoder_keep` it also restates dual masking (VideoMAE V2): the decoder runs on the listed
tokens only (the visible ones and the kept masked ones, with their position embeddings) and the
loss counts the masked ones among them.
"""

from __future__ import annotations

import math

import pytest
import torch

from mae_scale.model.convert import (
    StateDictMismatchError,
    from_mae_st,
    load_state_dict_strict,
    to_mae_st,
)
from mae_scale.model.mae import MaskedAutoencoderViT
from mae_scale.model.presets import ARCHS

ARCH = {**ARCHS["tiny"], "depth": 2, "decoder_depth": 2}


def official_shapes(D, depth, Dd, dec_depth, mlp, p, tp, t, hw, pred_out, C=3) -> dict[str, tuple]:
    """Names and shapes of mae_st's model (sep_pos_embed=True, cls_embed=True, qkv bias on)."""
    shapes = {
        "cls_token": (1, 1, D),
        "decoder_cls_token": (1, 1, Dd),
        "pos_embed_spatial": (1, hw, D),
        "pos_embed_temporal": (1, t, D),
        "pos_embed_class": (1, 1, D),
        "patch_embed.proj.weight": (D, C, tp, p, p),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
        "decoder_embed.weight": (Dd, D),
        "decoder_embed.bias": (Dd,),
        "mask_token": (1, 1, Dd),
        "decoder_pos_embed_spatial": (1, hw, Dd),
        "decoder_pos_embed_temporal": (1, t, Dd),
        "decoder_pos_embed_class": (1, 1, Dd),
        "decoder_norm.weight": (Dd,),
        "decoder_norm.bias": (Dd,),
        "decoder_pred.weight": (pred_out, Dd),
        "decoder_pred.bias": (pred_out,),
    }
    for prefix, n, width in [("blocks", depth, D), ("decoder_blocks", dec_depth, Dd)]:
        for i in range(n):
            b = f"{prefix}.{i}."
            for norm in ("norm1", "norm2"):
                shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (width,)
            for lin in ("attn.q", "attn.k", "attn.v", "attn.proj"):
                shapes[b + lin + ".weight"], shapes[b + lin + ".bias"] = (width, width), (width,)
            shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (mlp * width, width), (mlp * width,)
            shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (width, mlp * width), (width,)
    return shapes


@pytest.mark.parametrize(("size", "frames", "pred_t_dim"), [(32, 8, 4), (32, 8, 8), (48, 4, 2)])
def test_state_dict_names_and_shapes_equal_mae_st(size, frames, pred_t_dim):
    model = MaskedAutoencoderViT(**ARCH, img_size=size, num_frames=frames, pred_t_dim=pred_t_dim)
    t, hw, u = frames // 2, (size // 16) ** 2, 2 * pred_t_dim // frames
    expected = official_shapes(64, 2, 64, 2, 4, 16, 2, t, hw, pred_out=u * 16 * 16 * 3)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_paper_size_shapes():
    """ViT-L 16x224 with mae_st's defaults: 8 time positions, 196 space positions, 768 outputs."""
    model = MaskedAutoencoderViT(**ARCHS["vit_l"], device="meta")
    sd = model.state_dict()
    assert sd["patch_embed.proj.weight"].shape == (1024, 3, 2, 16, 16)
    assert sd["pos_embed_temporal"].shape == (1, 8, 1024)
    assert sd["pos_embed_spatial"].shape == (1, 196, 1024)
    assert sd["decoder_pred.weight"].shape == (2 * 8 // 16 * 16 * 16 * 3, 512)
    assert len([k for k in sd if k.startswith("decoder_blocks.") and k.endswith("attn.q.weight")]) == 4


# --- an independent plain reference of mae_st's loss ---------------------------------------------


def _layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _block(x, sd, name, heads):
    """x: (L, D) for ONE sample; pre-norm attention then MLP with exact GELU."""
    h = _layer_norm(x, sd[name + ".norm1.weight"], sd[name + ".norm1.bias"])
    q, k, v = (_linear(h, sd, f"{name}.attn.{n}") for n in "qkv")
    d = x.shape[1] // heads
    outs = []
    for i in range(heads):
        sl = slice(i * d, (i + 1) * d)
        scores = q[:, sl] @ k[:, sl].T / math.sqrt(d)
        weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
        outs.append((weights / weights.sum(dim=-1, keepdim=True)) @ v[:, sl])
    x = x + _linear(torch.cat(outs, dim=1), sd, f"{name}.attn.proj")
    h = _layer_norm(x, sd[name + ".norm2.weight"], sd[name + ".norm2.bias"])
    h = _linear(h, sd, f"{name}.mlp.fc1")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + _linear(h, sd, f"{name}.mlp.fc2")


def reference_loss(
    sd, imgs, noise, *, mask_ratio, p, tp, pred_t_dim, heads, dec_heads, depth, dec_depth, decoder_keep=None
):
    B, C, T, H, W = imgs.shape
    t, h, w = T // tp, H // p, W // p
    N = t * h * w
    u = tp * pred_t_dim // T
    len_keep = int(N * (1 - mask_ratio))
    losses = []
    total_masked = 0.0
    for b in range(B):
        # patch embedding: one dot product per (t, h, w) patch, tokens in (t, h, w) order
        tokens = []
        for ti in range(t):
            for hi in range(h):
                for wi in range(w):
                    patch = imgs[b, :, ti * tp : (ti + 1) * tp, hi * p : (hi + 1) * p, wi * p : (wi + 1) * p]
                    kernel = sd["patch_embed.proj.weight"]  # (D, C, tp, p, p)
                    tokens.append((kernel * patch).flatten(1).sum(dim=1) + sd["patch_embed.proj.bias"])
        x = torch.stack(tokens)  # (N, D)
        # mae_st's random_masking: argsort the noise, keep the smallest len_keep
        order = torch.argsort(noise[b])
        keep = order[:len_keep]
        masked = torch.ones(N, dtype=imgs.dtype)
        masked[keep] = 0
        # separable positions, added after masking: spatial repeated over time + temporal per slice
        pos = torch.stack(
            [
                sd["pos_embed_spatial"][0, i % (h * w)] + sd["pos_embed_temporal"][0, i // (h * w)]
                for i in range(N)
            ]
        )
        x = x[keep] + pos[keep]
        x = torch.cat([sd["cls_token"][0] + sd["pos_embed_class"][0], x])
        for i in range(depth):
            x = _block(x, sd, f"blocks.{i}", heads)
        x = _layer_norm(x, sd["norm.weight"], sd["norm.bias"])[1:]
        # decoder: visible latents back at their positions, mask tokens elsewhere
        y = _linear(x, sd, "decoder_embed")
        full = sd["mask_token"][0].repeat(N, 1)
        full[keep] = y
        dpos = torch.stack(
            [
                sd["decoder_pos_embed_spatial"][0, i % (h * w)]
                + sd["decoder_pos_embed_temporal"][0, i // (h * w)]
                for i in range(N)
            ]
        )
        decoded = list(range(N)) if decoder_keep is None else list(decoder_keep[b])
        y = torch.cat([sd["decoder_cls_token"][0] + sd["decoder_pos_embed_class"][0], (full + dpos)[decoded]])
        for i in range(dec_depth):
            y = _block(y, sd, f"decoder_blocks.{i}", dec_heads)
        y = _layer_norm(y, sd["decoder_norm.weight"], sd["decoder_norm.bias"])
        pred = dict(zip(decoded, _linear(y, sd, "decoder_pred")[1:], strict=True))  # token -> (u*p*p*C,)
        # target: pred_t_dim frames by linspace, each token's u frames flattened as (u, p, q, c)
        frames = torch.linspace(0, T - 1, pred_t_dim).long()
        sub = imgs[b][:, frames]  # (C, pred_t_dim, H, W)
        for i in range(N):
            ti, hi, wi = i // (h * w), (i // w) % h, i % w
            if not masked[i] or i not in pred:  # visible, or dropped by the decoder
                continue
            patch = sub[:, ti * u : (ti + 1) * u, hi * p : (hi + 1) * p, wi * p : (wi + 1) * p]
            target = patch.permute(1, 2, 3, 0).flatten()  # (u, p, q, c)
            target = (target - target.mean()) / torch.sqrt(target.var() + 1e-6)  # unbiased var, as torch.var
            losses.append(((pred[i] - target) ** 2).mean())
        total_masked += float(sum(masked[i] for i in decoded))
    return torch.stack(losses).sum() / total_masked


@pytest.mark.parametrize(("frames", "pred_t_dim", "ratio"), [(8, 4, 0.75), (8, 8, 0.5), (4, 2, 0.9)])
def test_loss_equals_plain_mae_st_reference(frames, pred_t_dim, ratio):
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**ARCH, img_size=48, num_frames=frames, pred_t_dim=pred_t_dim).double()
    with torch.no_grad():  # non-trivial norms and biases, so every parameter matters
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    imgs = torch.randn(2, 3, frames, 48, 48, dtype=torch.float64)
    noise = torch.rand(2, model.num_patches, dtype=torch.float64)
    loss, _, mask = model(imgs, mask_ratio=ratio, noise=noise)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ref = reference_loss(
        sd, imgs, noise, mask_ratio=ratio, p=16, tp=2, pred_t_dim=pred_t_dim,
        heads=4, dec_heads=4, depth=2, dec_depth=2,
    )  # fmt: skip
    assert (mask == 0).sum(dim=1).tolist() == [int(model.num_patches * (1 - ratio))] * 2
    torch.testing.assert_close(loss.detach(), ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(("dec_type", "dec_ratio"), [("running_cell", 0.5), ("random", 0.25)])
def test_dual_masking_loss_equals_plain_reference(dec_type, dec_ratio):
    """Dual masking: the model's loss equals the plain reference told the same decoder tokens."""
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(
        **ARCH,
        img_size=48,
        num_frames=8,
        pred_t_dim=4,
        decoder_mask_ratio=dec_ratio,
        decoder_mask_type=dec_type,
    ).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    imgs = torch.randn(2, 3, 8, 48, 48, dtype=torch.float64)
    noise = torch.rand(2, model.num_patches, dtype=torch.float64)
    decoder_noise = torch.rand(2, model.decoder_mask_units(), dtype=torch.float64)
    loss, _, mask = model(imgs, mask_ratio=0.75, noise=noise, decoder_noise=decoder_noise)
    n_visible = int(model.num_patches * 0.25)  # 9 of 36 (grid 4x3x3)
    keep = model.decoder_masking(mask, n_visible, dec_ratio, decoder_noise).ids_decode.tolist()
    assert len(keep[0]) == model.num_patches - int(model.num_patches * dec_ratio)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    ref = reference_loss(
        sd, imgs, noise, mask_ratio=0.75, p=16, tp=2, pred_t_dim=4,
        heads=4, dec_heads=4, depth=2, dec_depth=2, decoder_keep=keep,
    )  # fmt: skip
    torch.testing.assert_close(loss.detach(), ref, atol=1e-10, rtol=1e-10)


# --- conversion ----------------------------------------------------------------------------------


def test_converter_round_trip_with_strict_load():
    torch.manual_seed(0)
    src = MaskedAutoencoderViT(**ARCH, img_size=32, num_frames=8, pred_t_dim=4)
    official = {
        "model": {"module." + k: v.clone() for k, v in to_mae_st(src.state_dict()).items()},
        "epoch": 3,
    }
    torch.manual_seed(1)
    dst = MaskedAutoencoderViT(**ARCH, img_size=32, num_frames=8, pred_t_dim=4)
    imgs, noise = torch.randn(2, 3, 8, 32, 32), torch.rand(2, 16)
    assert not torch.equal(dst(imgs, noise=noise)[0], src(imgs, noise=noise)[0])
    load_state_dict_strict(dst, from_mae_st(official))
    assert torch.equal(dst(imgs, noise=noise)[0], src(imgs, noise=noise)[0])
    compiled_prefix = {"_orig_mod." + k: v for k, v in dst.state_dict().items()}
    assert from_mae_st(compiled_prefix).keys() == src.state_dict().keys()


def test_mismatch_gives_a_readable_diff():
    """mae_st #14: a t_patch_size 4 checkpoint into a t_patch_size 2 model."""
    old = MaskedAutoencoderViT(
        **ARCH, img_size=32, num_frames=8, pred_t_dim=4, t_patch_size=4, mask_ratio=0.5
    )
    ckpt = old.state_dict()
    ckpt["head.weight"] = torch.zeros(3, 64)
    del ckpt["decoder_norm.bias"]
    model = MaskedAutoencoderViT(**ARCH, img_size=32, num_frames=8, pred_t_dim=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_strict(model, ckpt)
    msg = str(err.value)
    assert "missing key: decoder_norm.bias (expected shape [64])" in msg
    assert "unexpected key: head.weight (shape [3, 64])" in msg
    assert (
        "shape mismatch: patch_embed.proj.weight: expected [64, 3, 2, 16, 16], got [64, 3, 4, 16, 16]" in msg
    )
    assert "check t_patch_size" in msg
    assert "shape mismatch: pos_embed_temporal: expected [1, 4, 64], got [1, 2, 64]" in msg
    assert "shape mismatch: decoder_pred.weight: expected [768, 64], got [1536, 64]" in msg
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_joint_position_table_checkpoint_is_refused():
    with pytest.raises(StateDictMismatchError, match="sep_pos_embed=False"):
        from_mae_st({"model": {"pos_embed": torch.zeros(1, 17, 64), "cls_token": torch.zeros(1, 1, 64)}})
