#!/usr/bin/env python
"""Labelled reconstruction picture of a run's checkpoint (or an export): original / masked input /
reconstruction of a few clips, with their sample keys, the step, the mask and the frame indices.

python tools/visualize.py runs/demo [--step N] [--out runs/demo/reconstruction_step_N.png]
python tools/visualize.py runs/demo/export/step_00000300 --shards shards/demo
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run folder, or an export folder (with model_config.json)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: newest)")
    p.add_argument(
        "--shards", default=None, help="shards to draw clips from (default: the run's data.shards)"
    )
    p.add_argument("--clips", type=int, default=4, help="clips to draw, one per video")
    p.add_argument("--seed", type=int, default=0, help="seed of the clips and of the mask")
    p.add_argument("--out", default=None, help="PNG path")
    args = p.parse_args(argv)

    import json

    import torch

    from mae_scale.config import Config
    from mae_scale.data.loader import build_loader
    from mae_scale.model.convert import load_state_dict_strict
    from mae_scale.model.mae import MaskedAutoencoderViT
    from mae_scale.train.batch import normalize_clips
    from mae_scale.train.engine import model_kwargs
    from mae_scale.viz import reconstruction_picture, save_png

    path = Path(args.path)
    if (path / "model_config.json").is_file():  # an export
        from mae_scale.export import load_exported

        info = json.loads((path / "model_config.json").read_text())
        cfg = Config.from_dict(info["run_config"])
        model, tag = load_exported(path), info["checkpoint"]
        default_out = path / "reconstruction.png"
    else:
        from mae_scale.export import consolidated_state_dict

        try:
            sd, cfg, tag = consolidated_state_dict(path, args.step)
        except FileNotFoundError as e:
            print(f"visualize: {e}", file=sys.stderr)
            return 1
        model = MaskedAutoencoderViT(**model_kwargs(cfg))
        load_state_dict_strict(model, sd)
        default_out = path / f"reconstruction_{tag}.png"
    if args.shards:
        cfg.data.shards = args.shards
    cfg.data.workers, cfg.data.repeats = 0, 1  # one clip per video: R crops of one window look alike
    loader = build_loader(cfg.data, batch_size=args.clips, seed=args.seed, rank=0, world_size=1)
    batch = next(iter(loader))
    imgs = normalize_clips(batch["clips"], cfg.data.mean, cfg.data.std, torch.float32)
    step = int(tag.rsplit("_", 1)[1])  # step_00000300
    picture = reconstruction_picture(model, imgs, cfg, keys=batch["keys"], step=step, seed=args.seed)
    out = save_png(picture, args.out or default_out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
