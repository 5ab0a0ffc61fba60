"""MAE-ST model: masking, dual masking, loss semantics, patches, attention kernels, checkpointing,
init, sizes."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mae_scale.model import attention as attn_mod
from mae_scale.model.blocks import Attention, Block
from mae_scale.model.checkpointing import apply_activation_checkpointing, is_checkpointed
from mae_scale.model.flops import count_params, forward_flops, train_step_flops
from mae_scale.model.mae import MaskedAutoencoderViT, init_module_
from mae_scale.model.masking import (
    cube_shape,
    make_decoder_mask,
    make_mask,
    num_units,
    num_visible,
    running_cell_drops,
)
from mae_scale.model.patches import patchify, target_frame_indices, unpatchify
from mae_scale.model.presets import ARCHS

# 64 px, 8 frames, patch 2x16x16: token grid (t, h, w) = (4, 4, 4), N = 64; pred_t_dim 4 -> u = 1.
TINY64 = dict(**ARCHS["tiny"], img_size=64, num_frames=8, pred_t_dim=4)


def tiny(**overrides) -> MaskedAutoencoderViT:
    torch.manual_seed(0)
    return MaskedAutoencoderViT(**{**TINY64, **overrides})


def clips(batch: int = 2, frames: int = 8, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def fixed_noise(model: MaskedAutoencoderViT, batch: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    """Noise that fixes both the encoder's mask and the decoder's (ignored when dual masking is off)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "noise": torch.rand(batch, model.mask_units(), generator=g),
        "decoder_noise": torch.rand(batch, model.decoder_mask_units(), generator=g),
    }


DUAL = [{}, {"decoder_mask_ratio": 0.5}]  # the MAE-ST model, and dual masking (running cell) on
DUAL_IDS = ["mae_st", "dual"]


# --- masking -------------------------------------------------------------------------------------

# Visible tokens per sample on the (4, 4, 4) grid, written out from each type's documented rule.
EXPECTED_VISIBLE = {
    ("random", 0.9): 6,  # int(64 * 0.1) = int(6.4)
    ("random", 0.75): 16,  # int(64 * 0.25)
    ("tube", 0.75): 16,  # int(16 spatial * 0.25) = 4 positions x 4 time slices
    ("tube", 0.9): 4,  # int(1.6) = 1 position x 4 slices
    ("frame", 0.75): 16,  # int(4 slices * 0.25) = 1 slice x 16 positions
    ("cube", 0.75): 16,  # 2x2x2 cubes: 8 cubes, int(2.0) = 2 cubes x 8 tokens
    ("cube", 0.5): 32,
}


@pytest.mark.parametrize(("mask_type", "ratio"), list(EXPECTED_VISIBLE))
def test_forward_shapes_and_visible_count(mask_type, ratio):
    model = tiny(mask_type=mask_type, mask_ratio=ratio)
    loss, pred, mask = model(clips(batch=3))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 64, 1 * 16 * 16 * 3)
    assert mask.shape == (3, 64)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    visible = (mask == 0).sum(dim=1)
    assert visible.tolist() == [EXPECTED_VISIBLE[(mask_type, ratio)]] * 3
    latent, _, _ = model.forward_encoder(clips(batch=3), ratio)
    assert latent.shape == (3, EXPECTED_VISIBLE[(mask_type, ratio)], model.config["embed_dim"])


def test_visible_counts_at_paper_size():
    grid = (8, 14, 14)  # 16x224 clip, 2x16x16 patches
    assert num_visible("random", grid, 0.9) == 156  # of 1568, integer truncation as mae_st
    assert num_visible("tube", grid, 0.9) == 19 * 8
    assert num_visible("cube", grid, 0.9) == 19 * 8  # 196 cubes of 2x2x2
    assert num_visible("frame", grid, 0.875) == 14 * 14
    with pytest.raises(ValueError, match="keeps 0 of 8 units"):
        num_visible("frame", grid, 0.9)
    with pytest.raises(ValueError, match="keeps 0 of 8 units"):
        MaskedAutoencoderViT(
            **{**TINY64, "num_frames": 16, "pred_t_dim": 8}, mask_type="frame", mask_ratio=0.9
        )


