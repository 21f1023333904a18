"""Model sources -> (config, weights, tokenizer): a GGUF file or store name, an HF model
directory (config.json + safetensors + tokenizer.json), or `dummy:<shape>`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from backends.paged.config import ModelConfig, config_from_gguf, config_from_hf, dummy_config
from backends.paged.fp8 import quantize_model
from backends.paged.parallel import ShardLayout
from backends.paged.shard import selector
from backends.paged.tokenizer import ByteTokenizer, Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_dir
from backends.paged.weights import ModelWeights, load_gguf_tensors, load_safetensors, pack_weights, random_tensors


@dataclass
class ModelSource:
    kind: str  # "gguf" | "hf" | "dummy"
    location: str  # file, directory, or shape name
    _reader: Any = field(default=None, repr=False, compare=False)

    def gguf_reader(self) -> Any:
        """The file's GGUFReader, opened once (parsing the metadata takes seconds)."""
        if self._reader is None:
            from gguf import GGUFReader

            self._reader = GGUFReader(self.location)
        return self._reader

    def release(self) -> None:
        """Drop the reader (and its memory map) once the weights are loaded."""
        self._reader = None

    @classmethod
    def parse(cls, model: str) -> ModelSource:
        """Where `model` points: dummy:<shape>, an HF directory, or a GGUF path / store name."""
        if model.startswith("dummy:"):
            return cls("dummy", model.removeprefix("dummy:"))
        path = Path(model).expanduser()
        if path.is_dir() and (path / "config.json").is_file():
            return cls("hf", str(path))
        from backends.models import resolve_model

        return cls("gguf", str(resolve_model(model)))


def load_config_and_tokenizer(source: ModelSource) -> tuple[ModelConfig, Tokenizer]:
    """The cheap part of loading: shape and tokenizer (no weights)."""
    if source.kind == "dummy":
        config = dummy_config(source.location)
        return config, ByteTokenizer(config.vocab_size)
    if source.kind == "hf":
        config = config_from_hf(Path(source.location))
        return config, tokenizer_from_hf_dir(Path(source.location), config.eos_token_ids)
    reader = source.gguf_reader()
    return config_from_gguf(reader), tokenizer_from_gguf(reader)


def load_weights(
    source: ModelSource,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    quantization: str | None = None,
    shard: ShardLayout | None = None,
) -> ModelWeights:
    """The expensive part: all tensors, dequantized / converted to dtype on device; with
    `quantization` "fp8", the decoder's linear weights then quantized to FP8 (fp8.py). With
    `shard` (tensor parallelism), only that rank's slice of each tensor is kept (shard.py),
    and quantized after the cut."""
    select = selector(shard, config.head_dim)
    if source.kind == "dummy":
        on_gpu = torch.device(device).type == "cuda"
        draw_device, draw_dtype = (device, dtype) if on_gpu else ("cpu", torch.float32)
        tensors = random_tensors(config, seed=seed, device=draw_device, dtype=draw_dtype, select=select)
    elif source.kind == "hf":
        tensors = load_safetensors(Path(source.location), select)
    else:
        tensors = load_gguf_tensors(source.gguf_reader(), config, select)
        source.release()
    weights = pack_weights(tensors, config, dtype, device)
    if quantization == "fp8":
        weights = quantize_model(weights)
    elif quantization is not None:
        raise ValueError(f"unknown quantization {quantization!r}")
    return weights
