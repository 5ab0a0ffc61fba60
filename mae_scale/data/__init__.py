"""Video data: shard format and manifest (`shards`), PyAV decoding (`decode`, `encode`), clip sampling
and augmentation (`transforms`), the per-worker stream (`stream`) and the resumable loader (`loader`).

Import the submodule you need (`from mae_scale.data.loader import build_loader`); this package
imports nothing itself, so shard-writer worker processes start without torch.
"""