@pytest.mark.parametrize("mask_type", ["random", "tube", "frame", "cube"])
def test_masks_differ_between_samples(mask_type):
    torch.manual_seed(0)
    mask = make_mask(mask_type, (4, 4, 4), 0.5, batch=8).mask
    assert len({tuple(m.tolist()) for m in mask}) > 1
    assert (mask.sum(dim=1) == 32).all()


def test_tube_masks_identical_across_time():
    mask = make_mask("tube", (4, 4, 4), 0.75, batch=6).mask.view(6, 4, 16)  # (B, t, h*w)
    assert (mask == mask[:, :1]).all()
    assert (mask[:, 0].sum(dim=1) == 12).all()


def test_frame_masks_whole_slices():
    mask = make_mask("frame", (4, 4, 4), 0.5, batch=6).mask.view(6, 4, 16)  # (B, t, h*w)
    assert (mask == mask[:, :, :1]).all()  # each time slice all masked or all visible
    assert (mask[:, :, 0].sum(dim=1) == 2).all()


def test_cube_masks_whole_blocks():
    mask = make_mask("cube", (4, 4, 4), 0.5, batch=6).mask.view(
        6, 2, 2, 2, 2, 2, 2
    )  # (B, t, ct, h, ch, w, cw)
    blocks = mask.permute(0, 1, 3, 5, 2, 4, 6).reshape(6, 8, 8)  # (B, cube, token in cube)
    assert (blocks == blocks[:, :, :1]).all()
    assert (blocks[:, :, 0].sum(dim=1) == 4).all()


def test_cube_side_shrinks_on_odd_grids():
    assert cube_shape((8, 14, 14)) == (2, 2, 2)
    assert cube_shape((8, 7, 7)) == (2, 1, 1)  # 112 px / patch 16
    assert num_units("cube", (8, 7, 7)) == 4 * 7 * 7
    model = MaskedAutoencoderViT(**{**TINY64, "img_size": 112}, mask_type="cube", mask_ratio=0.75)
    _, _, mask = model(clips(batch=1, size=112))  # grid (4, 7, 7): 98 cubes of 2x1x1 tokens
    assert (mask == 0).sum() == int(98 * 0.25) * 2


def test_noise_fixes_the_mask_like_mae_st():
    noise = torch.rand(2, 64)
    a = make_mask("random", (4, 4, 4), 0.75, batch=2, noise=noise)
    b = make_mask("random", (4, 4, 4), 0.75, batch=2, noise=noise.clone())
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    # mae_st: argsort the noise, keep the smallest 16
    keep = noise.argsort(dim=1)[:, :16]
    expected = torch.ones(2, 64).scatter_(1, keep, 0.0)
    assert torch.equal(a.mask, expected)
    assert torch.equal(a.ids_keep, keep)
    with pytest.raises(ValueError, match=r"noise for mask_type 'tube' must have shape \(B, U\) = \(2, 16\)"):
        make_mask("tube", (4, 4, 4), 0.75, batch=2, noise=noise)


# --- loss semantics ------------------------------------------------------------------------------


def _patch_pixels(mask_row: torch.Tensor, want_masked: bool, p: int = 16, grid=(4, 4, 4), u: int = 2):
    """Pixel slices (t0, t1, h0, h1, w0, w1) of the tokens that are masked (or visible)."""
    out = []
    t, h, w = grid
    for idx in range(t * h * w):
        if bool(mask_row[idx]) == want_masked:
            ti, hi, wi = idx // (h * w), (idx // w) % h, idx % w
            out.append((ti * u, (ti + 1) * u, hi * p, (hi + 1) * p, wi * p, (wi + 1) * p))
    return out


def _perturb(imgs, slices, frames=None):
    imgs = imgs.clone()
    for t0, t1, h0, h1, w0, w1 in slices:
        for f in range(t0, t1):
            if frames is None or f in frames:
                imgs[0, :, f, h0:h1, w0:w1] += torch.randn(3, h1 - h0, w1 - w0)
    return imgs


def test_loss_counts_only_masked_targets():
    """The target path alone: with pred and mask fixed, visible pixels cannot move the loss."""
    model = tiny(mask_ratio=0.5)
    imgs = clips()
    pred = torch.randn(2, 64, 768)
    mask = make_mask("random", (4, 4, 4), 0.5, batch=2).mask
    base = model.forward_loss(imgs, pred, mask)
    visible_changed = _perturb(imgs, _patch_pixels(mask[0], want_masked=False))
    masked_changed = _perturb(imgs, _patch_pixels(mask[0], want_masked=True))
    assert torch.equal(model.forward_loss(visible_changed, pred, mask), base)
    assert not torch.allclose(model.forward_loss(masked_changed, pred, mask), base)


