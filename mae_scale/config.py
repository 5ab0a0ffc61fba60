"""One typed run config: dataclasses loaded from a preset or YAML, overridden by `key.sub=value`.

Every field has a default and a one-line reason. `validate()` checks everything in one place and
raises one `ConfigError` listing every problem, each naming the key, the bad value and what is
allowed, so a bad run fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
DEMO_SHARDS = "shards/demo"  # built from real clips on first use (mae_scale.data.demo)

MASK_TYPES = ("random", "tube", "frame", "cube")
DECODER_MASK_TYPES = ("running_cell", "random")
ATTENTION_BACKENDS = ("auto", "xformers", "sdpa", "math")
MODEL_PRESETS = ("tiny", "vit_b", "vit_l", "vit_h", "vit_g", "vit_2b")
SHORT_VIDEO_POLICIES = ("stride", "loop", "skip")
REPEAT_SPANS = ("video", "clip")
RESHARD_POLICIES = ("exact", "replay", "skip")
WANDB_MODES = ("offline", "online", "off")
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A bad config: the message names every bad key, its value and what is allowed."""


@dataclass
class RunConfig:
    name: str = "demo"  # run folder name under runs/
    dir: str = ""  # run folder; empty means runs/<name>


@dataclass
class ModelConfig:
    preset: str = "vit_l"  # architecture size, see mae_scale.model.presets
    mask_type: str = "random"  # random (agnostic) | tube | frame | cube
    mask_ratio: float = 0.9  # MAE-ST's optimum for video
    decoder_mask_ratio: float = 0.0  # dual masking: share of all tokens the decoder drops (0: off, MAE-ST)
    decoder_mask_type: str = "running_cell"  # VideoMAE V2's (ratio 0.25, 0.5 or 0.75) | random
    attention: str = "auto"  # auto: xformers on CUDA when installed, else SDPA
    checkpoint_activations: int = 0  # 0: none, 1: every block, k: every k-th block
    pred_t_dim: int = 8  # target frames predicted (of data.num_frames), as mae_st
    t_patch_size: int = 2  # frames per spacetime patch
    cls_embed: bool = True  # class token, as mae_st's pretraining script
    norm_pix_loss: bool = True  # per-patch normalized pixel targets


@dataclass
class DataConfig:
    shards: str = "shards/demo"  # folder with manifest.json (or a manifest path/URL)
    num_frames: int = 16  # frames per clip (T)
    stride: int = 4  # temporal sampling stride in frames
    size: int = 224  # crop side in pixels
    repeats: int = 4  # clips per decoded video (repeated sampling)
    repeat_span: str = "clip"  # one window decoded, R crops of it | "video": R independent times (mae_st)
    workers: int = 2  # DataLoader worker processes per rank
    shuffle_buffer: int = 64  # block of a stream's samples shuffled together (plan.py's block shuffle)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop relative area
    crop_aspect: tuple[float, float] = (0.75, 1.3333)  # random resized crop aspect ratio
    flip: bool = True  # random horizontal flip
    short_video: str = "stride"  # too few frames: smaller stride | loop | skip
    max_pixels: int = 4096 * 2160  # reject videos larger than this per frame (memory guard)
    min_side: int = 32  # reject videos smaller than this
    max_bad_ratio: float = 0.1  # stop the run when more than this share of samples is bad
    mean: tuple[float, float, float] = (0.45, 0.45, 0.45)  # normalization, applied on device
    std: tuple[float, float, float] = (0.225, 0.225, 0.225)


@dataclass
class TrainConfig:
    steps: int = 100_000  # optimizer steps (fixed count on every rank: no collective hangs)
    batch_size: int = 8  # videos per rank per micro-step, before repeats
    grad_accum: int = 1  # micro-steps per optimizer step
    global_batch_size: int = 0  # if > 0: videos per optimizer step over all ranks; sets batch_size
    precision: str = "auto"  # auto: bf16 where the hardware runs it fast (GPU, AMX CPU), else fp32
    grad_clip: float = 0.02  # mae_st's clip for ViT-L
    max_nonfinite_steps: int = 20  # consecutive non-finite steps before the run stops


