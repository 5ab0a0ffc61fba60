"""Checkpoints: save (all ranks, same step), atomic `latest`, retention, validation and fallback on load.

Layout under RUN/checkpoints/:
  step_00001000/            DeepSpeed's files (model, optimizer and schedule shards of every rank)
  step_00001000/rank_00000.json   per-rank state: data position, counters (JSON, never pickled)
  step_00001000/rank_00000_rng.pt per-rank RNG states (tensors only: loaded with weights_only=True)
  step_00001000/complete.json     written by rank 0 after every rank finished: step, world size, files
  latest                    the tag of the newest complete checkpoint, replaced atomically
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_scale.train import dist as D

TAG_RE = re.compile(r"^step_(\d{8})$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {
        "python": _py_rng_to_tensors(random.getstate()),
        "numpy": _np_rng_to_tensors(np.random.get_state()),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_py_rng_from_tensors(state["python"]))
    np.random.set_state(_np_rng_from_tensors(state["numpy"]))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _py_rng_to_tensors(state: tuple) -> dict:
    version, internal, gauss = state
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss": [] if gauss is None else [gauss],
    }


def _py_rng_from_tensors(d: dict) -> tuple:
    return (
        d["version"],
        tuple(int(x) for x in d["internal"].tolist()),
        (d["gauss"][0] if d["gauss"] else None),
    )


def _np_rng_to_tensors(state: tuple) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _np_rng_from_tensors(d: dict) -> tuple:
    return d["name"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"]


def resume_source(checkpoints: Path, resume: str | None) -> tuple[Path, str | None]:
    """(checkpoints folder, tag) that `--resume` names: a path is another run's checkpoint folder;
    a tag (or None: the newest usable) is one of `checkpoints`."""
    if resume is not None and os.sep in resume:
        return Path(resume).parent, Path(resume).name
    return Path(checkpoints), resume


class Checkpointer:
    """Saves and restores a run. Every call is collective: every rank calls it at the same step."""

    def __init__(self, root: Path, *, keep: int, rank: int, world_size: int, log=print):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.log = log

    # ------------------------------------------------------------------ save

    def save(self, engine, step: int, rank_state: dict[str, Any], config_yaml: str = "") -> Path:
        """All ranks: DeepSpeed's shards, then each rank's state, then (rank 0) complete.json and `latest`."""
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0 and path.exists():  # a torn earlier attempt at this step
            shutil.rmtree(path)
        D.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        _write_json(
            path / f"rank_{self.rank:05d}.json", {"version": FORMAT_VERSION, "step": step, **rank_state}
        )
        torch.save(rng_state(), path / f"rank_{self.rank:05d}_rng.pt")
        if self.rank == 0 and config_yaml:  # the resolved config travels with the weights
            _write_text_atomic(path / "config.yaml", config_yaml)
        D.barrier()  # every rank has written everything
        if self.rank == 0:
            files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
            _write_json(
                path / "complete.json",
                {"version": FORMAT_VERSION, "step": step, "world_size": self.world_size, "files": files},
            )
            _write_text_atomic(self.root / "latest", tag)
            self._rotate()
        D.barrier()
        return path

    def _rotate(self) -> None:
        tags = self.tags()
        complete = [t for t in tags if (self.root / t / "complete.json").exists()]
        keep = set(complete[-self.keep :])
        newest_complete = complete[-1] if complete else None
        for t in tags:
            incomplete_old = t not in complete and newest_complete is not None and t < newest_complete
            if (t in complete and t not in keep) or incomplete_old:
                shutil.rmtree(self.root / t, ignore_errors=True)

    # ------------------------------------------------------------------ find

    def tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name))

    def problems(self, tag: str) -> list[str]:
        """Why checkpoint `tag` cannot be used (empty list: looks complete)."""
        path = self.root / tag
        if not path.is_dir():
            return [f"{path} does not exist"]
        info_path = path / "complete.json"
        if not info_path.is_file():
            return [f"{path} is incomplete: no complete.json (the save was interrupted)"]
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return [f"{info_path} unreadable: {e}"]
        out = []
        for name, size in info.get("files", {}).items():
            f = path / name
            if not f.is_file():
                out.append(f"{f} is missing")
            elif f.stat().st_size != size:
                out.append(f"{f} has {f.stat().st_size} bytes, expected {size} (truncated or changed)")
        return out

    def candidates(self, explicit: str | None = None) -> list[str]:
        """Tags to try, newest first: `latest` (if it names a checkpoint), then every other complete one."""
        if explicit is not None:
            return [explicit]
        order: list[str] = []
        latest = self.root / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (self.root / tag).is_dir():
                self.log(f"[checkpoint] {latest} points to {tag!r}, which does not exist; using older ones")
            else:
                order.append(tag)
        order += [t for t in reversed(self.tags()) if t not in order]
        return order

    def peek(self, explicit: str | None = None) -> tuple[str, int] | None:
        """(tag, world size that wrote it) of the checkpoint `load` will try first; no collectives."""
        for tag in self.candidates(explicit):
            if not self.problems(tag):
                return tag, int(self.info(tag)["world_size"])
        return None

    def info(self, tag: str) -> dict[str, Any]:
        return json.loads((self.root / tag / "complete.json").read_text())

    # ------------------------------------------------------------------ load

    def load(self, engine, explicit: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """Load the newest usable checkpoint into `engine`; returns (tag, this rank's state) or None.

        Damaged checkpoints are reported and skipped; every rank takes the same decision.
        """
        for tag in self.candidates(explicit):
            problems = self.problems(tag) if self.rank == 0 else []
            problems = D.broadcast_object(problems)
            if problems:
                self.log(f"[checkpoint] skipping {tag}: " + "; ".join(problems))
                continue
            ok, state, error = True, None, ""
            try:
                info = self.info(tag)
                universal = info["world_size"] != self.world_size
                load_dir = self._universal(tag) if universal else self.root
                load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=True)
                if load_path is None:
                    raise CheckpointError(f"DeepSpeed could not load {self.root / tag}")
                state = self._rank_state(tag, info)
            except Exception as e:  # report and fall back: a bad file must not end a 2-week run
                ok, error = False, f"{type(e).__name__}: {e}"
            all_ok = D.all_reduce_sum([0.0 if ok else 1.0])[0] == 0
            if all_ok:
                return tag, state
            self.log(
                f"[checkpoint] {tag} unreadable on some rank ({error or 'see that rank'}); "
                "trying an older one"
            )
        return None

    def _rank_state(self, tag: str, info: dict) -> dict[str, Any]:
        path = self.root / tag
        same_world = info["world_size"] == self.world_size
        mine = path / f"rank_{self.rank:05d}.json"
        if same_world:
            state = json.loads(mine.read_text())
            # applied by the caller just before the first step: startup work draws random numbers too
            state["rng"] = torch.load(path / f"rank_{self.rank:05d}_rng.pt", weights_only=True)
        else:  # different world size: every old rank's state, for the loader to find a safe point
            state = {
                "step": info["step"],
                "other_world": [
                    json.loads((path / f"rank_{r:05d}.json").read_text()) for r in range(info["world_size"])
                ],
            }
        if state.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise CheckpointError(f"{mine}: format version {state.get('version')} != {FORMAT_VERSION}")
        return state

    def rank_states(self, tag: str) -> list[dict[str, Any]]:
        """Every rank's saved state (data position, counters) of checkpoint `tag`, rank order."""
        path = self.root / tag
        return [
            json.loads((path / f"rank_{r:05d}.json").read_text()) for r in range(self.info(tag)["world_size"])
        ]

    def _universal(self, tag: str) -> Path:
        """Convert a ZeRO checkpoint to DeepSpeed's universal format (once), for a new world size."""
        out = self.root / "universal"
        if self.rank == 0 and not (out / tag / "zero").is_dir():
            from mae_scale.train.universal import convert_to_universal

            convert_to_universal(self.root / tag, out / tag)
        D.barrier()
        return out


def _write_json(path: Path, obj: Any) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