def test_encoder_never_sees_masked_patches():
    """Whole model, fixed noise: masked pixels change the loss (targets) but never the prediction."""
    model = tiny(mask_ratio=0.5)
    imgs, noise = clips(), torch.rand(2, 64)
    loss, pred, mask = model(imgs, noise=noise)
    loss_m, pred_m, mask_m = model(_perturb(imgs, _patch_pixels(mask[0], want_masked=True)), noise=noise)
    assert torch.equal(mask_m, mask)
    assert torch.equal(pred_m, pred)  # no leak from hidden patches into the encoder
    assert not torch.allclose(loss_m, loss)
    # a visible patch is encoder input: the prediction must move
    _, pred_v, _ = model(_perturb(imgs, _patch_pixels(mask[0], want_masked=False)[:1]), noise=noise)
    assert not torch.allclose(pred_v, pred)


def test_target_uses_only_linspace_frames():
    model = tiny(mask_ratio=0.5)  # 8 frames, pred_t_dim 4: targets are frames 0, 2, 4, 7
    assert target_frame_indices(8, 4).tolist() == [0, 2, 4, 7]
    assert target_frame_indices(16, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 15]
    imgs, noise = clips(), torch.rand(2, 64)
    loss, pred, mask = model(imgs, noise=noise)
    unused = _perturb(imgs, _patch_pixels(mask[0], want_masked=True), frames={1, 3, 5, 6})
    loss_u, pred_u, _ = model(unused, noise=noise)
    assert torch.equal(pred_u, pred) and torch.equal(loss_u, loss)


# --- dual masking (VideoMAE V2): the decoder drops some masked tokens ----------------------------


@pytest.mark.parametrize("cls_embed", [True, False])
def test_decoder_mask_ratio_zero_is_the_mae_st_model(cls_embed):
    """0, the default, is the model of before dual masking: its three-call forward (encoder, decoder
    on every token, loss on every masked token), bit for bit in loss, outputs and every gradient, and
    it draws no random numbers but the encoder's noise. (test_model_reference pins that forward to
    mae_st's.) A dual-masking model told `decoder_mask_ratio=0` gives the same numbers again."""
    model = tiny(mask_ratio=0.75, cls_embed=cls_embed)
    assert (model.decoder_mask_ratio, model.decoder_mask_type) == (0.0, "running_cell")
    imgs = clips()

    def run(m, **kwargs):
        m.zero_grad()
        torch.manual_seed(7)
        loss, pred, mask = m(imgs, **kwargs)
        loss.backward()
        after = torch.rand(4)  # where the RNG stream stands after the forward
        return loss, pred, mask, after, {n: p.grad.clone() for n, p in m.named_parameters()}

    def three_calls(m):
        m.zero_grad()
        torch.manual_seed(7)
        latent, mask, ids_restore = m.forward_encoder(imgs, 0.75)
        pred = m.forward_decoder(latent, ids_restore)
        loss = m.forward_loss(imgs, pred, mask)
        loss.backward()
        after = torch.rand(4)
        return loss, pred, mask, after, {n: p.grad.clone() for n, p in m.named_parameters()}

    torch.manual_seed(7)
    torch.rand(2, model.mask_units())  # the encoder's noise, the only draw
    expected_after = torch.rand(4)
    reference = three_calls(model)
    dual = tiny(mask_ratio=0.75, cls_embed=cls_embed, decoder_mask_ratio=0.5)
    for got in (run(model), run(dual, decoder_mask_ratio=0.0)):
        for a, b in zip(got[:4], reference[:4], strict=True):
            assert torch.equal(a, b)
        assert torch.equal(got[3], expected_after)
        assert got[4].keys() == reference[4].keys()
        assert all(torch.equal(got[4][n], reference[4][n]) for n in got[4])
    assert not torch.equal(run(dual)[0], reference[0])  # on, it is another loss


