"""Entry point: `python -m mae_scale.pretrain --config demo key.sub=value ...`, or under `deepspeed`.

Parse, validate (before any work), build, train, close. Everything else lives in mae_scale/train/.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mae_scale.config import DEMO_SHARDS, Config, ConfigError
from mae_scale.hardware import HostError, require_shared_memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mae_scale.pretrain", description=__doc__)
    p.add_argument("--config", required=True, help="preset name (demo, vit_b, vit_l, ...) or a YAML path")
    p.add_argument(
        "--resume",
        default="auto",
        help="auto: continue from RUN/checkpoints/latest if present; none: start fresh; "
        "or a checkpoint tag/path",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="with --resume none: allow an existing run folder"
    )
    p.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_hint = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = Config.load(args.config, args.overrides)
        if cfg.train.global_batch_size:
            cfg.validate(world_size=world_hint)
            cfg.train.batch_size = cfg.train.global_batch_size // (world_hint * cfg.train.grad_accum)
        cfg.validate(world_size=world_hint)
        from mae_scale.train.engine import build_ds_config

        build_ds_config(cfg, world_hint)  # a conflicting DeepSpeed file fails here, before any work
        check_host(cfg)
        resume = _resume_choice(cfg, args)
    except (ConfigError, HostError) as e:
        print(f"mae_scale.pretrain: {e}", file=sys.stderr)
        return 2
    if cfg.data.shards == DEMO_SHARDS:  # the embedded demo set is built from real clips on first use
        from mae_scale.data.demo import ensure_demo_shards

        ensure_demo_shards(DEMO_SHARDS)

    from mae_scale.data.loader import build_loader
    from mae_scale.train import dist as D
    from mae_scale.train.engine import build_engine
    from mae_scale.train.loop import train

    rank, _, world = D.init_distributed()
    D.seed_everything(cfg.seed, rank)
    try:
        if rank == 0:
            cfg.save(cfg.run_dir / "config.yaml")
        built = build_engine(cfg, world, load_universal=_resumes_from_other_world(cfg, resume, world))
        loader = build_loader(
            cfg.data, batch_size=cfg.train.batch_size, seed=cfg.seed, rank=rank, world_size=world
        )
        train(cfg, built, loader, rank=rank, world_size=world, resume=resume)  # ends with its summary
    finally:
        D.shutdown()
    return 0


def check_host(cfg: Config) -> None:
    """What the config needs of this machine, checked before any work: the node's /dev/shm holds
    the loader batches of all its ranks (LOCAL_WORLD_SIZE from torchrun, LOCAL_SIZE from deepspeed)."""
    from mae_scale.data.loader import shared_memory_per_rank

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    need = local_ranks * shared_memory_per_rank(cfg.data, cfg.train.batch_size)
    require_shared_memory(need, f"{local_ranks} rank(s) x data.workers={cfg.data.workers} loader workers")


def _resumes_from_other_world(cfg: Config, resume: str | None, world: int) -> bool:
    from mae_scale.train.checkpoint import Checkpointer, resume_source

    if resume == "none":
        return False
    root, tag = resume_source(cfg.run_dir / "checkpoints", resume)
    found = Checkpointer(root, keep=1, rank=0, world_size=world).peek(tag)
    return found is not None and found[1] != world


def _resume_choice(cfg: Config, args: argparse.Namespace) -> str | None:
    """auto -> None (newest usable); none -> "none" (refuses an existing run unless --overwrite);
    else a tag of this run or a checkpoint folder path."""
    ckpt_dir = cfg.run_dir / "checkpoints"
    if args.resume == "auto":
        return None
    if args.resume == "none":
        if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not args.overwrite:
            raise ConfigError(
                f"--resume none: {cfg.run_dir} already holds checkpoints; pass --overwrite to start "
                "over in it, or choose another run.name"
            )
        if ckpt_dir.exists() and args.overwrite and int(os.environ.get("RANK", "0")) == 0:
            import shutil

            shutil.rmtree(ckpt_dir)
        return "none"
    if (ckpt_dir / args.resume).is_dir():  # a tag of this run
        return args.resume
    path = Path(args.resume).resolve()
    if not (path / "complete.json").is_file():
        raise ConfigError(
            f"--resume {args.resume!r}: neither a checkpoint tag in {ckpt_dir} nor a complete "
            "checkpoint folder (one with complete.json)"
        )
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
