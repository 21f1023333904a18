"""A GGUF file's metadata (its key-value header and the tensor count), read straight from
the file for /api/tags, /api/ps and /api/show. The `gguf` package's reader maps every
array of the file (a vocabulary, its merges) into numpy views: 2 s for SmolLM2-135M. This
reads the header only, skipping long arrays unless asked for them: milliseconds.

Format (github.com/ggml-org/ggml, docs/gguf.md): "GGUF", version u32, tensor count u64,
key-value count u64; each pair a string key, a u32 type and the value; then each tensor's
name, dimension count u32, dimensions u64 each, type u32, offset u64. Little-endian.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
SHORT_ARRAY = 16  # arrays up to this long are kept (general.languages); longer ones only when asked


@dataclass
class GGUFMetadata:
    fields: dict[str, Any] = field(default_factory=dict)
    parameter_count: int = 0


class _Reader:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        text = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return text

    def skip_string(self) -> None:
        n = self.scalar("<Q")  # read first: it moves pos past the length
        self.pos += n

    def value(self, kind: int, keep_arrays: bool) -> Any:
        if kind in _SCALAR:
            return self.scalar(_SCALAR[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.scalar("<I"), self.scalar("<Q")
            if keep_arrays or n <= SHORT_ARRAY:
                return [self.value(item, keep_arrays) for _ in range(n)]
            if item in _SCALAR:
                self.pos += n * struct.calcsize(_SCALAR[item])
            else:
                for _ in range(n):
                    self.value(item, False) if item == _ARRAY else self.skip_string()
            return []
        raise ValueError(f"unknown GGUF value type {kind}")


def read_metadata(path: Path, *, keep_arrays: bool = False) -> GGUFMetadata:
    """The file's key-value metadata (long arrays as [] unless `keep_arrays`) and its
    parameter count (the tensors' elements). ValueError when it is not a GGUF file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _Reader(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        r.pos = 4
        version = r.scalar("<I")
        if not 2 <= version <= 3:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        tensors, pairs = r.scalar("<Q"), r.scalar("<Q")
        meta = GGUFMetadata()
        for _ in range(pairs):
            key = r.string()
            meta.fields[key] = r.value(r.scalar("<I"), keep_arrays)
        for _ in range(tensors):
            r.skip_string()
            elements = 1
            for _ in range(r.scalar("<I")):
                elements *= r.scalar("<Q")
            r.pos += 4 + 8  # type, offset
            meta.parameter_count += elements
        return meta


# general.file_type (llama.cpp's llama_ftype) -> Ollama's quantization_level.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
}  # fmt: skip