# Per sample on the (4, 4, 4) grid, N = 64: visible, dropped by the decoder (int(64 * ratio)), kept masked.
EXPECTED_DUAL = {
    ("random", 0.75, "running_cell", 0.5): (16, 32, 16),
    ("tube", 0.75, "random", 0.5): (16, 32, 16),
    ("frame", 0.5, "running_cell", 0.25): (32, 16, 16),
    ("cube", 0.5, "random", 0.25): (32, 16, 16),
    ("random", 0.9, "running_cell", 0.75): (6, 48, 10),
}


@pytest.mark.parametrize(("mask_type", "ratio", "dec_type", "dec_ratio"), list(EXPECTED_DUAL))
def test_dual_masking_shapes_and_counts(mask_type, ratio, dec_type, dec_ratio):
    visible, dropped, kept = EXPECTED_DUAL[(mask_type, ratio, dec_type, dec_ratio)]
    dual = dict(decoder_mask_type=dec_type, decoder_mask_ratio=dec_ratio)
    model = tiny(mask_type=mask_type, mask_ratio=ratio, **dual)
    noise = fixed_noise(model, batch=3)
    loss, pred, mask = model(clips(batch=3), **noise)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, 64, 768) and mask.shape == (3, 64)
    assert (mask == 0).sum(dim=1).tolist() == [visible] * 3  # `mask` stays the encoder's
    dec = model.decoder_masking(mask, visible, dec_ratio, noise["decoder_noise"])
    assert dec.ids_decode.shape == (3, visible + kept)
    assert dec.loss_mask.sum(dim=1).tolist() == [kept] * 3
    decoded = (pred != 0).any(dim=-1)  # (B, N): the rows the decoder predicted, the others are zero
    assert decoded.sum(dim=1).tolist() == [visible + kept] * 3
    assert torch.equal(decoded, torch.zeros_like(decoded).scatter(1, dec.ids_decode, True))
    assert (decoded | mask.bool()).all()  # every visible token is decoded
    assert 64 - decoded.sum(dim=1).tolist()[0] == dropped


@pytest.mark.parametrize("dec_type", ["running_cell", "random"])
def test_dual_masking_loss_counts_only_kept_masked_targets(dec_type):
    """Fixed masks: a dropped patch's pixels move nothing; a kept masked patch's move the loss only."""
    model = tiny(mask_ratio=0.5, decoder_mask_ratio=0.25, decoder_mask_type=dec_type)
    imgs, noise = clips(), fixed_noise(model)
    loss, pred, mask = model(imgs, **noise)
    dec = model.decoder_masking(mask, 32, 0.25, noise["decoder_noise"])
    kept = dec.loss_mask.bool()
    dropped = mask.bool() & ~kept
    assert kept[0].any() and dropped[0].any()
    loss_d, pred_d, _ = model(_perturb(imgs, _patch_pixels(dropped[0], want_masked=True)), **noise)
    assert torch.equal(loss_d, loss) and torch.equal(pred_d, pred)
    loss_k, pred_k, _ = model(_perturb(imgs, _patch_pixels(kept[0], want_masked=True)), **noise)
    assert torch.equal(pred_k, pred)  # masked: never the encoder's input
    assert not torch.allclose(loss_k, loss)


def test_running_cell_pattern_moves_one_place_per_time_slice():
    """VideoMAE V2's pattern on one 2x2 cell per slice (places in raster order: 0 1 / 2 3), written
    out: the dropped places turn by one place per time slice; phase 1 is phase 0 one slice later."""
    drops = running_cell_drops((4, 2, 2), 0.5, torch.tensor([0, 1])).view(2, 4, 4).int()  # (B, t, place)
    assert drops[0].tolist() == [[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0]]
    assert drops[1].tolist() == [[1, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 0], [1, 1, 0, 0]]
    quarter = running_cell_drops((4, 2, 2), 0.25, torch.tensor([0])).view(4, 4).int()
    assert quarter.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]]
    three = running_cell_drops((4, 2, 2), 0.75, torch.tensor([0])).view(4, 4).int()
    assert three.tolist() == [[1, 1, 1, 0], [1, 1, 0, 1], [1, 0, 1, 1], [0, 1, 1, 1]]
    # larger grids tile the same cell; odd sides end in partial cells
    big = running_cell_drops((4, 4, 6), 0.5, torch.tensor([2])).view(4, 2, 2, 3, 2)  # (t, ch, 2, cw, 2)
    cell = running_cell_drops((4, 2, 2), 0.5, torch.tensor([2])).view(4, 1, 2, 1, 2)
    assert torch.equal(big, cell.expand_as(big))
    odd = running_cell_drops((4, 3, 5), 0.5, torch.tensor([2])).view(4, 3, 5)
    assert torch.equal(odd, big.reshape(4, 4, 6)[:, :3, :5])


