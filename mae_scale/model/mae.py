"""MAE-ST: a ViT masked autoencoder on spacetime patches (Feichtenhofer et al., 2022).

Reads like the paper: cut the clip into patches, hide most of them, encode only the visible ones,
let a light decoder fill in every position, and score the reconstruction on the hidden patches.
Optionally (`decoder_mask_ratio` > 0, VideoMAE V2's dual masking) the decoder fills in only a
subset of the hidden positions, and the loss is taken on that subset: the decoder, which runs on
every token and so costs more than the encoder at 90% masking, gets cheaper. It changes the
computation only, never the parameters; 0 (the default) is the MAE-ST model.
Parameter names and shapes equal facebookresearch/mae_st `models_mae.MaskedAutoencoderViT` with
`sep_pos_embed=True` (and `cls_embed=True` by default), so weights load both ways with strict=True.

One difference in order, none in value: position embeddings are added *before* masking (as image
MAE does), so the encoder needs no gathered position tables; mae_st adds them after, the sums are
the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from mae_scale.model.attention import check_backend, resolve_backend
from mae_scale.model.blocks import LN_EPS, Attention, Block, PatchEmbed
from mae_scale.model.masking import (
    DEFAULT_CUBE,
    DecoderMask,
    Mask,
    decoder_mask_units,
    make_decoder_mask,
    make_mask,
    num_decoder_dropped,
    num_units,
    num_visible,
)
from mae_scale.model.patches import patchify, target_frame_indices, unpatchify


def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x: (B, N, D), ids: (B, n) -> (B, n, D), the tokens at `ids` of each sample."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _scatter_tokens(x: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """x: (B, k, D) for the tokens `ids` (B, k) -> (B, n, D), zeros at every other token."""
    out = x.new_zeros(x.shape[0], n, x.shape[-1])
    return out.scatter(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)


def _separable(spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
    """Sum of a space table (1, h*w, D) and a time table (1, t, D) -> (1, t*h*w, D) in (t, h, w) order."""
    return (spatial[:, None, :, :] + temporal[:, :, None, :]).flatten(1, 2)


class MaskedAutoencoderViT(nn.Module):
    """Video MAE with a ViT encoder on visible spacetime patches and a narrow ViT decoder."""

    def __init__(
        self,
        *,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 4,
        decoder_num_heads: int = 16,
        img_size: int = 224,
        in_chans: int = 3,
        num_frames: int = 16,
        t_patch_size: int = 2,
        pred_t_dim: int = 8,
        mask_type: str = "random",
        mask_ratio: float = 0.9,
        cls_embed: bool = True,
        norm_pix_loss: bool = True,
        attention: str = "auto",
        mask_cube: tuple[int, int, int] = DEFAULT_CUBE,
        decoder_mask_ratio: float = 0.0,
        decoder_mask_type: str = "running_cell",
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not 1 <= pred_t_dim <= num_frames or (t_patch_size * pred_t_dim) % num_frames:
            raise ValueError(
                f"pred_t_dim {pred_t_dim} must be in [1, num_frames={num_frames}] and make "
                f"t_patch_size * pred_t_dim / num_frames = {t_patch_size} * {pred_t_dim} / {num_frames} "
                "a whole number of predicted frames per token"
            )
        # Everything needed to rebuild this model (travels with checkpoints and exports).
        self.config = dict(
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            patch_size=patch_size, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, img_size=img_size, in_chans=in_chans,
            num_frames=num_frames, t_patch_size=t_patch_size, pred_t_dim=pred_t_dim,
            mask_type=mask_type, mask_ratio=mask_ratio, cls_embed=cls_embed,
            norm_pix_loss=norm_pix_loss, attention=attention, mask_cube=tuple(mask_cube),
            decoder_mask_ratio=decoder_mask_ratio, decoder_mask_type=decoder_mask_type,
        )  # fmt: skip
        self.patch_size = patch_size
        self.pred_t_dim = pred_t_dim
        self.t_pred_patch_size = t_patch_size * pred_t_dim // num_frames  # frames predicted per token
        self.mask_type, self.mask_ratio, self.mask_cube = mask_type, mask_ratio, tuple(mask_cube)
        self.decoder_mask_type, self.decoder_mask_ratio = decoder_mask_type, decoder_mask_ratio
        self.cls_embed = cls_embed
        self.norm_pix_loss = norm_pix_loss
        dev = {"device": device}

        # --- encoder ---
        self.patch_embed = PatchEmbed(
            img_size, patch_size, num_frames, t_patch_size, in_chans, embed_dim, **dev
        )
        self.grid = self.patch_embed.grid  # token grid (t, h, w)
        t, h, w = self.grid
        self.num_patches = t * h * w
        # fail now on a bad mask setting
        n_visible = num_visible(mask_type, self.grid, mask_ratio, self.mask_cube)
        num_decoder_dropped(decoder_mask_type, self.grid, decoder_mask_ratio, n_visible)
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dev))
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **dev))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, embed_dim, **dev))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, embed_dim, **dev))
        if cls_embed:
            self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, embed_dim, **dev))
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, attention, **dev) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS, **dev)

        # --- decoder ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, **dev)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **dev))
        self.decoder_pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, decoder_embed_dim, **dev))
        self.decoder_pos_embed_temporal = nn.Parameter(torch.zeros(1, t, decoder_embed_dim, **dev))
        if cls_embed:
            self.decoder_pos_embed_class = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim, **dev))
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attention, **dev)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=LN_EPS, **dev)
        pred_dim = self.t_pred_patch_size * patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_dim, **dev)

        self.init_weights()

    def init_weights(self) -> None:
        for m in self.modules():
            init_module_(m)

    # --- pixels and masks ---
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """Target clip (B, C, pred_t_dim, H, W) -> (B, N, u*p*p*C) patch vectors, u = t_pred_patch_size."""
        return patchify(imgs, self.patch_size, self.t_pred_patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """(B, N, u*p*p*C) -> (B, C, pred_t_dim, H, W); `grid` (t, h, w) defaults to this model's."""
        return unpatchify(x, grid or self.grid, self.patch_size, self.t_pred_patch_size)

    def mask_units(self) -> int:
        """U, the second dimension of the `noise` that fixes a mask: see mae_scale.model.masking."""
        return num_units(self.mask_type, self.grid, self.mask_cube)

    def random_masking(self, batch: int, mask_ratio: float, noise: torch.Tensor | None, device) -> Mask:
        """Per-sample masking by sorting noise (`mask_type` picks token, tube, frame or cube units)."""
        return make_mask(
            self.mask_type, self.grid, mask_ratio, batch, noise=noise, device=device, cube=self.mask_cube
        )

    def decoder_mask_units(self) -> int:
        """U_dec, the second dimension of the `decoder_noise` that fixes the decoder's tokens."""
        return decoder_mask_units(self.decoder_mask_type, self.grid)

    def decoder_masking(
        self, mask: torch.Tensor, n_visible: int, ratio: float, noise: torch.Tensor | None
    ) -> DecoderMask | None:
        """Which masked tokens the decoder drops (dual masking); None when it keeps all (ratio 0)."""
        return make_decoder_mask(self.decoder_mask_type, self.grid, ratio, mask, n_visible, noise=noise)

    # --- the model ---
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs)  # (B, N, D)
        x = x + _separable(self.pos_embed_spatial, self.pos_embed_temporal)

        # masking: keep a subset of tokens, N -> n_keep
        m = self.random_masking(x.shape[0], mask_ratio, noise, x.device)
        x = _gather_tokens(x, m.ids_keep)  # (B, n_keep, D)

        if self.cls_embed:
            cls = self.cls_token + self.pos_embed_class
            x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + n_keep, D)

        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.cls_embed:
            x = x[:, 1:]  # the class token is not decoded
        return x, m.mask, m.ids_restore

    def forward_decoder(
        self, x: torch.Tensor, ids_restore: torch.Tensor, ids_decode: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-> (B, N, u*p*p*C); with `ids_decode` (B, n_dec) only those tokens are decoded and the
        rows of the others are zero (no prediction)."""
        x = self.decoder_embed(x)  # (B, n_keep, Dd)
        B, n_keep, _ = x.shape
        N = ids_restore.shape[1]

        # append mask tokens, then unshuffle back to (t, h, w) order
        mask_tokens = self.mask_token.expand(B, N - n_keep, -1)
        x = torch.cat([x, mask_tokens], dim=1)  # (B, N, Dd), shuffled order
        x = _gather_tokens(x, ids_restore)  # (B, N, Dd)
        x = x + _separable(self.decoder_pos_embed_spatial, self.decoder_pos_embed_temporal)
        if ids_decode is not None:  # dual masking: the visible and the kept masked tokens only
            x = _gather_tokens(x, ids_decode)  # (B, n_dec, Dd)

        if self.cls_embed:
            cls = self.decoder_cls_token + self.decoder_pos_embed_class
            x = torch.cat([cls.expand(B, -1, -1), x], dim=1)  # (B, 1 + N, Dd)

        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, [1 +] n_dec, u*p*p*C)
        x = x[:, 1:] if self.cls_embed else x
        return x if ids_decode is None else _scatter_tokens(x, ids_decode, N)  # (B, N, u*p*p*C)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the masked patches of the temporally subsampled clip.

        imgs: (B, C, T, H, W); pred: (B, N, u*p*p*C); mask: (B, N), 1 = a token the loss counts
        (masked, and with dual masking also kept by the decoder).
        """
        frames = target_frame_indices(imgs.shape[2], self.pred_t_dim).to(imgs.device)
        target = self.patchify(torch.index_select(imgs, 2, frames))  # (B, N, u*p*p*C)
        # The loss in at least fp32, also when the model runs in bf16.
        dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
        pred, target = pred.to(dtype), target.to(dtype)
        if self.norm_pix_loss:  # each patch normalized by its own mean and variance
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5

        loss = ((pred - target) ** 2).mean(dim=-1)  # (B, N), loss per patch
        return (loss * mask).sum() / mask.sum()  # mean over masked patches only

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        noise: torch.Tensor | None = None,
        decoder_mask_ratio: float | None = None,
        decoder_noise: torch.Tensor | None = None,
    ):
        """imgs: normalized (B, C, T, H, W) -> (loss, pred (B, N, u*p*p*C), mask (B, N), 1 = masked).

        `decoder_mask_ratio` overrides the model's for this call: 0 decodes every patch (pictures,
        evaluation). With dual masking on, the rows of `pred` the decoder dropped are zero and the
        loss counts the kept masked tokens only; `mask` is always the encoder's.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        dec_ratio = self.decoder_mask_ratio if decoder_mask_ratio is None else decoder_mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        dec = self.decoder_masking(mask, latent.shape[1], dec_ratio, decoder_noise)
        if dec is None:  # the MAE-ST model: every token decoded, the loss on every masked one
            pred = self.forward_decoder(latent, ids_restore)
            loss = self.forward_loss(imgs, pred, mask)
        else:
            pred = self.forward_decoder(latent, ids_restore, dec.ids_decode)
            loss = self.forward_loss(imgs, pred, dec.loss_mask)
        return loss, pred, mask

    # --- attention kernel ---
    def attention_backend(self, device: torch.device | str | None = None) -> str:
        """The attention kernel that runs on `device` (default: where the parameters are), for logs."""
        if device is None:
            device = next(self.parameters()).device
        return resolve_backend(self.config["attention"], device)

    def set_attention(self, backend: str) -> None:
        """Switch every block's attention kernel (weights unchanged)."""
        check_backend(backend)
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend
        self.config["attention"] = backend


