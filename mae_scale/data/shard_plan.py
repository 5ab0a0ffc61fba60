"""The plan of a shard build: which input goes into which shard, fixed once, on the driver.

A plan is a pure function of the inputs and the options: inputs sorted, shuffled by the seed, then
cut into shards of `per_shard` inputs each (shard k holds plan inputs k * per_shard ... (k + 1) *
per_shard - 1). So every shard is an independent task that anyone (the local pool, a Ray worker,
a retry, a resumed run) builds to the same bytes, and no shard boundary depends on how large the
encoded videos turn out or on which finished first.

`DIR/plan.json` records it with what decides the output bytes: the options, the versions of the
code that encodes (PyAV, FFmpeg's libraries, mae-scale) and the inputs. A run started again on the
same folder makes its plan anew and compares: any difference refuses the run and is named
(`differences`). Where each input is read (`paths`) is not part of the identity: a dataset mounted
elsewhere resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLAN_NAME = "plan.json"
PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan file that cannot be read, or a run whose plan differs from the folder's."""


def tool_versions() -> dict[str, str]:
    """What encodes and decodes: output bytes are promised equal only for equal versions."""
    import av

    import mae_scale

    versions = {"mae_scale": mae_scale.__version__, "pyav": av.__version__, "ffmpeg": av.ffmpeg_version_info}
    versions.update({lib: ".".join(map(str, v)) for lib, v in sorted(av.library_versions.items())})
    return versions


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Plan:
    kind: str  # "make_shards" or "index_shards"
    options: dict[str, Any]  # everything besides the inputs that decides the output bytes
    versions: dict[str, str]  # tool_versions() of the driver; every task checks its own against them
    inputs: tuple[tuple, ...]  # each input's identity ((source, label) or (shard location,)), plan order
    paths: tuple[str, ...]  # where each input is read (absolute path or URL); not part of the identity
    per_shard: int  # inputs per shard

    @property
    def num_shards(self) -> int:
        return -(-len(self.inputs) // self.per_shard)

    def shard(self, k: int) -> range:
        """Positions (in plan order) of shard k's inputs."""
        return range(k * self.per_shard, min(len(self.inputs), (k + 1) * self.per_shard))

    @property
    def inputs_hash(self) -> str:
        return _digest(self.inputs)

    @property
    def hash(self) -> str:
        """The identity of the whole build: equal hashes, equal output bytes."""
        return _digest([self.kind, self.options, self.versions, self.per_shard, self.inputs_hash])

    def differences(self, old: Plan) -> list[str]:
        """What differs from `old` (a folder's plan), one readable line each."""
        out = []
        for label, a, b in (
            ("kind", old.kind, self.kind),
            ("inputs per shard", old.per_shard, self.per_shard),
        ):
            if a != b:
                out.append(f"{label}: {a!r} -> {b!r}")
        for section, a, b in (
            ("option", old.options, self.options),
            ("version", old.versions, self.versions),
        ):
            for key, x, y in _changed(a, b):
                out.append(f"{section} {key}: {x!r} -> {y!r}")
        if old.inputs_hash != self.inputs_hash:
            before, after = set(old.inputs), set(self.inputs)
            added, removed = sorted(after - before, key=str), sorted(before - after, key=str)
            line = (
                f"inputs: {len(old.inputs)} -> {len(self.inputs)} ({len(added)} added, {len(removed)} removed"
            )
            if added:
                line += f"; e.g. added {added[0][0]!r}"
            if removed:
                line += f"; e.g. removed {removed[0][0]!r}"
            if added or removed:
                out.append(line + ")")
            elif not out:  # the order follows the seed: only worth a line when nothing else explains it
                out.append("inputs: the same, in another order")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "kind": self.kind,
            "hash": self.hash,
            "options": self.options,
            "versions": self.versions,
            "per_shard": self.per_shard,
            "num_shards": self.num_shards,
            "inputs_hash": self.inputs_hash,
            "inputs": [[*row, path] for row, path in zip(self.inputs, self.paths, strict=True)],
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Plan:
        if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
            got = d.get("version") if isinstance(d, dict) else type(d).__name__
            raise PlanError(f"{where}: 'version' is {got!r}, this code reads {PLAN_VERSION}")
        try:
            rows = [list(r) for r in d["inputs"]]
            plan = cls(
                str(d["kind"]),
                dict(d["options"]),
                {str(k): str(v) for k, v in d["versions"].items()},
                tuple(tuple(r[:-1]) for r in rows),
                tuple(str(r[-1]) for r in rows),
                int(d["per_shard"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PlanError(
                f"{where}: needs kind, options, versions, per_shard and inputs ({exc!r})"
            ) from exc
        if plan.per_shard < 1:
            raise PlanError(f"{where}: 'per_shard' must be >= 1, got {plan.per_shard}")
        return plan


def _changed(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _changed(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append((prefix + key, x, y))
    return out


def write_plan(path: Path, plan: Plan) -> None:
    """Atomically, one input per line (a plan can list millions)."""
    d = plan.to_dict()
    rows = d.pop("inputs")
    head = json.dumps(d, sort_keys=True)[:-1]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(head + ', "inputs": [\n')
        f.write(",\n".join(json.dumps(r) for r in rows))
        f.write("\n]}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_plan(path: Path) -> Plan:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: cannot read the plan ({exc})") from exc
    return Plan.from_dict(data, str(path))


def check_against(folder: Path, plan: Plan, what: str) -> Plan | None:
    """The folder's plan, after checking that it is `plan`; None when the folder has none.

    Raises PlanError naming every difference, so a resumed run never mixes shards of two builds.
    """
    path = Path(folder) / PLAN_NAME
    if not path.exists():
        return None
    old = read_plan(path)
    if old.hash != plan.hash:
        diff = plan.differences(old) or [f"plan hash {old.hash} -> {plan.hash}"]
        raise PlanError(
            f"{folder} holds a {what} planned with other inputs or options ({'; '.join(diff)}); "
            f"run with the same ones to resume, or use another --out"
        )
    return old


def plan_rows(rows: Sequence[tuple]) -> tuple[tuple, ...]:
    """Identity rows as JSON gives them back (lists become tuples, so old and new plans compare)."""
    return tuple(tuple(json.loads(json.dumps(list(r)))) for r in rows)
