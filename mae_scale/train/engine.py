"""Model + optimizer + schedule wrapped by DeepSpeed, with the DeepSpeed JSON derived from the run config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from mae_scale.config import Config, ConfigError
from mae_scale.train.schedule import lr_at, peak_lr

# Keys the run config owns: a ds_configs/ file that sets one of them differently is an error.
OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)


def resolve_precision(cfg: Config) -> str:
    """bf16 where the hardware runs it fast (CUDA with bf16, a CPU with AMX-BF16), else fp32.

    AVX512-BF16 alone is not enough: on such a CPU a ViT-B step measured 1.9x slower in bf16 than
    in fp32 (BENCHMARKS.md). `train.precision=bf16` still forces it.
    """
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        return "fp32"
    return "bf16" if "amx_bf16" in flags else "fp32"


def clips_per_micro_step(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.data.repeats


def build_ds_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """Read ds_configs/<file> and fill batch, accumulation, precision and clipping from `cfg`."""
    path = cfg.deepspeed_config_path
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed.config={cfg.deepspeed.config!r}: cannot read {path}: {e}") from None
    micro = clips_per_micro_step(cfg)
    wanted = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": micro * cfg.train.grad_accum * world_size,
        "gradient_clipping": cfg.train.grad_clip,
    }
    conflicts = [
        f"{k}={ds[k]!r} (run config gives {v!r})" for k, v in wanted.items() if k in ds and ds[k] != v
    ]
    precision = resolve_precision(cfg)
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if enabled and key != precision:
            conflicts.append(f"{key}.enabled=true (run precision is {precision}; set train.precision)")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            conflicts.append(f"{key} block (optim.* and schedule.* configure it; remove it from the file)")
    if conflicts:
        raise ConfigError(
            f"deepspeed.config={cfg.deepspeed.config!r} ({path}) disagrees with the run config: "
            + "; ".join(conflicts)
        )
    ds.update(wanted)
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """Constructor arguments of MaskedAutoencoderViT for this run (saved beside every export)."""
    from mae_scale.model.presets import ARCHS

    m, d = cfg.model, cfg.data
    return dict(
        ARCHS[m.preset],
        img_size=d.size,
        num_frames=d.num_frames,
        t_patch_size=m.t_patch_size,
        pred_t_dim=m.pred_t_dim,
        mask_type=m.mask_type,
        mask_ratio=m.mask_ratio,
        cls_embed=m.cls_embed,
        norm_pix_loss=m.norm_pix_loss,
        attention=m.attention,
    )


def build_model(cfg: Config, ds: dict, seed: int) -> torch.nn.Module:
    """Build the MAE; under ZeRO-3 inside zero.Init so no rank ever holds the whole model.

    Weights are initialized one module at a time, gathered and written by rank 0, because zero.Init
    partitions each submodule as it is built and a whole-model init afterwards would see empty
    tensors (DeepSpeed #2650). Without ZeRO-3 the same seed gives every rank the same weights.
    """
    import deepspeed

    from mae_scale.model.checkpointing import apply_activation_checkpointing
    from mae_scale.model.mae import MaskedAutoencoderViT, init_module_

    stage3 = zero_stage(ds) == 3
    # dtype=None: DeepSpeed follows the config's bf16 flag (a dtype passed is ignored on CPUs without fp16)
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=stage3, dtype=None):
        model = MaskedAutoencoderViT(**model_kwargs(cfg))
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=stage3):
            init_module_(module)
    torch.random.set_rng_state(rng)
    if cfg.model.checkpoint_activations:
        apply_activation_checkpointing(model, every=cfg.model.checkpoint_activations)
    return model


def no_decay(name: str, shape: torch.Size) -> bool:
    """MAE-ST: no weight decay on norms, biases, position tables and tokens."""
    return len(shape) < 2 or "pos_embed" in name or name.endswith("token")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, skip = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions flatten p; ds_shape is the real one
        (skip if no_decay(name, shape) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


@dataclass
class Built:
    engine: Any  # deepspeed.DeepSpeedEngine
    ds_config: dict
    precision: str
    peak_lr: float
    clips_per_step: int  # over all ranks and accumulation micro-steps


def build_engine(cfg: Config, world_size: int, load_universal: bool = False) -> Built:
    """`load_universal`: the checkpoint to resume was written by another world size (see universal.py)."""
    import deepspeed

    ds = build_ds_config(cfg, world_size)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    model = build_model(cfg, ds, cfg.seed)
    clips_per_step = ds["train_batch_size"]
    lr = peak_lr(cfg.optim.base_lr, clips_per_step)
    groups = param_groups(model, cfg.optim.weight_decay)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"
    if offload:  # ZeRO offload runs the update on the CPU: DeepSpeed's vectorized CPU Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=lr, betas=cfg.optim.betas, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.optim.betas)

    def schedule(opt):
        def factor(step: int) -> float:
            return (
                lr_at(
                    step,
                    peak_lr=lr,
                    warmup_steps=cfg.schedule.warmup_steps,
                    total_steps=cfg.train.steps,
                    min_lr=cfg.optim.min_lr,
                )
                / lr
            )

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds)
    return Built(
        engine=engine,
        ds_config=ds,
        precision="bf16" if ds["bf16"]["enabled"] else "fp32",
        peak_lr=lr,
        clips_per_step=clips_per_step,
    )
