"""Carry a model file to a machine in parts: split it here, put the parts back together there.

A lent GPU machine takes at most 64 MiB per call (the working tree included); the real
SmolLM2-135M GGUF is 94 MiB. So it travels in two calls to the same (warm) machine: the first
stages its part in a directory that outlives the call, the second brings the other part and
joins them. A manifest (sizes and SHA-256 of the parts and of the whole) travels with each
part, so a join that lacks a part or got a damaged one says so instead of handing on a wrong
file.

    python3 -m gateway.bench.gguf_parts split FILE --dir .gguf --first-mib 56
    python3 -m gateway.bench.gguf_parts stage --dir .gguf --to /tmp/turnout-gguf     # call 1, there
    python3 -m gateway.bench.gguf_parts join --dir .gguf --to /tmp/turnout-gguf      # call 2, there
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

_CHUNK = 8 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def split(file: Path, out_dir: Path, first_bytes: int) -> Path:
    """Write FILE as two parts (the first `first_bytes` long) and a manifest into out_dir;
    return the manifest's path."""
    size = file.stat().st_size
    if not 0 < first_bytes < size:
        raise ValueError(f"the first part must be shorter than the file ({size} bytes)")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    with file.open("rb") as src:
        for i, length in enumerate((first_bytes, size - first_bytes), start=1):
            part = out_dir / f"{file.name}.part{i}"
            with part.open("wb") as dst:
                left = length
                while left:
                    block = src.read(min(_CHUNK, left))
                    dst.write(block)
                    left -= len(block)
            parts.append({"file": part.name, "size": length, "sha256": _sha256(part)})
    manifest = out_dir / f"{file.name}.json"
    manifest.write_text(json.dumps({"name": file.name, "size": size, "sha256": _sha256(file), "parts": parts}, indent=2))
    return manifest


def _manifests(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


def stage(from_dir: Path, to_dir: Path) -> list[str]:
    """Copy the parts (and manifests) present in from_dir into to_dir; their names."""
    to_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for manifest in _manifests(from_dir):
        shutil.copy2(manifest, to_dir / manifest.name)
        for part in json.loads(manifest.read_text())["parts"]:
            src = from_dir / part["file"]
            if src.is_file():
                shutil.copy2(src, to_dir / part["file"])
                copied.append(part["file"])
    return copied


def join(dirs: Sequence[Path], to_dir: Path) -> Path:
    """Put the file of the first manifest found in `dirs` back together in to_dir from parts
    found in any of `dirs` (each checked against the manifest), check the whole, and return
    its path. A file already joined and intact is returned as it is."""
    manifest = next((m for d in dirs for m in _manifests(d)), None)
    if manifest is None:
        raise FileNotFoundError(f"no manifest in {', '.join(map(str, dirs))}")
    info = json.loads(manifest.read_text())
    target = to_dir / info["name"]
    if target.is_file() and target.stat().st_size == info["size"] and _sha256(target) == info["sha256"]:
        return target
    sources = []
    for part in info["parts"]:
        found = [d / part["file"] for d in dirs if (d / part["file"]).is_file()]
        good = next((p for p in found if p.stat().st_size == part["size"] and _sha256(p) == part["sha256"]), None)
        if good is None:
            state = "damaged" if found else "missing"
            raise FileNotFoundError(f"part {part['file']} of {info['name']} is {state} (looked in {', '.join(map(str, dirs))})")
        sources.append(good)
    to_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".joining")
    with tmp.open("wb") as dst:
        for src in sources:
            with src.open("rb") as f:
                shutil.copyfileobj(f, dst, _CHUNK)
    if _sha256(tmp) != info["sha256"]:
        tmp.unlink()
        raise ValueError(f"{info['name']}: the joined parts do not match the manifest's SHA-256")
    tmp.replace(target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring). 0 on success, 1 when a join cannot be made."""
    p = argparse.ArgumentParser(prog="python3 -m gateway.bench.gguf_parts", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="FILE -> two parts and a manifest in --dir")
    s.add_argument("file", type=Path)
    s.add_argument("--dir", type=Path, default=Path(".gguf"))
    s.add_argument("--first-mib", type=float, default=56.0, help="size of the first part in MiB")
    st = sub.add_parser("stage", help="copy the parts present in --dir to --to (first call)")
    st.add_argument("--dir", type=Path, default=Path(".gguf"))
    st.add_argument("--to", type=Path, required=True)
    j = sub.add_parser("join", help="join the parts found in --dir and --to into --to; print the file's path")
    j.add_argument("--dir", type=Path, default=Path(".gguf"))
    j.add_argument("--to", type=Path, required=True)
    args = p.parse_args(argv)
    if args.cmd == "split":
        manifest = split(args.file, args.dir, int(args.first_mib * (1 << 20)))
        for part in json.loads(manifest.read_text())["parts"]:
            print(f"{args.dir / part['file']}  {part['size'] / 2**20:.1f} MiB")
        print(manifest)
    elif args.cmd == "stage":
        print("staged:", ", ".join(stage(args.dir, args.to)) or "nothing")
    else:
        try:
            print(join([args.dir, args.to], args.to))
        except (FileNotFoundError, ValueError) as exc:
            print(f"gguf_parts: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
