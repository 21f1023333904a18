"""The random-weight GGUF writer (gateway/bench/random_gguf.py): both local engines read the file
it writes as the same model, tokens and all."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from backends.paged.config import DUMMY_SHAPES
from gateway.bench import random_gguf as rg

pytest.importorskip("gguf")

# A tiny model with Llama 3's RoPE scaling (so the rope_freqs tensor is written and read) and
# an untied output layer, as the llama3-8b shape has.
TINY_LLAMA3 = dataclasses.replace(
    DUMMY_SHAPES["tiny"], vocab_size=1024, rope_theta=500000.0, max_position_embeddings=4096,
    rope_scaling={**DUMMY_SHAPES["llama3-8b"].rope_scaling, "original_max_position_embeddings": 256},  # type: ignore[dict-item]
)  # fmt: skip

CHAT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello world, 123 ships at sea!"
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_vocab_has_bytes_merges_fillers_and_specials_each_once() -> None:
    vocab = rg.build_vocab(1024)
    assert len(vocab.tokens) == len(set(vocab.tokens)) == len(vocab.types) == 1024
    assert vocab.tokens[:256] == rg.byte_alphabet() and len(set(rg.byte_alphabet())) == 256
    assert vocab.tokens[-len(rg.SPECIALS) :] == list(rg.SPECIALS)
    assert vocab.types.count(3) == len(rg.SPECIALS)  # the specials alone are control tokens
    known = set(vocab.tokens)
    for merge in vocab.merges:  # every merge joins two tokens into a third, all in the vocabulary
        a, b = merge.split(" ")
        assert {a, b, a + b} <= known
    assert vocab.tokens[vocab.bos_id] == rg.BOS and vocab.tokens[vocab.eot_id] == rg.EOT
    with pytest.raises(ValueError, match="no room"):
        rg.build_vocab(256 + len(rg.SPECIALS))


def test_llama3_rope_factors_keep_fast_and_slow_down_slow_frequencies() -> None:
    factors = rg.llama3_rope_factors(DUMMY_SHAPES["llama3-8b"])
    assert factors is not None and factors.shape == (64,)
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(8.0)
    assert np.all(np.diff(factors) >= 0)
    assert rg.llama3_rope_factors(DUMMY_SHAPES["smollm2-135m"]) is None


def test_window_reads_the_pool_circularly() -> None:
    pool = np.arange(7)
    assert rg.window(pool, 2, 3).tolist() == [2, 3, 4]
    assert rg.window(pool, 5, 10).tolist() == [5, 6, 0, 1, 2, 3, 4, 5, 6, 0]


def test_file_is_reused_only_when_complete_and_of_the_same_shape(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    first = rg.write_random_gguf(path, "tiny")
    assert first.bytes == path.stat().st_size > 0
    assert rg.write_random_gguf(path, "tiny") == first  # reused: same record, nothing written
    assert rg.existing(path, "tiny", seed=1) is None  # another seed is another file
    path.write_bytes(b"truncated")
    assert rg.existing(path, "tiny", seed=0) is None
    record = json.loads(rg.sidecar(path).read_text())
    assert record["shape"] == "tiny" and record["format_version"] == rg.FORMAT_VERSION


def test_paged_engine_and_llama_cpp_read_the_same_model(tmp_path: Path) -> None:
    """Same prompt tokens from both tokenizers, and the same greedy tokens from both engines
    (F16 weights: llama.cpp computes with them, the paged engine with their float32 values; on
    a model this small the top token is far ahead, so the first tokens agree)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    from backends.generation import GenerationRequest, SamplingParams
    from backends.llamacpp.cpu_variants import load_cpu_backend
    from backends.paged.engine import LLMEngine

    path = tmp_path / "tiny-llama3.gguf"
    rg.write_random_gguf(path, "tiny-llama3", config=TINY_LLAMA3)
    load_cpu_backend()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    engine = LLMEngine.from_model(str(path), num_blocks=64, block_size=4, num_threads=1)
    assert engine.tokenizer.chat_template == rg.CHAT_TEMPLATE
    for k, text in enumerate([CHAT, CHAT.replace("Hello", "Goodbye cruel")]):
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert engine.tokenizer.encode(text) == ids
        llm.reset()
        tokens = llm.generate(ids, temp=0.0)
        ours = [next(tokens) for _ in range(4)]
        tokens.close()
        request = GenerationRequest(f"r{k}", ids, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        assert engine.generate_sync([request])[f"r{k}"] == ours
    llm.close()


def test_llama3_sized_vocabulary_tokenizes_alike(tmp_path: Path) -> None:
    """The llama3-8b shape's 128,256 tokens (mostly fillers), with hidden size 64 to stay
    small: llama.cpp's vocabulary and the paged engine's tokenizer split text alike."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from gguf import GGUFReader

    from backends.paged.config import config_from_gguf
    from backends.paged.tokenizer import tokenizer_from_gguf

    config = dataclasses.replace(TINY_LLAMA3, vocab_size=DUMMY_SHAPES["llama3-8b"].vocab_size)
    path = tmp_path / "vocab.gguf"
    rg.write_random_gguf(path, "vocab-llama3", config=config)
    reader = GGUFReader(str(path))
    assert config_from_gguf(reader).vocab_size == 128256
    tokenizer = tokenizer_from_gguf(reader)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    text = CHAT + "Numbers 1234567, punctuation?! and\ttabs\n\nand UTF-8: café, 東京."
    assert tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True)
    assert llm.n_vocab() == 128256
    llm.close()
