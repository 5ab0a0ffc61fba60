#!/usr/bin/env python
"""The wheel plan for the GPU device, and the checks that the carried wheels can only add packages.

    python tools/gpu/wheels_check.py plan [--xformers]   # "how name==version" lines for wheels.sh
    python tools/gpu/wheels_check.py verify [--xformers] [--dir .whl]

`verify` reads every wheel's METADATA in .whl/ and fails (exit 1, each fault named) when:
- a name is carried twice, or a carried wheel is not the pinned version;
- a carried wheel is torch, torchvision, torchaudio, triton or nvidia-* (it would replace the image's
  CUDA stack), or a package the image already has (it would shadow it) outside the fallback folder;
- a requirement (extras left out, markers read for CPython 3.12 on Linux x86_64) is met neither by a
  carried wheel nor by the image: a torch/nvidia-*/triton requirement must be met by the image's
  known version (torch 2.11.0), never by a download;
- setup.cfg's install_requires has a need that is neither carried, on the image, nor marked `skip`;
- the working tree that travels plus .whl/ is over the device's 64 MiB.
It prints one line per wheel (name, version, size, why) and the total, and writes .whl/wheels.json.
The device image's package list is tools/gpu/device_image.txt, or a live KINDS.md when one is found.
"""

from __future__ import annotations

import argparse
import configparser
import email.parser
import hashlib
import json
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CARRY_LIMIT = 64 * 2**20  # the device's limit on the working tree that travels, carried paths included
# The image's CUDA stack: never carried, never replaced, only ever required at the image's version.
PROTECTED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# CPython 3.12 on Linux x86_64, the device's interpreter (KINDS.md: Python 3.12.3).
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "os_name": "posix",
    "extra": "",
}


@dataclass
class Pin:
    name: str  # canonical
    version: str | None
    how: str  # wheel | sdist | fallback | xformers | skip
    why: str


@dataclass
class Image:
    names: set[str]
    versions: dict[str, str]
    source: str


@dataclass
class WheelInfo:
    path: Path
    name: str
    version: str
    requires: list[Requirement] = field(default_factory=list)


def read_pins(path: Path = HERE / "wheels.txt") -> list[Pin]:
    pins = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        spec, how, why = (part.strip() for part in line.split("|", 2))
        name, _, version = spec.partition("==")
        pins.append(Pin(canonicalize_name(name), version or None, how, why))
    return pins


def selected(pins: list[Pin], xformers: bool) -> list[Pin]:
    return [p for p in pins if p.how in ("wheel", "sdist", "fallback") or (xformers and p.how == "xformers")]


