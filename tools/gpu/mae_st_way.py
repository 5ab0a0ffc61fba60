"""The baseline for speed: MAE-ST as the official code runs it (facebookresearch/mae_st).

A re-statement, written for this benchmark, of how `models_mae.MaskedAutoencoderViT` and
`util/video_vit.py` compute the model (sep_pos_embed=True, cls_embed=True, norm_pix_loss=True),
read from that code, nothing copied: Conv3d patch embedding; masking by argsort of noise with the
position tables gathered and added *after* masking; attention with separate q, k, v projections and
the naive kernel `softmax(q @ k^T * scale) @ v` on (B, heads, N, d); timm-style pre-norm blocks;
position tables built every forward with `repeat` and `repeat_interleave`. The step the official
`main_pretrain.py` runs around it: eager, fp32 weights, autocast (bf16 here, as the issue asks, so
no loss scaler), `torch.optim.AdamW`, no DeepSpeed.

Parameter names and shapes are the official ones, which are mae-scale's too, so
`OfficialWayMAE(**kwargs).load_state_dict(MaskedAutoencoderViT(**kwargs).state_dict())` gives the same
weights; tests/test_gpu_check.py checks that the two give the same loss for the same clip and noise.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, frames, t_patch_size):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.t_grid_size = frames // t_patch_size
        kernel = (t_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x):
        x = self.proj(x).flatten(3)  # (N, C, T', H'W')
        return torch.einsum("ncts->ntsc", x)  # (N, T', H'W', C)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x).view(B, -1, C)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, round(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class OfficialWayMAE(nn.Module):
    """Takes MaskedAutoencoderViT's architecture kwargs (cls_embed and norm_pix_loss on, as mae_st's
    pretraining); `attention`, `mask_type` (random only) and `mask_cube` are accepted and ignored."""

    def __init__(
        self,
        *,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        patch_size=16,
        decoder_embed_dim=512,
        decoder_depth=4,
        decoder_num_heads=16,
        img_size=224,
        in_chans=3,
        num_frames=16,
        t_patch_size=2,
        pred_t_dim=8,
        mask_ratio=0.9,
        mask_type="random",
        cls_embed=True,
        norm_pix_loss=True,
        **_ignored,
    ):
        super().__init__()
        if mask_type != "random" or not cls_embed or not norm_pix_loss:
            raise ValueError("the baseline is mae_st's default: random mask, cls token, norm_pix_loss")
        self.mask_ratio = mask_ratio
        self.pred_t_dim = pred_t_dim
        self.t_pred_patch_size = t_patch_size * pred_t_dim // num_frames
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size)
        T, L = self.patch_embed.t_grid_size, self.patch_embed.grid_size**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, L, embed_dim))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, T, embed_dim))
        self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed_spatial = nn.Parameter(torch.zeros(1, L, decoder_embed_dim))
        self.decoder_pos_embed_temporal = nn.Parameter(torch.zeros(1, T, decoder_embed_dim))
        self.decoder_pos_embed_class = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.t_pred_patch_size * patch_size**2 * in_chans)

    def patchify(self, imgs):
        N, C, T, H, W = imgs.shape
        p, u = self.patch_size, self.t_pred_patch_size
        h, w = H // p, W // p
        x = imgs.reshape(N, C, T // u, u, h, p, w, p)
        x = torch.einsum("nctuhpwq->nthwupqc", x)
        return x.reshape(N, T // u * h * w, u * p * p * C)

    def random_masking(self, x, mask_ratio, noise=None):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore, ids_keep

    def forward_encoder(self, x, mask_ratio, noise=None):
        x = self.patch_embed(x)
        N, T, L, C = x.shape
        x = x.reshape(N, T * L, C)
        x, mask, ids_restore, ids_keep = self.random_masking(x, mask_ratio, noise)
        x = x.view(N, -1, C)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        pos_embed = self.pos_embed_spatial.repeat(1, T, 1) + torch.repeat_interleave(
            self.pos_embed_temporal, L, dim=1
        )
        pos_embed = pos_embed.expand(x.shape[0], -1, -1)
        pos_embed = torch.gather(pos_embed, 1, ids_keep.unsqueeze(-1).repeat(1, 1, pos_embed.shape[2]))
        pos_embed = torch.cat([self.pos_embed_class.expand(pos_embed.shape[0], -1, -1), pos_embed], 1)
        x = x + pos_embed
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:, :], mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        N = x.shape[0]
        T, H = self.patch_embed.t_grid_size, self.patch_embed.grid_size
        x = self.decoder_embed(x)
        C = x.shape[-1]
        mask_tokens = self.mask_token.repeat(N, T * H * H - x.shape[1], 1)
        x_ = torch.cat([x, mask_tokens], dim=1).view([N, T * H * H, C])
        x = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, C))
        x = torch.cat((self.decoder_cls_token.expand(N, -1, -1), x), dim=1)
        pos = self.decoder_pos_embed_spatial.repeat(1, T, 1) + torch.repeat_interleave(
            self.decoder_pos_embed_temporal, H * H, dim=1
        )
        x = x + torch.cat([self.decoder_pos_embed_class.expand(N, -1, -1), pos.expand(N, -1, -1)], 1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        index = torch.linspace(0, imgs.shape[2] - 1, self.pred_t_dim).long().to(imgs.device)
        target = self.patchify(torch.index_select(imgs, 2, index))
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        mask = mask.view(loss.shape)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=None, noise=None):
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