@pytest.mark.parametrize(("dec_type", "grid", "ratio", "dec_ratio"), [
    ("running_cell", (4, 4, 4), 0.75, 0.5),
    ("running_cell", (4, 4, 4), 0.5, 0.25),
    ("running_cell", (2, 3, 3), 0.5, 0.25),  # odd sides: the pattern can drop more than n_drop
    ("random", (4, 4, 4), 0.75, 0.5),
])  # fmt: skip
def test_decoder_mask_follows_its_rule_and_never_drops_a_visible_token(dec_type, grid, ratio, dec_ratio):
    """The rule restated per sample: drop n_drop masked tokens, those the running-cell pattern drops
    first, then the other masked ones, by ascending noise within each group; never a visible one."""
    torch.manual_seed(0)
    B, N = 64, grid[0] * grid[1] * grid[2]
    enc = make_mask("random", grid, ratio, B)
    n_vis, n_drop = num_visible("random", grid, ratio), int(N * dec_ratio)
    noise = torch.rand(B, N + (dec_type == "running_cell"))
    dec = make_decoder_mask(dec_type, grid, dec_ratio, enc.mask, n_vis, noise=noise)
    masked = enc.mask.bool()
    if dec_type == "running_cell":
        pattern = running_cell_drops(grid, dec_ratio, (noise[:, N] * 4).long())
    else:
        pattern = torch.zeros(B, N, dtype=torch.bool)
    replaced = 0
    for b in range(B):
        ids = masked[b].nonzero().flatten().tolist()
        ids.sort(key=lambda i: (not pattern[b, i], noise[b, i].item()))
        dropped = set(ids[:n_drop])
        kept = sorted(set(range(N)) - dropped)
        assert dec.ids_decode[b].tolist() == kept
        assert dec.loss_mask[b].nonzero().flatten().tolist() == sorted(ids[n_drop:])
        replaced += int((pattern[b] & ~masked[b]).sum())  # pattern drops that hit a visible token
    assert not (enc.mask.scatter(1, dec.ids_decode, 2.0) == 0).any()  # no visible token dropped
    if dec_type == "running_cell" and grid == (4, 4, 4):
        assert replaced > 0  # the replacement rule was exercised
        dropped_mask = torch.ones(B, N, dtype=torch.bool).scatter(1, dec.ids_decode, False)
        assert (dropped_mask | ~(pattern & masked)).all()  # every masked token the pattern drops is dropped
        outside = (dropped_mask & ~pattern).sum(dim=1)
        assert torch.equal(outside, (pattern & ~masked).sum(dim=1))  # one stand-in per visible one
    if dec_type == "running_cell":
        assert len(set((noise[:, N] * 4).long().tolist())) == 4  # every phase was drawn


def test_dual_masking_refuses_settings_it_cannot_follow():
    with pytest.raises(ValueError, match="no masked token would be left to reconstruct"):
        tiny(mask_ratio=0.75, decoder_mask_ratio=0.75)  # 48 masked, 48 dropped
    with pytest.raises(ValueError, match=r"must be 0.25, 0.5 or 0.75, got 0.6"):
        tiny(decoder_mask_ratio=0.6)
    tiny(decoder_mask_ratio=0.6, decoder_mask_type="random")  # 38 of the 58 masked dropped
    with pytest.raises(ValueError, match="decoder_mask_type 'cell' is not one of running_cell, random"):
        tiny(decoder_mask_ratio=0.5, decoder_mask_type="cell")
    with pytest.raises(ValueError, match=r"decoder_mask_ratio 1.0 is outside \[0, 1\)"):
        tiny(decoder_mask_ratio=1.0)
    model = tiny(mask_ratio=0.75, decoder_mask_ratio=0.5)
    with pytest.raises(ValueError, match="no masked token would be left"):
        model(clips(), decoder_mask_ratio=0.75)  # a call's override is checked too
    with pytest.raises(ValueError, match=r"must have shape \(B, U_dec\) = \(2, 65\)"):
        model(clips(), decoder_noise=torch.rand(2, 64))


