"""Architecture presets: the size of each model, nothing about data or training.

Each entry holds only `MaskedAutoencoderViT` architecture kwargs. Parameter counts are never typed
here: `mae_scale.model.flops.count_params(name)` computes them (tests check the sizes below).

- `tiny`: for tests and the CPU demo (32-112 px clips, a few seconds per step on a laptop core).
- `vit_b`, `vit_l`, `vit_h`: the paper's sizes (ViT-L encoder ~304M, ViT-H/14 ~632M parameters).
- `vit_g`: ~1.0B encoder (width 1408, depth 40, MLP 6144, as ViT-g/14 of Zhai et al.).
- `vit_2b`: ~2.0B encoder (width 2048, depth 40, MLP 8192; head dim 128 suits flash kernels).
The big ones share MAE-ST's light decoder: 4 blocks of width 512 with 16 heads.
"""

from __future__ import annotations

_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 4, "decoder_num_heads": 16}

ARCHS: dict[str, dict] = {
    "tiny": {
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 4,
        "mlp_ratio": 4.0,
        "patch_size": 16,
        "decoder_embed_dim": 64,
        "decoder_depth": 1,
        "decoder_num_heads": 4,
    },
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "patch_size": 16, **_DECODER},
    "vit_l": {
        "embed_dim": 1024,
        "depth": 24,
        "num_heads": 16,
        "mlp_ratio": 4.0,
        "patch_size": 16,
        **_DECODER,
    },
    "vit_h": {
        "embed_dim": 1280,
        "depth": 32,
        "num_heads": 16,
        "mlp_ratio": 4.0,
        "patch_size": 14,
        **_DECODER,
    },
    # MLP width 6144 = 1408 * 48 / 11; the block rounds width * ratio to the nearest integer.
    "vit_g": {
        "embed_dim": 1408,
        "depth": 40,
        "num_heads": 16,
        "mlp_ratio": 6144 / 1408,
        "patch_size": 14,
        **_DECODER,
    },
    "vit_2b": {
        "embed_dim": 2048,
        "depth": 40,
        "num_heads": 16,
        "mlp_ratio": 4.0,
        "patch_size": 14,
        **_DECODER,
    },
}


def arch(name: str) -> dict:
    """A copy of one preset's kwargs; an unknown name raises with the known ones listed."""
    if name not in ARCHS:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(ARCHS)}")
    return dict(ARCHS[name])