@torch.no_grad()
def init_module_(m: nn.Module) -> None:
    """Initialize ONE module's own parameters (not its children's), by the module's type.

    Linear: xavier-uniform weight, zero bias (official JAX ViT / mae_st). Conv3d patch embedding:
    xavier-uniform on the weight viewed as (out, in * kt * kh * kw), zero bias. LayerNorm: 1 and 0.
    The MAE's own tensors: position tables trunc-normal std 0.02, class and mask tokens normal std
    0.02. Parameters that hold no data here (meta tensors, or ZeRO-3 partitions, which DeepSpeed
    empties to numel 0) are left alone: under `zero.Init` the caller gathers one module at a time
    and calls this on it (DeepSpeed #2650: a model-level init is silently skipped otherwise).
    """
    own = [(n, p) for n, p in m.named_parameters(recurse=False) if not p.is_meta and p.numel() > 0]
    for name, p in own:
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            if name == "weight":
                nn.init.xavier_uniform_(p.view(p.shape[0], -1))  # (out, fan_in); a no-op view for Linear
            else:
                nn.init.zeros_(p)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(p) if name == "weight" else nn.init.zeros_(p)
        elif isinstance(m, MaskedAutoencoderViT) and "pos_embed" in name:
            nn.init.trunc_normal_(p, std=0.02)
        elif isinstance(m, MaskedAutoencoderViT) and name.endswith("token"):
            nn.init.normal_(p, std=0.02)
        else:
            raise TypeError(f"init_module_: no init rule for {type(m).__name__} parameter {name!r}")
