"""Export a run's weights for fine-tuning and inspection, readable without DeepSpeed.

`export_run(RUN)` writes RUN/export/step_XXXXXXXX/:
  mae.safetensors       the whole MAE, consolidated fp32
  encoder.safetensors   the encoder only (what fine-tuning keeps)
  model_config.json     MaskedAutoencoderViT kwargs + the run config that trained it
  mae_st.pth            {"model": state_dict} in facebookresearch/mae_st's layout (tensors only)
`load_exported(DIR)` rebuilds the model from them with strict loading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from mae_scale.config import Config
from mae_scale.train.checkpoint import Checkpointer

DECODER_PREFIXES = ("decoder_", "mask_token")


def is_encoder_key(key: str) -> bool:
    return not key.startswith(DECODER_PREFIXES)


def resolve_checkpoint(run_dir: Path, step: int | None = None) -> tuple[Path, str]:
    """(checkpoints folder, tag) of the newest complete checkpoint, or of `step`."""
    root = Path(run_dir) / "checkpoints"
    ckpt = Checkpointer(root, keep=1, rank=0, world_size=1, log=lambda *_: None)
    wanted = None if step is None else f"step_{step:08d}"
    found = ckpt.peek(wanted)
    if found is None:
        tags = ", ".join(ckpt.tags()) or "none"
        what = f"step {step}" if step is not None else "any complete checkpoint"
        problems = "; ".join(ckpt.problems(wanted)) if wanted else ""
        raise FileNotFoundError(
            f"{root}: no usable checkpoint for {what} (checkpoints: {tags}) {problems}".strip()
        )
    return root, found[0]


def consolidated_state_dict(
    run_dir: Path, step: int | None = None
) -> tuple[dict[str, torch.Tensor], Config, str]:
    """fp32 weights of a (ZeRO-partitioned) checkpoint of RUN, with the run's config."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mae_scale.model.convert import to_mae_st

    root, tag = resolve_checkpoint(run_dir, step)
    cfg = Config.load(str(Path(run_dir) / "config.yaml"))
    sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    sd = {k: v.float().contiguous() for k, v in to_mae_st(sd).items()}
    return sd, cfg, tag


def export_run(
    run_dir: str | os.PathLike, step: int | None = None, out: str | os.PathLike | None = None
) -> Path:
    from safetensors.torch import save_file

    from mae_scale.train.engine import model_kwargs

    run_dir = Path(run_dir)
    sd, cfg, tag = consolidated_state_dict(run_dir, step)
    out = Path(out) if out else run_dir / "export" / tag
    out.mkdir(parents=True, exist_ok=True)
    kwargs = model_kwargs(cfg)
    meta = {"format": "mae-scale export v1", "checkpoint": tag}
    save_file(sd, str(out / "mae.safetensors"), metadata=meta)
    save_file(
        {k: v for k, v in sd.items() if is_encoder_key(k)}, str(out / "encoder.safetensors"), metadata=meta
    )
    (out / "model_config.json").write_text(
        json.dumps(
            {
                "model_kwargs": kwargs,
                "preset": cfg.model.preset,
                "checkpoint": tag,
                "run_config": cfg.to_dict(),
            },
            indent=1,
        )
    )
    torch.save({"model": sd, "mae_scale": {"model_kwargs": kwargs, "checkpoint": tag}}, out / "mae_st.pth")
    return out


def load_exported(path: str | os.PathLike, device: str = "cpu") -> torch.nn.Module:
    """Rebuild the MAE from an export folder (strict: any key or shape mismatch is listed)."""
    from safetensors.torch import load_file

    from mae_scale.model.convert import load_state_dict_strict
    from mae_scale.model.mae import MaskedAutoencoderViT

    path = Path(path)
    info = json.loads((path / "model_config.json").read_text())
    model = MaskedAutoencoderViT(**info["model_kwargs"])
    load_state_dict_strict(model, load_file(str(path / "mae.safetensors"), device="cpu"))
    return model.to(device)