@dataclass
class OptimConfig:
    base_lr: float = 1.6e-3  # lr = base_lr * effective_batch / 256
    weight_decay: float = 0.05  # not on norms, biases, position tables and tokens
    betas: tuple[float, float] = (0.9, 0.95)
    min_lr: float = 0.0  # floor of the cosine


@dataclass
class ScheduleConfig:
    warmup_steps: int = 2000  # linear warmup, then half-cosine to min_lr


@dataclass
class CheckpointConfig:
    every_steps: int = 1000  # save every N optimizer steps
    every_minutes: float = 60.0  # ... or every M minutes, whichever first (0: off)
    keep: int = 3  # newest checkpoints kept
    # resuming on another world size (or data.workers): "exact" continues the unfinished epoch, every
    # sample once; or restart at an epoch boundary: "replay" the epoch the slowest old stream was in
    # (nothing skipped), "skip" to the first epoch no stream had started (nothing repeated)
    reshard_data: str = "exact"


@dataclass
class LogConfig:
    every_steps: int = 10  # metrics cadence (each log syncs the device)
    wandb: str = "offline"  # offline | online | off
    wandb_project: str = "mae-scale"
    image_every_steps: int = 0  # also draw RUN/images/step_N.png every N steps (0: only at the end)
    peak_tflops: float = 0.0  # device peak for MFU; 0: datasheet value, or a measured matmul on CPU
    # write each micro-batch's sample keys to RUN/samples_rank<r>.jsonl, one line per batch:
    # {"step": optimizer steps done before it (0 for the first), "keys": [...], "skipped": bool}
    sample_keys: bool = False


