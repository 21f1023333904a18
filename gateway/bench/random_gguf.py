"""Random weights of a named shape as an F16 llama GGUF that both local engines load.

The paged engine's dummy shapes (backends/paged/config.py, DUMMY_SHAPES) written as a file,
so that the llama.cpp runner and the paged engine serve the very same weights: llama
architecture, 2-D weights in F16 and norms in F32 (the layout llama.cpp's converter writes for
`--outtype f16`), Llama 3's RoPE scaling as the `rope_freqs` tensor, and a byte-level BPE
tokenizer (`tokenizer.ggml.model` gpt2) that both tokenizers read alike: the 256 byte tokens,
as many letter-pair merges as the vocabulary has room for, filler tokens up to the shape's
vocabulary size, and Llama 3's special tokens with a Llama-3-style chat template at the end.

Values come from a few pools of normal numbers (one per scale), each tensor a window of its
pool at a random offset, repeated as needed: an 8B model is written at the speed of the disk
(no 8e9 draws), one tensor in memory at a time. The pools' length is odd, so where a tensor is
longer than its pool its rows come out as shifted windows rather than repeats of one another.
Throughput does not depend on the values, only on their being ordinary (dense, no zeros,
activations O(1) through the layers).

    python3 -m gateway.bench.random_gguf --shape llama3-8b --out /tmp/llama3-8b-f16.gguf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.paged.config import DUMMY_SHAPES, ModelConfig

if TYPE_CHECKING:
    import gguf

POOL_SIZE = (1 << 24) + 1  # values per pool (32 MiB in F16); odd, so repeats shift rows (see above)
FORMAT_VERSION = 1  # bump when the file's content changes: a sidecar with another one is stale

# Llama 3's special tokens (the ones its chat template uses), placed at the vocabulary's end.
BOS, EOS, START_HEADER, END_HEADER, EOT = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)  # fmt: skip
SPECIALS = (BOS, EOS, START_HEADER, END_HEADER, EOT)

# A Llama-3-style chat template (written here; rendered by backends/chat_template.py in both
# engines): a header per turn, each turn ended by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# GGUF token types (gguf.TokenType): the values both readers act on.
_NORMAL, _CONTROL = 1, 3


def byte_alphabet() -> list[str]:
    """The character that stands for each byte in a byte-level BPE vocabulary (GPT-2's scheme:
    printable Latin-1 bytes are themselves, the rest are moved to U+0100 onwards in byte order),
    which is what both tokenizers' byte-level pre-tokenizer and decoder expect."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, moved = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + moved))
            moved += 1
    return chars


@dataclass(frozen=True)
class Vocab:
    """A byte-level BPE vocabulary: token texts, GGUF token types, merges and special ids."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    eot_id: int


def build_vocab(size: int) -> Vocab:
    """`size` tokens: bytes first, then merged letter pairs (a space before a letter, then two
    letters), then fillers, then the specials. Fillers are plain tokens that no merge makes
    (a random model samples them; they read as "<n>")."""
    bytes_ = byte_alphabet()
    space = bytes_[ord(" ")]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pairs = [(space, a) for a in letters] + [(a, b) for a in letters for b in letters]
    room = size - len(bytes_) - len(SPECIALS)
    if room < 1:  # llama.cpp refuses a BPE vocabulary without merges
        raise ValueError(f"a vocabulary of {size} tokens leaves no room for a merge beside 256 bytes and {len(SPECIALS)} specials")
    pairs = pairs[:room]
    tokens = bytes_ + [a + b for a, b in pairs]
    tokens += [f"<{n}>" for n in range(len(tokens), size - len(SPECIALS))]
    first_special = len(tokens)
    tokens += list(SPECIALS)
    types = [_NORMAL] * first_special + [_CONTROL] * len(SPECIALS)
    return Vocab(
        tokens=tokens, types=types, merges=[f"{a} {b}" for a, b in pairs], bos_id=first_special + SPECIALS.index(BOS),
        eos_id=first_special + SPECIALS.index(EOS), eot_id=first_special + SPECIALS.index(EOT),
    )  # fmt: skip


def llama3_rope_factors(config: ModelConfig) -> np.ndarray | None:
    """The divisors of each RoPE frequency that Llama 3's scaling applies (what a Llama 3.1
    GGUF stores as `rope_freqs.weight`), or None for shapes without it: long wavelengths are
    slowed by `factor`, short ones kept, the band between blended linearly in 1/wavelength."""
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type") != "llama3":
        return None
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    dims = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    wavelengths = 2 * math.pi * config.rope_theta**dims
    # 0 at the slow end (wavelength >= original / low), 1 at the fast end (<= original / high).
    blend = np.clip((original / wavelengths - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1.0 - blend) / factor + blend)).astype(np.float32)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: GGUF name, shape (rows first, as numpy holds it), dtype, scale."""

    name: str
    shape: tuple[int, ...]
    dtype: type  # np.float16 or np.float32
    std: float  # normal draws scaled by this; norms are 1 + std * draw


def tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the shape under llama.cpp's names, scaled as the paged engine's dummy
    weights are (backends/paged/weights.py, random_tensors), so activations stay O(1)."""
    H, I, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    f16, f32 = np.float16, np.float32
    specs = [TensorSpec("token_embd.weight", (config.vocab_size, H), f16, 1.0)]
    for i in range(config.num_layers):
        p = f"blk.{i}."
        specs += [
            TensorSpec(p + "attn_norm.weight", (H,), f32, 0.1),
            TensorSpec(p + "attn_q.weight", (q, H), f16, H**-0.5),
            TensorSpec(p + "attn_k.weight", (kv, H), f16, H**-0.5),
            TensorSpec(p + "attn_v.weight", (kv, H), f16, H**-0.5),
            TensorSpec(p + "attn_output.weight", (H, q), f16, q**-0.5),
            TensorSpec(p + "ffn_norm.weight", (H,), f32, 0.1),
            TensorSpec(p + "ffn_gate.weight", (I, H), f16, H**-0.5),
            TensorSpec(p + "ffn_up.weight", (I, H), f16, H**-0.5),
            TensorSpec(p + "ffn_down.weight", (H, I), f16, I**-0.5),
        ]
        if config.qkv_bias:
            specs += [TensorSpec(p + f"attn_{x}.bias", (n,), f32, 0.02) for x, n in (("q", q), ("k", kv), ("v", kv))]
    specs.append(TensorSpec("output_norm.weight", (H,), f32, 0.1))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("output.weight", (config.vocab_size, H), f16, H**-0.5))
    return specs


class _Pools:
    """One pool of normal draws per (scale, dtype), made on first use."""

    def __init__(self, seed: int, largest: int) -> None:
        self._rng = np.random.default_rng(seed)
        # No longer than the largest tensor needs (a tiny model's pools stay tiny); odd.
        self._size = min(POOL_SIZE, largest | 1)
        self._pools: dict[tuple[float, type], np.ndarray] = {}

    def values(self, spec: TensorSpec) -> np.ndarray:
        """The tensor's values: its pool from a random offset, repeated to fill its shape."""
        n = math.prod(spec.shape)
        if spec.name.endswith("norm.weight") or spec.dtype is np.float32:
            # Small 1-D tensors are drawn whole: norms around 1, like a trained model's.
            draw = self._rng.standard_normal(n, dtype=np.float32) * spec.std
            return (draw + 1.0 if spec.name.endswith("norm.weight") else draw).astype(spec.dtype).reshape(spec.shape)
        key = (spec.std, spec.dtype)
        if key not in self._pools:
            self._pools[key] = (self._rng.standard_normal(self._size, dtype=np.float32) * spec.std).astype(spec.dtype)
        pool = self._pools[key]
        return window(pool, int(self._rng.integers(len(pool))), n).reshape(spec.shape)


