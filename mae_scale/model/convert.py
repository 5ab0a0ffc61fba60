"""Weights to and from facebookresearch/mae_st, and strict loading that says what does not fit.

Our parameter names and shapes equal mae_st's `MaskedAutoencoderViT(sep_pos_embed=True,
cls_embed=True)`, so conversion is mostly unwrapping: the official `{"model": state_dict}`
checkpoint, and prefixes that wrappers add (`module.` from DDP/DeepSpeed, `_orig_mod.` from
torch.compile, `_checkpoint_wrapped_module.` from torch's checkpoint wrapper).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WRAPPER_INFIXES = ("_checkpoint_wrapped_module.",)


class StateDictMismatchError(ValueError):
    """Weights that do not fit a model; the message lists every missing, unexpected and mis-shaped key."""


def _clean_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    for infix in _WRAPPER_INFIXES:
        key = key.replace(infix, "")
    return key


def from_mae_st(checkpoint_or_state_dict: Mapping) -> dict[str, torch.Tensor]:
    """An official mae_st checkpoint (`{"model": sd, ...}`) or bare state dict -> our state dict.

    Raises on a checkpoint trained with a joint position table (`sep_pos_embed=False`): it cannot be
    split into the separable space and time tables exactly.
    """
    sd = checkpoint_or_state_dict
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    out = {_clean_key(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    joint = [k for k in out if k in ("pos_embed", "decoder_pos_embed")]
    if joint:
        raise StateDictMismatchError(
            f"checkpoint has joint position tables {joint} (mae_st sep_pos_embed=False); mae-scale uses "
            "separable tables (pos_embed_spatial / pos_embed_temporal), which cannot represent them exactly"
        )
    return out


def to_mae_st(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Our state dict (possibly from a wrapped model) -> mae_st names; wrap as {"model": ...} to save."""
    return {_clean_key(k): v for k, v in state_dict.items()}


def _hint(key: str, expected: tuple, got: tuple) -> str:
    """Say which setting a known shape mismatch points to (e.g. mae_st #14: t_patch_size 4 vs 2)."""
    if key == "patch_embed.proj.weight" and len(expected) == len(got) == 5:
        return (
            f" (patch kernel t x p x p: model {expected[2]}x{expected[3]}x{expected[4]}, "
            f"checkpoint {got[2]}x{got[3]}x{got[4]}: check t_patch_size and patch_size)"
        )
    if key.endswith("pos_embed_temporal"):
        return " (time positions = num_frames / t_patch_size: check num_frames and t_patch_size)"
    if key.endswith("pos_embed_spatial"):
        return " (space positions = (img_size / patch_size)^2: check img_size and patch_size)"
    if key == "decoder_pred.weight":
        return " (outputs = t_patch_size * pred_t_dim / num_frames * patch_size^2 * 3: check pred_t_dim)"
    return ""


def state_dict_diff(model: nn.Module, state_dict: Mapping) -> list[str]:
    """Every way `state_dict` does not fit `model`, one readable line each; empty when it fits."""
    # keep_vars: under ZeRO-3 the partitioned parameters keep their full shape in ds_shape.
    expected = {
        k: tuple(getattr(t, "ds_shape", t.shape)) for k, t in model.state_dict(keep_vars=True).items()
    }
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = [
        f"missing key: {k} (expected shape {list(expected[k])})" for k in sorted(expected.keys() - got.keys())
    ]
    unexpected = [f"unexpected key: {k} (shape {list(got[k])})" for k in sorted(got.keys() - expected.keys())]
    mismatched = [
        f"shape mismatch: {k}: expected {list(expected[k])}, got {list(got[k])}"
        + _hint(k, expected[k], got[k])
        for k in sorted(expected.keys() & got.keys())
        if expected[k] != got[k]
    ]
    return missing + unexpected + mismatched


def load_state_dict_strict(model: nn.Module, state_dict: Mapping) -> None:
    """Load with strict=True, but first raise one error listing every missing/unexpected/mis-shaped key."""
    problems = state_dict_diff(model, state_dict)
    if problems:
        raise StateDictMismatchError(
            f"state dict does not fit {type(model).__name__} ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(dict(state_dict), strict=True)
