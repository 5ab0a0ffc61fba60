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


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def auto_precision() -> str:
    """bf16 where the hardware runs it fast (CUDA with bf16, a CPU with AMX-BF16), else fp32.

    Measured on CPUs without AMX, a ViT-B step is slower in bf16 than in fp32: 1.9x on an Intel Xeon
    with AVX512-BF16, more on an AMD EPYC with AVX2 only (BENCHMARKS.md, "precision on CPU").
    """
    from mae_scale import hardware

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if "amx_bf16" in hardware.cpu_flags() and hardware.accelerator_answers()["bf16"]:
        return "bf16"
    return "fp32"


def resolve_precision(cfg: Config) -> str:
    """The run's precision; `train.precision=bf16` forces bf16 wherever the device has it at all."""
    if cfg.train.precision == "auto":
        return auto_precision()
    if cfg.train.precision == "bf16":
        from mae_scale import hardware

        answers = hardware.accelerator_answers()
        if not answers["bf16"]:
            raise ConfigError(
                f"train.precision='bf16': the {answers['name']} accelerator reports no bf16 support "
                "(DeepSpeed would refuse it); use train.precision=fp32 or auto"
            )
    return cfg.train.precision


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
    # dtype=None: zero.Init then takes the dtype from the config's bf16 flag. A dtype passed in is
    # ignored on an accelerator that reports no fp16 (DeepSpeed 0.19.8 `_set_dtype` parses
    # `dtype or fp16 if fp16_ok else bf16 ...` as `(dtype or fp16) if fp16_ok else bf16`), which built
    # bf16 parameters for fp32 runs on AMD CPUs. check_dtypes() below catches any such surprise.
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


class PrecisionError(RuntimeError):
    """Parameters in another dtype than the run's precision: the message names one and the cause."""


def check_dtypes(engine: Any, precision: str) -> None:
    """Stop before the first step if any parameter (or its ZeRO-3 partition) is not in `precision`.

    Without this, a dtype DeepSpeed picked on its own surfaces as a crash deep inside conv3d
    ("Input type (float) and bias type (c10::BFloat16) should be the same") at the first step.
    """
    want = PRECISION_DTYPES[precision]
    wrong = [
        (name, t.dtype)
        for name, p in engine.module.named_parameters()
        for t in (p, getattr(p, "ds_tensor", p))
        if t.dtype != want
    ]
    if wrong:
        name, got = wrong[0]
        raise PrecisionError(
            f"parameter {name!r} is {got}, but train.precision resolved to {precision} ({want}); "
            f"{len({n for n, _ in wrong})} parameters differ. DeepSpeed chose the dtype itself: zero.Init "
            "and the engine follow the accelerator's capability answers (python -m mae_scale.hardware "
            "prints them) and the config's bf16/fp16 flags; check ds_configs and train.precision."
        )


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
    precision = "bf16" if ds["bf16"]["enabled"] else "fp32"
    check_dtypes(engine, precision)
    return Built(
        engine=engine,
        ds_config=ds,
        precision=precision,
        peak_lr=lr,
        clips_per_step=clips_per_step,
    )