def window(pool: np.ndarray, start: int, n: int) -> np.ndarray:
    """`n` values of `pool` read circularly from `start`: a view when they lie in one piece,
    else a copy (the pool's pieces in turn, at most n / len(pool) + 2 of them)."""
    if start + n <= len(pool):
        return pool[start : start + n]
    out = np.empty(n, dtype=pool.dtype)
    filled, src = 0, start
    while filled < n:
        take = min(n - filled, len(pool) - src)
        out[filled : filled + take] = pool[src : src + take]
        filled, src = filled + take, 0
    return out


def _add_metadata(w: gguf.GGUFWriter, config: ModelConfig, vocab: Vocab, name: str) -> None:
    """The llama architecture's hyperparameters and the tokenizer (gguf's own key names)."""
    w.add_name(name)
    w.add_file_type(1)  # MOSTLY_F16: 2-D weights F16, the rest F32
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(config.head_dim)
    if config.head_dim * config.num_heads != config.hidden_size:  # only then do readers need them
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("llama-bpe")  # Llama 3's pre-tokenizer regex, known to both readers
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_eot_token_id(vocab.eot_id)
    w.add_add_bos_token(True)  # as Llama 3; the template writes it, neither engine doubles it
    w.add_chat_template(CHAT_TEMPLATE)


@dataclass(frozen=True)
class Written:
    """What was written, also kept beside the file as JSON (`<file>.json`) so a later run can
    reuse the file instead of writing 16 GB again."""

    shape: str
    seed: int
    format_version: int
    bytes: int
    seconds: float


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def existing(path: Path, shape: str, seed: int) -> Written | None:
    """The file's record when it was written completely for this shape and seed, else None."""
    try:
        record = Written(**json.loads(sidecar(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if (record.shape, record.seed, record.format_version) != (shape, seed, FORMAT_VERSION):
        return None
    try:
        return record if path.stat().st_size == record.bytes else None
    except OSError:
        return None


def _tensors(config: ModelConfig, seed: int) -> Iterator[tuple[TensorSpec, np.ndarray]]:
    specs = tensor_specs(config)
    pools = _Pools(seed, max(math.prod(s.shape) for s in specs))
    for spec in specs:
        yield spec, pools.values(spec)


def write_random_gguf(path: Path, shape: str, seed: int = 0, reuse: bool = True, config: ModelConfig | None = None) -> Written:
    """Write random weights of the named dummy shape (or of `config`, named `shape`) to `path`,
    reusing the file when its sidecar says it is this very one. The file appears under its
    name only once complete (written beside it, then renamed)."""
    if reuse and (record := existing(path, shape, seed)) is not None:
        return record
    import gguf

    config = config or DUMMY_SHAPES[shape]
    vocab = build_vocab(config.vocab_size)
    specs = tensor_specs(config)
    factors = llama3_rope_factors(config)
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    _add_metadata(writer, config, vocab, f"random-{shape}")
    # Tensor infos first (the header needs every offset), then the data one tensor at a time.
    for spec in specs:
        itemsize = np.dtype(spec.dtype).itemsize
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(spec.dtype), math.prod(spec.shape) * itemsize)
    if factors is not None:
        writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _spec, values in _tensors(config, seed):
        writer.write_tensor_data(values)
    if factors is not None:
        writer.write_tensor_data(factors)
    writer.close()
    os.replace(partial, path)
    record = Written(shape=shape, seed=seed, format_version=FORMAT_VERSION, bytes=path.stat().st_size,
                     seconds=round(time.perf_counter() - started, 1))  # fmt: skip
    sidecar(path).write_text(json.dumps(asdict(record)))
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(DUMMY_SHAPES))
    ap.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write even if a complete file of this shape is there")
    args = ap.parse_args()
    record = write_random_gguf(args.out, args.shape, args.seed, reuse=not args.force)
    print(json.dumps({"path": str(args.out), **asdict(record)}), flush=True)


if __name__ == "__main__":
    main()