@dataclass
class DeepSpeedConfig:
    config: str = "zero3.json"  # file in ds_configs/ (or a path)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or os.path.join("runs", self.run.name))

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, config: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """Build from a preset name or a YAML path, then apply `key.sub=value` overrides."""
        cfg = cls.from_dict(_read_yaml(resolve_config_path(config)))
        for item in overrides:
            key, value = parse_override(item)
            _apply_mapping(cfg, _nest(key, value), prefix="")
        return cfg

    @classmethod
    def from_dict(cls, mapping: dict) -> Config:
        cfg = cls()
        _apply_mapping(cfg, mapping, prefix="")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        """The resolved config as YAML, fields in declaration order (what `save` writes)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)

    # --------------------------------------------------------------- validation

    def validate(self, world_size: int | None = None, check_paths: bool = True) -> Config:
        """Check every field; raise one ConfigError listing every problem."""
        errors: list[str] = []

        def bad(key: str, value: Any, allowed: str) -> None:
            errors.append(f"{key}={value!r}: {allowed}")

        def choice(key: str, value: Any, options: tuple[str, ...]) -> None:
            if value not in options:
                hint = difflib.get_close_matches(str(value), options, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                bad(key, value, f"must be one of {', '.join(options)}{extra}")

        def positive(key: str, value: float, zero_ok: bool = False) -> None:
            if value < 0 or (value == 0 and not zero_ok):
                bad(key, value, "must be >= 0" if zero_ok else "must be > 0")

        m, d, t = self.model, self.data, self.train
        if not self.run.name or "/" in self.run.name:
            bad("run.name", self.run.name, "must be a non-empty name without '/'")
        choice("model.preset", m.preset, MODEL_PRESETS)
        choice("model.mask_type", m.mask_type, MASK_TYPES)
        choice("model.attention", m.attention, ATTENTION_BACKENDS)
        if not 0.0 <= m.mask_ratio < 1.0:
            bad("model.mask_ratio", m.mask_ratio, "must be in [0, 1)")
        choice("model.decoder_mask_type", m.decoder_mask_type, DECODER_MASK_TYPES)
        if not 0.0 <= m.decoder_mask_ratio < 1.0:
            bad("model.decoder_mask_ratio", m.decoder_mask_ratio, "must be in [0, 1) (0: off)")
        if m.mask_type == "frame" and d.num_frames % m.t_patch_size == 0:
            slices = d.num_frames // m.t_patch_size
            if int(slices * (1 - m.mask_ratio)) < 1:
                bad(
                    "model.mask_ratio",
                    m.mask_ratio,
                    f"with model.mask_type='frame' must keep at least one of "
                    f"{slices} time slices: at most {1 - 1 / slices:.4g}",
                )
        positive("model.checkpoint_activations", m.checkpoint_activations, zero_ok=True)
        positive("model.t_patch_size", m.t_patch_size)
        positive("model.pred_t_dim", m.pred_t_dim)
        positive("data.num_frames", d.num_frames)
        positive("data.stride", d.stride)
        positive("data.size", d.size)
        positive("data.repeats", d.repeats)
        positive("data.workers", d.workers, zero_ok=True)
        positive("data.shuffle_buffer", d.shuffle_buffer, zero_ok=True)
        choice("data.short_video", d.short_video, SHORT_VIDEO_POLICIES)
        choice("data.repeat_span", d.repeat_span, REPEAT_SPANS)
        if not 0.0 <= d.max_bad_ratio <= 1.0:
            bad("data.max_bad_ratio", d.max_bad_ratio, "must be in [0, 1]")
        if not 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0:
            bad("data.crop_scale", list(d.crop_scale), "must be (lo, hi) with 0 < lo <= hi <= 1")
        if not 0.0 < d.crop_aspect[0] <= d.crop_aspect[1]:
            bad("data.crop_aspect", list(d.crop_aspect), "must be (lo, hi) with 0 < lo <= hi")
        if len(d.mean) != 3 or len(d.std) != 3 or min(d.std) <= 0:
            bad("data.mean/std", (d.mean, d.std), "must be 3 values each, std > 0")
        if d.num_frames % m.t_patch_size:
            bad("data.num_frames", d.num_frames, f"must be a multiple of model.t_patch_size={m.t_patch_size}")
        elif m.pred_t_dim > d.num_frames or (m.t_patch_size * m.pred_t_dim) % d.num_frames:
            bad(
                "model.pred_t_dim",
                m.pred_t_dim,
                f"must be <= data.num_frames={d.num_frames} and t_patch_size*pred_t_dim "
                f"a multiple of num_frames (each token predicts whole frames)",
            )
        if m.preset in MODEL_PRESETS:
            patch = _patch_size(m.preset)
            if d.size % patch:
                bad("data.size", d.size, f"must be a multiple of the patch size {patch} of {m.preset}")
            elif (
                0.0 < m.decoder_mask_ratio < 1.0
                and m.decoder_mask_type in DECODER_MASK_TYPES
                and m.mask_type in MASK_TYPES
                and 0.0 <= m.mask_ratio < 1.0
                and m.t_patch_size > 0
                and d.num_frames % m.t_patch_size == 0
            ):
                grid = (d.num_frames // m.t_patch_size, d.size // patch, d.size // patch)
                problem = _decoder_mask_problem(m, grid)
                if problem:
                    bad("model.decoder_mask_ratio", m.decoder_mask_ratio, problem)
        positive("train.steps", t.steps)
        positive("train.batch_size", t.batch_size)
        positive("train.grad_accum", t.grad_accum)
        positive("train.global_batch_size", t.global_batch_size, zero_ok=True)
        choice("train.precision", t.precision, PRECISIONS)
        positive("train.grad_clip", t.grad_clip, zero_ok=True)
        positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
        if t.global_batch_size and world_size:
            per_rank, rest = divmod(t.global_batch_size, world_size * t.grad_accum)
            if rest or per_rank == 0:
                bad(
                    "train.global_batch_size",
                    t.global_batch_size,
                    f"must divide across {world_size} ranks x {t.grad_accum} grad_accum micro-steps",
                )
        positive("optim.base_lr", self.optim.base_lr)
        positive("optim.weight_decay", self.optim.weight_decay, zero_ok=True)
        if not all(0.0 <= b < 1.0 for b in self.optim.betas) or len(self.optim.betas) != 2:
            bad("optim.betas", list(self.optim.betas), "must be two values in [0, 1)")
        positive("schedule.warmup_steps", self.schedule.warmup_steps, zero_ok=True)
        positive("checkpoint.every_steps", self.checkpoint.every_steps, zero_ok=True)
        positive("checkpoint.every_minutes", self.checkpoint.every_minutes, zero_ok=True)
        positive("checkpoint.keep", self.checkpoint.keep)
        choice("checkpoint.reshard_data", self.checkpoint.reshard_data, RESHARD_POLICIES)
        positive("log.every_steps", self.log.every_steps)
        positive("log.image_every_steps", self.log.image_every_steps, zero_ok=True)
        choice("log.wandb", self.log.wandb, WANDB_MODES)
        if check_paths:
            ds_path = self.deepspeed_config_path
            if not ds_path.is_file():
                available = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))
                hint = difflib.get_close_matches(self.deepspeed.config, available, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                bad(
                    "deepspeed.config",
                    self.deepspeed.config,
                    f"no such file {ds_path}; available in ds_configs/: {', '.join(available)}{extra}",
                )
            manifest = self.manifest_path
            if manifest is not None and not manifest.is_file() and d.shards != DEMO_SHARDS:
                bad(
                    "data.shards",
                    d.shards,
                    f"no manifest.json at {manifest} (build shards with "
                    "tools/make_shards.py INPUT --out DIR)",
                )
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return self

    @property
    def deepspeed_config_path(self) -> Path:
        path = Path(self.deepspeed.config)
        return path if path.is_absolute() or path.parent != Path(".") else DS_CONFIG_DIR / path

    @property
    def manifest_path(self) -> Path | None:
        """Local manifest path, or None for a remote manifest (a URL) that cannot be checked here."""
        shards = self.data.shards
        if "://" in shards or shards.startswith("pipe:"):
            return None
        path = Path(shards)
        return path if path.suffix == ".json" else path / "manifest.json"


def _decoder_mask_problem(m: ModelConfig, grid: tuple[int, int, int]) -> str | None:
    """Why the model would refuse this dual-masking setting (its own message), or None."""
    from mae_scale.model.masking import num_decoder_dropped, num_visible

    try:
        n_visible = num_visible(m.mask_type, grid, m.mask_ratio)
    except ValueError:
        return None  # an encoder-mask problem: reported under model.mask_ratio, or by the model
    try:
        num_decoder_dropped(m.decoder_mask_type, grid, m.decoder_mask_ratio, n_visible)
    except ValueError as err:
        return f"{err} (model.mask_type={m.mask_type!r}, model.mask_ratio={m.mask_ratio}, grid {grid})"
    return None


def _patch_size(preset: str) -> int:
    from mae_scale.model.presets import ARCHS

    return int(ARCHS[preset]["patch_size"])


def resolve_config_path(config: str) -> Path:
    """A bundled preset name (`demo`, `vit_l`, ...) or a path to a YAML file."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config {config!r}: no such file")
        return path
    preset = PRESET_DIR / f"{config}.yaml"
    if not preset.is_file():
        names = list_presets()
        hint = difflib.get_close_matches(config, names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"--config {config!r}: not a preset ({', '.join(names)}) nor a YAML file{extra}")
    return preset


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