def read_image(path: Path | None = None) -> Image:
    """The device image's packages: a live KINDS.md beside the workplace if found, else our copy."""
    versions: dict[str, str] = {}
    for line in (HERE / "device_image.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            if version:
                versions[canonicalize_name(name)] = version
    for kinds in (
        [path]
        if path
        else [REPO.parent / ".library/device/KINDS.md", REPO.parents[1] / ".library/device/KINDS.md"]
    ):
        if kinds and kinds.is_file():
            for line in kinds.read_text().splitlines():
                if line.startswith("nvidia-h200: their image") and "Packages:" in line:
                    listed = line.split("Packages:", 1)[1].strip().rstrip(".").split(", ")
                    return Image({canonicalize_name(n) for n in listed}, versions, str(kinds))
    names = {
        canonicalize_name(line.partition("==")[0])
        for line in (HERE / "device_image.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    return Image(names, versions, str(HERE / "device_image.txt"))


def setup_requires(path: Path = REPO / "setup.cfg") -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(path)
    lines = cfg["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def active(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate(DEVICE_ENV)


def read_wheel(path: Path) -> WheelInfo:
    with zipfile.ZipFile(path) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    reqs = [r for r in reqs if r.marker is None or "extra" not in str(r.marker)]
    return WheelInfo(path, canonicalize_name(meta["Name"]), meta["Version"], [r for r in reqs if active(r)])


def need_met(req: Requirement, carried: dict[str, WheelInfo], image: Image, fallbacks: dict[str, WheelInfo]):
    """(ok, how): how a requirement is met on the device, or why it is not."""
    name = canonicalize_name(req.name)
    if name in carried:
        version = carried[name].version
        ok = req.specifier.contains(version, prereleases=True)
        return ok, f"carried {version}" if ok else f"carried {version} does not satisfy {req}"
    if name in image.names:
        known = image.versions.get(name)
        if known:
            ok = req.specifier.contains(known, prereleases=True)
            return ok, f"image {known}" if ok else f"the image's {name} {known} does not satisfy {req}"
        if PROTECTED.match(name) and str(req.specifier):
            return (
                False,
                f"{req}: the image's version of {name} is not known here, and it must never be replaced",
            )
        if name in fallbacks and str(req.specifier):
            fb = fallbacks[name].version
            if not req.specifier.contains(fb, prereleases=True):
                return False, f"{req}: the fallback wheel {name} {fb} does not satisfy it"
            return True, f"image (version not known here; check.sh installs the fallback {fb} if older)"
        return True, "image" + (" (version not known here)" if str(req.specifier) else "")
    return False, f"{req} is neither carried nor on the device image"


def tree_bytes() -> int:
    """Bytes of the working tree that travels with a device call: tracked + untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    total = 0
    for rel in out.decode().split("\0"):
        p = REPO / rel
        if rel and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def verify(
    whl: Path, pins: list[Pin], image: Image, xformers: bool, needs: list[Requirement] | None = None
) -> tuple[list[str], list[dict]]:
    """Faults (empty: fine) and the table of carried wheels; `needs`: setup.cfg's install_requires."""
    faults: list[str] = []
    want = {p.name: p for p in selected(pins, xformers)}
    groups = {"main": sorted(whl.glob("*.whl")), "fallback": sorted((whl / "fallback").glob("*.whl"))}
    groups["cu12"] = sorted((whl / "cu12").glob("*.whl"))
    infos: dict[str, list[WheelInfo]] = {g: [read_wheel(p) for p in paths] for g, paths in groups.items()}
    carried: dict[str, WheelInfo] = {}
    fallbacks: dict[str, WheelInfo] = {}
    seen: dict[str, Path] = {}
    for group, items in infos.items():
        for info in items:
            if info.name in seen:
                faults.append(f"{info.name} carried twice: {seen[info.name].name} and {info.path.name}")
            seen[info.name] = info.path
            pin = want.get(info.name)
            if pin is None:
                faults.append(f"{info.path.name}: not in tools/gpu/wheels.txt (remove it, or pin it there)")
            elif pin.version and info.version != pin.version:
                faults.append(f"{info.path.name}: version {info.version}, pinned {pin.version}")
            if group == "fallback":
                fallbacks[info.name] = info
                continue
            if group == "cu12":  # unpacked into a library folder by check.sh, never installed
                if info.name != "nvidia-cuda-runtime-cu12":
                    faults.append(f"{info.path.name}: only the CUDA 12 runtime belongs in cu12/")
                continue
            if PROTECTED.match(info.name):
                faults.append(f"{info.path.name}: carrying {info.name} would replace the image's CUDA stack")
            elif info.name in image.names:
                faults.append(f"{info.path.name}: the image has {info.name}; carry it only as a fallback")
            carried[info.name] = info
    for name, pin in want.items():
        if name not in seen:
            faults.append(
                f"{name}=={pin.version} ({pin.how}) is pinned but not in {whl}: run tools/gpu/wheels.sh"
            )
    table = []
    for group, items in infos.items():
        for info in items:
            if group != "fallback":
                for req in info.requires:
                    ok, how = need_met(req, carried, image, fallbacks)
                    if not ok:
                        faults.append(f"{info.name} {info.version} needs {req}: {how}")
            pin = want.get(info.name)
            table.append(
                {
                    "name": info.name,
                    "version": info.version,
                    "file": str(info.path.relative_to(whl)),
                    "bytes": info.path.stat().st_size,
                    "sha256": hashlib.sha256(info.path.read_bytes()).hexdigest(),
                    "group": group,
                    "why": pin.why if pin else "?",
                    "requires": [str(r) for r in info.requires],
                }
            )
    skipped = {p.name for p in pins if p.how == "skip"}
    for req in setup_requires() if needs is None else needs:
        name = canonicalize_name(req.name)
        if name in skipped or not active(req):
            continue
        ok, how = need_met(req, carried, image, fallbacks)
        if not ok:
            faults.append(f"setup.cfg needs {req}: {how}")
    return faults, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["plan", "verify"])
    ap.add_argument("--xformers", action="store_true", help="also the xformers wheels (see wheels.txt)")
    ap.add_argument("--dir", default=str(REPO / ".whl"))
    ap.add_argument("--kinds", default=None, help="a KINDS.md to read the image's packages from")
    args = ap.parse_args(argv)
    pins = read_pins()
    if args.mode == "plan":
        for p in selected(pins, args.xformers):
            print(p.how, f"{p.name}=={p.version}")
        return 0
    image = read_image(Path(args.kinds) if args.kinds else None)
    whl = Path(args.dir)
    faults, table = verify(whl, pins, image, args.xformers)
    total = sum(row["bytes"] for row in table)
    tree = tree_bytes()
    print(f"device image packages from: {image.source} ({len(image.names)} names)")
    for row in table:
        print(
            f"  {row['name']:<26} {row['version']:<10} {row['bytes'] / 2**20:7.2f} MiB  "
            f"{row['group']:<8} {row['why']}"
        )
    print(
        f"total {total / 2**20:.2f} MiB in {len(table)} wheels; working tree {tree / 2**20:.2f} MiB; "
        f"together {(total + tree) / 2**20:.2f} MiB of the device's {CARRY_LIMIT / 2**20:.0f} MiB"
    )
    if total + tree > CARRY_LIMIT:
        faults.append(
            f"wheels {total / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB exceed the 64 MiB a call carries"
        )
    for skip in (p for p in pins if p.how == "skip"):
        print(f"  not carried: {skip.name}: {skip.why}")
    if not args.xformers:
        print(
            "  not carried: xformers: "
            + next(p.why for p in pins if p.name == "xformers")
            + " (wheels.sh --xformers adds it)"
        )
    (whl / "wheels.json").write_text(
        json.dumps(
            {
                "wheels": table,
                "total_bytes": total,
                "tree_bytes": tree,
                "faults": faults,
                "xformers": args.xformers,
                "image_list": image.source,
            },
            indent=1,
        )  # fmt: skip
    )
    for fault in faults:
        print(f"FAULT: {fault}", file=sys.stderr)
    if faults:
        print(
            f"{len(faults)} fault(s): the wheels would not install cleanly next to the image's torch",
            file=sys.stderr,
        )
        return 1
    print("ok: every requirement is met by a carried wheel or the image; nothing replaces torch or CUDA")
    return 0


if __name__ == "__main__":
    sys.exit(main())