def test_pictures_decode_every_patch_of_a_dual_masking_model():
    """viz.reconstruction_picture (training pictures, tools/visualize.py) runs the decoder without
    its mask."""
    from mae_scale.config import Config
    from mae_scale.viz import reconstruction_picture

    plain, dual = tiny(mask_ratio=0.75), tiny(mask_ratio=0.75, decoder_mask_ratio=0.5)  # same weights
    cfg = Config.load("demo", ["model.mask_ratio=0.75"])  # the tiny 8x64 model of TINY64
    picture = reconstruction_picture(plain, clips(), cfg, keys=["a", "b"], step=1, seed=0)
    assert (reconstruction_picture(dual, clips(), cfg, keys=["a", "b"], step=1, seed=0) == picture).all()


# --- patches -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "p", "u"), [((2, 3, 8, 32, 48), 16, 2), ((1, 3, 4, 28, 28), 14, 1), ((1, 1, 6, 8, 8), 4, 3)]
)
def test_unpatchify_inverts_patchify(shape, p, u):
    x = torch.randn(shape)
    grid = (shape[2] // u, shape[3] // p, shape[4] // p)
    patches = patchify(x, p, u)
    assert patches.shape == (shape[0], grid[0] * grid[1] * grid[2], u * p * p * shape[1])
    assert torch.equal(unpatchify(patches, grid, p, u), x)


def test_model_unpatchify_uses_its_grid():
    model = tiny()
    target = clips()[:, :, :4]  # (B, C, pred_t_dim, H, W)
    assert torch.equal(model.unpatchify(model.patchify(target)), target)
    with pytest.raises(ValueError, match="do not fit the grid"):
        model.unpatchify(torch.randn(1, 10, 768))


# --- attention kernels and checkpointing ---------------------------------------------------------


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts of the math and SDPA attention kernels actually run from now on."""
    calls = {"math": 0, "sdpa": 0}
    real = {"math": attn_mod.math_attention, "sdpa": attn_mod.F.scaled_dot_product_attention}

    def counted(kind):
        def kernel(*args, **kwargs):
            calls[kind] += 1
            return real[kind](*args, **kwargs)

        return kernel

    monkeypatch.setattr(attn_mod, "math_attention", counted("math"))
    monkeypatch.setattr(attn_mod.F, "scaled_dot_product_attention", counted("sdpa"))
    return calls


@pytest.mark.parametrize("dual", DUAL, ids=DUAL_IDS)
def test_sdpa_matches_math_attention(monkeypatch, dual):
    """Same weights and mask: the kernels agree to 1e-5 (fp32 rounding of different summation orders)."""
    model = tiny(attention="sdpa", **dual)
    blocks = len(model.blocks) + len(model.decoder_blocks)
    calls = count_kernel_calls(monkeypatch)
    imgs, noise = clips(), fixed_noise(model)
    loss_s, pred_s, _ = model(imgs, **noise)
    loss_s.backward()
    assert calls == {"math": 0, "sdpa": blocks}
    grads_s = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_attention("math")
    loss_m, pred_m, _ = model(imgs, **noise)
    loss_m.backward()
    assert calls == {"math": blocks, "sdpa": blocks}  # the switch took effect in every block
    torch.testing.assert_close(pred_m, pred_s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_m, loss_s, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_s[n], atol=1e-5, rtol=1e-4, msg=n)


def test_auto_backend_is_sdpa_on_cpu():
    assert tiny().attention_backend() == "sdpa"
    assert attn_mod.resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="not one of"):
        tiny(attention="flash")


def test_forcing_xformers_fails_clearly_on_cpu():
    if not attn_mod.xformers_available():
        with pytest.raises(ImportError, match="xformers cannot be imported.*attention='sdpa'"):
            tiny(attention="xformers")
    else:
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            tiny(attention="xformers")(clips())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers attention needs a CUDA device")
@pytest.mark.skipif(not attn_mod.xformers_available(), reason="xformers is not installed")
@pytest.mark.parametrize("dual", DUAL, ids=DUAL_IDS)
def test_xformers_matches_sdpa_on_cuda(dual):
    model = tiny(attention="xformers", **dual).cuda()
    imgs, noise = clips().cuda(), {k: v.cuda() for k, v in fixed_noise(model).items()}
    assert model.attention_backend() == "xformers"
    loss_x, pred_x, _ = model(imgs, **noise)
    model.set_attention("sdpa")
    assert all(m.backend == "sdpa" for m in model.modules() if isinstance(m, Attention))
    loss_s, pred_s, _ = model(imgs, **noise)
    torch.testing.assert_close(pred_x, pred_s, atol=1e-3, rtol=1e-3)  # TF32 and kernel differences
    torch.testing.assert_close(loss_x, loss_s, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dual", DUAL, ids=DUAL_IDS)
@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_same_loss_and_grads(every, monkeypatch, dual):
    model = tiny(depth=3, decoder_depth=2, **dual)
    imgs, noise = clips(), fixed_noise(model)
    keys = list(model.state_dict())
    loss, _, _ = model(imgs, **noise)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    chosen = apply_activation_checkpointing(model, every)
    expected = {1: ["blocks.0", "blocks.1", "blocks.2", "decoder_blocks.0", "decoder_blocks.1"],
                2: ["blocks.0", "blocks.2", "decoder_blocks.0"]}[every]  # fmt: skip
    assert chosen == expected
    assert list(model.state_dict()) == keys  # names unchanged: checkpoints load either way
    runs = []  # block forwards: a checkpointed block runs again in backward, to recompute
    block_forward = Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a: runs.append(1) or block_forward(self, *a))
    loss_c, _, _ = model(imgs, **noise)
    loss_c.backward()
    assert len(runs) == 5 + len(chosen)
    monkeypatch.undo()
    assert torch.equal(loss_c, loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-7, rtol=1e-6, msg=n)

    twin = copy.deepcopy(model)  # the checkpointed forward must run the copy's own weights
    with torch.no_grad():
        twin.decoder_pred.bias.add_(1.0)
    assert not torch.allclose(twin(imgs, **noise)[1], model(imgs, **noise)[1])
    assert apply_activation_checkpointing(model, 0) == []
    assert not any(is_checkpointed(b) for b in [*model.blocks, *model.decoder_blocks])


def test_checkpointing_rejects_bad_every():
    with pytest.raises(ValueError, match="checkpoint_activations"):
        apply_activation_checkpointing(tiny(), -1)


# --- parameters, gradients, init -----------------------------------------------------------------


def test_preset_parameter_counts_on_meta():
    counts = {name: count_params(name) for name in ARCHS}
    assert abs(counts["vit_l"]["encoder"] - 304e6) / 304e6 < 0.01
    assert abs(counts["vit_h"]["encoder"] - 632e6) / 632e6 < 0.01
    assert 1.0e9 < counts["vit_g"]["encoder"] < 1.1e9
    assert abs(counts["vit_2b"]["encoder"] - 2.0e9) / 2.0e9 < 0.05
    assert counts["vit_b"]["encoder"] < counts["vit_l"]["encoder"]
    assert counts["tiny"]["total"] < 1e6
    for name in ["vit_l", "vit_h", "vit_g", "vit_2b"]:
        assert 12e6 < counts[name]["decoder"] < 16e6  # 4 x 512 decoder
    model = tiny()
    assert count_params(model)["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "dual", [{}, {"decoder_mask_ratio": 0.5}, {"decoder_mask_ratio": 0.5, "decoder_mask_type": "random"}]
)
def test_every_parameter_gets_a_gradient(dual):
    model = tiny(mask_type="tube", mask_ratio=0.75, **dual)
    loss, _, _ = model(clips())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_init_statistics():
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**{**TINY64, "embed_dim": 256, "decoder_embed_dim": 128, "img_size": 112})
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound, name
            assert abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name
            assert torch.count_nonzero(m.bias) == 0, name
        elif isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.count_nonzero(m.bias) == 0
    w = model.patch_embed.proj.weight  # (D, C, t, p, p) as a 2-D (D, C*t*p*p) matrix
    bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
    assert w.abs().max() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    assert torch.count_nonzero(model.patch_embed.proj.bias) == 0
    tables = torch.cat([p.flatten() for n, p in model.named_parameters() if "pos_embed" in n])
    assert abs(tables.std().item() - 0.02) < 0.002 and abs(tables.mean().item()) < 0.002
    tokens = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("token")])
    assert abs(tokens.std().item() - 0.02) < 0.005 and tokens.abs().max() > 0


def test_init_module_touches_only_its_own_parameters():
    model = tiny()
    before = {n: p.clone() for n, p in model.named_parameters()}
    init_module_(model)  # the MAE's own tables and tokens only
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in model.named_parameters(recurse=False)}
    # a ZeRO-3 partition holds no data here: skipped, not an error
    layer = nn.Linear(4, 4)
    layer.weight.data = torch.empty(0)
    init_module_(layer)
    assert torch.count_nonzero(layer.bias) == 0
    with pytest.raises(TypeError, match="no init rule for Embedding"):
        init_module_(nn.Embedding(3, 4))


# --- flops, precision, bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("decoder_mask_ratio", "decoder_mask_type", "cls_embed"),
    [(0.0, "running_cell", True), (0.5, "running_cell", True), (0.25, "running_cell", False),
     (0.5, "random", True), (0.25, "random", False)],
)  # fmt: skip
def test_forward_flops_match_torch_flop_counter(decoder_mask_ratio, decoder_mask_type, cls_embed):
    """The analytic count equals PyTorch's FlopCounterMode on the readable attention path, with dual
    masking too (and a dual-masking model told to decode every patch counts as the full decoder)."""
    dual = dict(decoder_mask_ratio=decoder_mask_ratio, decoder_mask_type=decoder_mask_type)
    model = tiny(attention="math", mask_ratio=0.75, cls_embed=cls_embed, **dual)
    counter = FlopCounterMode(display=False)
    with counter:
        model(clips(batch=2))
    assert counter.get_total_flops() == 2 * forward_flops(model)["total"]
    with counter:
        model(clips(batch=2), decoder_mask_ratio=0.0)
    assert counter.get_total_flops() == 2 * forward_flops(model, decoder_mask_ratio=0.0)["total"]
    full = forward_flops(model, decoder_mask_ratio=0.0)
    assert (forward_flops(model)["decoder"] < full["decoder"]) == (decoder_mask_ratio > 0)
    assert train_step_flops(model.config, batch_size=2) == 3 * 2 * forward_flops(model)["total"]
    assert train_step_flops("vit_l") == 3 * forward_flops("vit_l")["total"]


def test_tiny_runs_at_112px_in_bf16_autocast():
    model = MaskedAutoencoderViT(**ARCHS["tiny"], img_size=112, num_frames=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(clips(batch=1, frames=16, size=112))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pred.shape == (1, 8 * 7 * 7, 1 * 16 * 16 * 3) and (mask == 0).sum() == int(392 * 0.1)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"do not match the model's \(B, 3, 8, 64, 64\)"):
        tiny()(clips(size=32))
    with pytest.raises(ValueError, match="mask_type 'blocks' is not one of"):
        tiny(mask_type="blocks")
    with pytest.raises(ValueError, match="pred_t_dim 3"):
        tiny(pred_t_dim=3)
    with pytest.raises(ValueError, match="does not tile"):
        tiny(img_size=70)
    with pytest.raises(ValueError, match=r"mask_ratio 1.0 is outside"):
        tiny()(clips(), mask_ratio=1.0)


def test_bench_tool_runs(capsys):
    """tools/bench_model.py end to end on the tiny preset (a smoke test: numbers are not checked)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = (
        "--preset tiny --batch 1 --frames 8 --size 32 --steps 1 --warmup 0 --peak-tflops 1 --mask-ratio 0.75"
    )
    bench.main([*args.split(), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "clips/s" in out and "MFU" in out and "% of 1 (--peak-tflops)" in out
    bench.main([*args.split(), "--device", "cpu", "--decoder-mask-ratio", "0", "0.5"])  # side by side
    out = capsys.readouterr().out
    assert "decoder_mask_ratio 0: step" in out and "decoder_mask_ratio 0.5: step" in out
    full, dual = (forward_flops("tiny", img_size=32, num_frames=8, pred_t_dim=4, mask_ratio=0.75,
                                decoder_mask_ratio=r)["total"] for r in (0.0, 0.5))  # fmt: skip
    assert "decoder_mask_ratio 0.5 vs 0: step time x" in out and f"FLOPs x{dual / full:.3f}" in out
    bench.main([*args.split(), "--device", "cpu", "--precision", "fp32", "bf16-weights", "bf16"])
    out = capsys.readouterr().out
    assert "precision=fp32,bf16-weights,bf16" in out and "precision bf16-weights: step" in out
    assert "precision bf16-weights vs fp32: step time x" in out and "precision bf16 vs fp32: CPU time" in out