class _Raw(str):
    """An override's text: parsed by the type of the field it sets (so `log.wandb=off` stays a string)."""


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", raw text); the field's type parses it (YAML for numbers, bools, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or key != key.strip():
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    return key, _Raw(raw)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _nest(key: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _apply_mapping(obj: Any, mapping: dict, prefix: str) -> None:
    """Set fields of dataclass `obj` from `mapping`, coercing types; unknown keys say 'did you mean'."""
    hints = get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            extra = f"; did you mean {prefix + hint[0]!r}?" if hint else f"; known: {', '.join(names)}"
            raise ConfigError(f"unknown config key {full!r}{extra}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                value = str(value) if isinstance(value, _Raw) else value
                raise ConfigError(f"{full}={value!r}: is a section; set its keys, e.g. {full}.<key>=...")
            _apply_mapping(current, value, prefix=f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if isinstance(value, _Raw):
        if typ is str:
            return str(value)
        try:
            value = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}={str(value)!r}: not a valid value ({e})") from None
    origin = get_origin(typ)
    if origin is tuple:
        args = get_args(typ)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(
                f"{key}={value!r}: expected a list of {len(args)} values, e.g. [{', '.join('x' * len(args))}]"
            )
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r}: expected a number")
        return float(value)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    raise TypeError(f"config field {key} has an unsupported type {typ}")


def _plain(value: Any) -> Any:
    """Tuples -> lists so the YAML is plain and safe_load-able."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
