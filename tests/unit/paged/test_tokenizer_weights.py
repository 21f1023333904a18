"""Incremental detokenization, the byte tokenizer, GGUF pre-tokenizer wiring, and the
llama.cpp Q/K row permutation round trip."""

from __future__ import annotations

import pytest

import torch

from backends.paged.tokenizer import ByteTokenizer, IncrementalDetokenizer
from backends.paged.weights import unpermute_rope_rows


def test_incremental_detokenizer_never_splits_a_character() -> None:
    tok = ByteTokenizer(320)
    text = "héllo 🚀 wörld"
    ids = tok.encode(text)[1:]
    detok = IncrementalDetokenizer(tok, [1])
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    rocket = pieces[text.encode().index("🚀".encode()) : text.encode().index("🚀".encode()) + 4]
    assert rocket == ["", "", "", "🚀"]  # held until the 4th byte completes it


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer(320)
    ids = tok.encode("abc")
    assert ids[0] == tok.bos_token_id and tok.decode(ids) == "abc"
    assert tok.token_text(300) == "<300>"


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 8])
def test_unpermute_inverts_llama_cpp_permutation(n_head: int) -> None:
    w = torch.randn(n_head * 16, 24)
    permuted = llama_cpp_permute(w, n_head)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rope_rows(permuted, n_head), w)
    b = torch.randn(n_head * 16)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(b, n_head), n_head), b)


def test_gguf_tokenizer_splits_digits_for_smollm() -> None:
    """A tiny synthetic GGUF vocabulary through the same builder the real model uses."""
    from backends.paged.tokenizer import tokenizer_from_gguf

    tokens = ["<unk>", "<|im_start|>", "<|im_end|>", "a", "b", "1", "2", "ab", "Ġ", "Ġa", "12"]
    merges = ["a b", "Ġ a", "1 2"]

    class Field:
        def __init__(self, v):
            self.v = v

        def contents(self):
            return self.v

    class Reader:
        fields = {
            "tokenizer.ggml.model": Field("gpt2"),
            "tokenizer.ggml.pre": Field("smollm"),
            "tokenizer.ggml.tokens": Field(tokens),
            "tokenizer.ggml.merges": Field(merges),
            "tokenizer.ggml.token_type": Field([3, 3, 3] + [1] * (len(tokens) - 3)),
            "tokenizer.ggml.bos_token_id": Field(1),
            "tokenizer.ggml.eos_token_id": Field(2),
        }

    tok = tokenizer_from_gguf(Reader())
    assert tok.encode("ab a") == [7, 9]
    assert tok.encode("12") == [5, 6]  # smollm isolates every digit before BPE: "12" never merges
    assert tok.encode("<|im_start|>ab<|im_end|>") == [1, 7, 2]  # control tokens parsed
    assert tok.decode([1, 7, 2]) == "ab"  # and left out of output text
    assert tok.eos_token_ids == (2,) and not tok.add_bos
