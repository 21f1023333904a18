"""Prepare, on a machine with PyPI, what gateway/bench/device_peer.sh needs on a lent GPU machine
that has no network: the llama-cpp-python source slimmed to what its CUDA build compiles, and the
wheels that `turnout serve` needs there beside those in `.whl/` (docs/paged-engine.md).

    python3 -m gateway.bench.peer_prepare              # fills .peerwhl/ (git-excluded)
    python3 -m gateway.bench.peer_prepare --sdist llama_cpp_python-0.3.36.tar.gz   # no sdist download

The sdist is 77 MB, most of it llama.cpp's model vocabularies, docs, tests, tools and the GPU
backends other than CUDA, none of which a `GGML_CUDA=ON` build of the Python package compiles
(llama.cpp is a subproject there, so its tests, tools, examples and server are off by default,
and gateway/bench/device_peer.sh turns the multimodal library off). What remains, xz-compressed,
is a few MiB. The wheels are pinned to the versions this repository's venv runs (CPython 3.12,
manylinux x86-64, as the machine has); scikit-build-core goes into `build/`, installed there only
if the machine's own is missing.
"""

from __future__ import annotations

import argparse
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from gateway.bench.harness import REPO

DEST = REPO / ".peerwhl"

# Missing on the lent machine's image (/work/.library/device/KINDS.md lists what it has) and
# imported by `turnout serve`, its engine workers or llama_cpp, found with
# PYTHONPROFILEIMPORTTIME=1 on a CPU run of gateway.bench.peer_gpu. Optional imports the machine
# also lacks (websockets, watchfiles, h2) are left out: uvicorn and httpx run without them.
WHEELS = (
    "fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.55.0", "httptools==0.9.0", "pyzmq==27.3.0",
    "msgspec==0.23.0", "opentelemetry-api==1.45.2", "diskcache==5.6.3", "sniffio==1.3.1",
)  # fmt: skip
BUILD_WHEELS = ("scikit-build-core==1.1.2", "pathspec==1.1.1")  # llama-cpp-python's build backend (>= 0.9.2) and its need that the machine has too

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

# Paths in the sdist that the build never reads, relative to its top directory.
DROP_TOP = {".git", ".github", "docker", "docs", "examples", "tests"}
DROP_LLAMA = {
    "models", "docs", "benches", "tests", "examples", "pocs", "tools", "media", "gguf-py", "scripts",
    "conversion", ".github", ".devops", "ci", "requirements", "grammars", "skills", "app",
}  # fmt: skip
KEEP_GGML_BACKENDS = {"ggml-cpu", "ggml-cuda"}  # every other ggml/src/ggml-* directory goes


def llama_cpp_version() -> str:
    """The llama-cpp-python version the Makefile pins (LLAMA_CPP_VERSION)."""
    match = re.search(r"^LLAMA_CPP_VERSION\s*:=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    if match is None:
        raise SystemExit("peer_prepare: no LLAMA_CPP_VERSION in the Makefile")
    return match.group(1)


def kept(name: str) -> bool:
    """Whether a member of the sdist (its path, top directory first) is needed by the build."""
    parts = name.split("/")[1:]
    if not parts:
        return True
    if parts[0] in DROP_TOP:
        return False
    if parts[:2] == ["vendor", "llama.cpp"] and len(parts) > 2:
        rest = parts[2:]
        if rest[0] in DROP_LLAMA or (len(rest) == 1 and rest[0].startswith("convert_") and rest[0].endswith(".py")):
            return False
        if rest[:2] == ["ggml", "src"] and len(rest) > 2 and rest[2].startswith("ggml-") and "." not in rest[2]:
            return rest[2] in KEEP_GGML_BACKENDS
    return True


def slim(sdist: Path, out: Path) -> tuple[int, int]:
    """Copy the needed members of `sdist` (.tar.gz) into `out` (.tar.xz); (members kept, dropped)."""
    kept_n = dropped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(sdist, "r:gz") as src, tarfile.open(partial, "w:xz", preset=9 | lzma.PRESET_EXTREME) as dst:
        for member in src:
            if not kept(member.name):
                dropped += 1
                continue
            kept_n += 1
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    partial.replace(out)
    return kept_n, dropped


def download_sdist(version: str, into: Path) -> Path:
    """llama-cpp-python's sdist from PyPI (pip prepares its metadata, which takes a minute)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(into),
                    f"llama-cpp-python=={version}"], check=True)  # fmt: skip
    return next(into.glob(f"llama_cpp_python-{version}.tar.gz"))


def download_wheels(specs: tuple[str, ...], into: Path) -> None:
    """CPython 3.12 manylinux x86-64 wheels, without their dependencies (each is named)."""
    into.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for spec in specs:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", *platforms, "-d", str(into), spec], check=True)  # fmt: skip


def dist_name(wheel: Path) -> str:
    """A wheel's distribution name (what comes before its version), normalized (PEP 503)."""
    match = re.match(r"(.+?)-\d", wheel.name)
    return re.sub(r"[-_.]+", "-", match.group(1) if match else wheel.stem).lower()


def duplicates(*folders: Path) -> list[str]:
    """Distributions with a wheel in more than one of the folders installed together (pip
    refuses two versions of one package in one install)."""
    seen: dict[str, Path] = {}
    clashes = []
    for folder in folders:
        for wheel in sorted(folder.glob("*.whl")):
            name = dist_name(wheel)
            if name in seen and seen[name] != wheel:
                clashes.append(f"{name}: {seen[name].name} and {wheel.name}")
            seen.setdefault(name, wheel)
    return clashes


def travelling_mib(carry: list[str]) -> tuple[float, float]:
    """MiB of what a device call sends: the working tree (tracked and untracked files git does
    not ignore) and the carried paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    tree = sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())
    carried = 0
    for path in carry:
        p = REPO / path
        carried += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (p.stat().st_size if p.exists() else 0)
    return tree / 2**20, carried / 2**20


def exclude_folder(folder: str) -> None:
    """Make git ignore the folder in this checkout only (.git/info/exclude), once."""
    exclude = REPO / ".git" / "info" / "exclude"
    line = f"/{folder}/"
    if exclude.exists() and line in exclude.read_text().split():
        return
    with exclude.open("a") as f:
        f.write(line + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, help="a downloaded llama-cpp-python sdist (default: download it)")
    ap.add_argument("--dest", type=Path, default=DEST)
    ap.add_argument("--skip-wheels", action="store_true")
    args = ap.parse_args()
    version = llama_cpp_version()
    exclude_folder(args.dest.name)
    out = args.dest / f"llama-cpp-python-{version}-slim.tar.xz"
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist or download_sdist(version, Path(tmp))
        kept_n, dropped = slim(sdist, out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB ({kept_n} members kept, {dropped} dropped)")
    if not args.skip_wheels:
        download_wheels(WHEELS, args.dest)
        download_wheels(BUILD_WHEELS, args.dest / "build")
    clashes = duplicates(REPO / ".whl", args.dest)
    if clashes:
        raise SystemExit("peer_prepare: a package has wheels in both .whl and .peerwhl: " + "; ".join(clashes))
    tree, carried = travelling_mib([".whl", args.dest.name])
    print(f"a device call sends {tree:.1f} MiB of working tree + {carried:.1f} MiB carried (.whl, {args.dest.name}) "
          f"= {tree + carried:.1f} MiB of the 64 MiB allowed")  # fmt: skip


if __name__ == "__main__":
    main()
