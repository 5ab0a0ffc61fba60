"""MAE-ST model: `MaskedAutoencoderViT` and the helpers a trainer needs around it."""

from mae_scale.model.attention import resolve_backend
from mae_scale.model.checkpointing import apply_activation_checkpointing
from mae_scale.model.convert import from_mae_st, load_state_dict_strict, to_mae_st
from mae_scale.model.flops import count_params, forward_flops, train_step_flops
from mae_scale.model.mae import MaskedAutoencoderViT, init_module_
from mae_scale.model.presets import ARCHS, arch

__all__ = [
    "ARCHS",
    "MaskedAutoencoderViT",
    "apply_activation_checkpointing",
    "arch",
    "count_params",
    "forward_flops",
    "from_mae_st",
    "init_module_",
    "load_state_dict_strict",
    "resolve_backend",
    "to_mae_st",
    "train_step_flops",
]
