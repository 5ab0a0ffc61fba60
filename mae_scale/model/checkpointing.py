"""Activation checkpointing of transformer blocks, applied from outside the model.

A checkpointed block keeps only its input during the forward pass and recomputes its activations
in the backward pass (non-reentrant `torch.utils.checkpoint`, which works with ZeRO-3's parameter
hooks and with inputs that need no grad). The block's forward is replaced on the instance, so
module structure, parameter names and state-dict keys stay exactly the same: no wrapper prefix to
strip, checkpoints load with or without checkpointing.
"""

from __future__ import annotations

import types

from torch import nn
from torch.utils.checkpoint import checkpoint

from mae_scale.model.blocks import Block


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Recompute the class's own forward in backward; `self` comes in bound, so deepcopy rebinds it.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, every: int) -> list[str]:
    """Checkpoint every `every`-th block of each stack (0: none, 1: all); returns the blocks' names.

    Blocks are counted separately in the encoder and the decoder, the first of each stack included
    (every=2 checkpoints blocks 0, 2, 4, ...). Calling it again replaces the previous choice.
    """
    if not isinstance(every, int) or every < 0:
        raise ValueError(
            f"checkpoint_activations must be an integer >= 0 (0: none, k: every k-th), got {every!r}"
        )
    chosen = []
    for stack_name, stack in model.named_modules():
        if not isinstance(stack, nn.ModuleList):
            continue
        for i, block in enumerate(stack):
            if not isinstance(block, Block):
                continue
            block.__dict__.pop("forward", None)  # undo an earlier call
            if every and i % every == 0:
                block.forward = types.MethodType(_checkpointed_forward, block)
                chosen.append(f"{stack_name}.{i}")
    return chosen


def is_checkpointed(block: nn.Module) -> bool:
    return "forward" in block.__dict__


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks that run checkpointed now (for the run's start record)."""
    return [name for name, m in model.named_modules() if isinstance(m, Block) and is_checkpointed(m)]
