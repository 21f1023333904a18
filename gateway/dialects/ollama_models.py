"""What Ollama's model pages (/api/tags, /api/ps, /api/show) say of a model, from what the
gateway knows: the route's first backend's config, its model file in the store (size,
modification time) and that file's GGUF metadata (architecture, parameter count, file
type, context length, chat template, license). A remote model has no file here: its
details are empty and its size 0.

`digest` is an identity of the file (its name, size and modification time, sha256), not a
hash of its content: hashing a multi-gigabyte file for a listing is too slow.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.models import resolve_model
from backends.protocol import BackendError
from gateway.dialects.ollama_gguf import FILE_TYPES, read_metadata
from gateway.dialects.ollama_types import Details
from policies.schema import LOCAL_KINDS, BackendConfig

log = logging.getLogger("turnout.ollama")

LATEST = ":latest"


def tagged(alias: str) -> str:
    """A model id as Ollama names it: with a tag (`:latest` when it has none)."""
    return alias if ":" in alias else alias + LATEST


@dataclass
class ModelFacts:
    size: int = 0
    modified: float = 0.0
    digest: str = ""
    details: Details = field(default_factory=Details)
    info: dict[str, Any] = field(default_factory=dict)  # GGUF metadata, Ollama's model_info
    template: str = ""
    license: str | None = None
    context_length: int | None = None


_cache: dict[tuple[str, int, int, bool], ModelFacts] = {}


def model_file(cfg: BackendConfig) -> Path | None:
    """A local backend's model file, when it is in the store (or a path to one)."""
    if cfg.kind not in LOCAL_KINDS:
        return None
    try:
        path = resolve_model(cfg.model)
    except BackendError:
        return None
    return path if path.is_file() else None


def facts(cfg: BackendConfig, *, verbose: bool = False) -> ModelFacts:
    """The facts of a backend's model (file I/O: call it in a thread). Cached per file
    version; a file that cannot be read gives what is known without it."""
    path = model_file(cfg)
    if path is None:
        return ModelFacts()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, verbose)
    found = _cache.get(key)
    if found is None:
        found = _cache[key] = _read(path, stat.st_size, stat.st_mtime_ns, verbose)
    return found


def _read(path: Path, size: int, mtime_ns: int, verbose: bool) -> ModelFacts:
    digest = hashlib.sha256(f"{path.name}\0{size}\0{mtime_ns}".encode()).hexdigest()
    out = ModelFacts(size=size, modified=mtime_ns / 1e9, digest=digest)
    if path.suffix != ".gguf":
        return out
    try:
        meta = read_metadata(path, keep_arrays=verbose)
    except (OSError, ValueError) as exc:
        log.warning("could not read the GGUF metadata of %s: %s", path, exc)
        out.details = Details(format="gguf")
        return out
    fields = meta.fields
    arch = str(fields.get("general.architecture", ""))
    fields.setdefault("general.parameter_count", meta.parameter_count)
    out.details = Details(
        format="gguf",
        family=arch,
        families=[arch] if arch else None,
        parameter_size=str(fields.get("general.size_label") or human_count(meta.parameter_count)),
        quantization_level=FILE_TYPES.get(fields.get("general.file_type", -1), ""),
    )
    out.template = str(fields.pop("tokenizer.chat_template", "") or "")
    out.license = fields.get("general.license")
    context = fields.get(f"{arch}.context_length")
    out.context_length = context if isinstance(context, int) else None
    out.info = fields
    return out


def human_count(n: int) -> str:
    """A parameter count as Ollama writes one: 8.0B, 134.52M."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.1f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.2f}K" if n else ""
