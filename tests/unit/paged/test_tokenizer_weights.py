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


class Field:
    """A GGUF reader's field, as tokenizer_from_gguf reads it."""

    def __init__(self, v):  # type: ignore[no-untyped-def]
        self.v = v

    def contents(self):  # type: ignore[no-untyped-def]
        return self.v


def test_gguf_tokenizer_splits_digits_for_smollm() -> None:
    """A tiny synthetic GGUF vocabulary through the same builder the real model uses."""
    from backends.paged.tokenizer import tokenizer_from_gguf

    tokens = ["<unk>", "<|im_start|>", "<|im_end|>", "a", "b", "1", "2", "ab", "Ġ", "Ġa", "12"]
    merges = ["a b", "Ġ a", "1 2"]

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


def _byte_level_gguf_tokenizer(extra: list[str], types: list[int] | None = None):
    """A byte-level BPE tokenizer from a synthetic GGUF vocabulary: three control tokens, the
    256 byte stand-ins, then `extra` pieces (their GGUF token types in `types`, normal by
    default)."""
    from backends.paged.tokenizer import _byte_level_alphabet, tokenizer_from_gguf

    alphabet = sorted(_byte_level_alphabet().items(), key=lambda kv: kv[1])
    tokens = ["<unk>", "<|im_start|>", "<|im_end|>", *(c for c, _ in alphabet), *extra]
    token_types = [3, 3, 3] + [1] * 256 + (types or [1] * len(extra))

    class Reader:
        fields = {
            "tokenizer.ggml.model": Field("gpt2"), "tokenizer.ggml.pre": Field("default"),
            "tokenizer.ggml.tokens": Field(tokens), "tokenizer.ggml.merges": Field([]),
            "tokenizer.ggml.token_type": Field(token_types), "tokenizer.ggml.eos_token_id": Field(2),
        }  # fmt: skip

    return tokenizer_from_gguf(Reader())


def test_byte_level_table_decodes_as_the_tokenizer_does() -> None:
    """The table's bytes, joined and read as UTF-8, equal decode() on any ids: whole words,
    characters split across tokens, stray bytes, specials (left out) and an added token."""
    import random

    from backends.paged.tokenizer import make_detokenizer

    # "Ġhello" (" hello"), "Ã©" (é as its two byte stand-ins), "ðŁ" (half of an emoji), an added token.
    tok = _byte_level_gguf_tokenizer(["Ġhello", "Ã©", "ðŁ", "<tool>"], types=[1, 1, 1, 4])
    table = tok.token_bytes()
    assert table is not None and len(table) == tok.vocab_size
    assert table[259] == b" hello" and table[260] == "é".encode() and table[262] == b"<tool>" and table[1] == b""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 12))]
        text = tok.decode(ids)
        assert b"".join(table[i] for i in ids).decode("utf-8", errors="replace") == text
        # The detokenizer's deltas give the same text, short of an unfinished last character.
        detok = make_detokenizer(tok, [])
        streamed = "".join(detok.add(i) for i in ids)
        assert text.startswith(streamed) and set(text[len(streamed) :]) <= {"\ufffd"}


def test_a_tokenizer_without_a_byte_level_decoder_keeps_the_general_detokenizer() -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    from backends.paged.tokenizer import HFTokenizer, make_detokenizer

    raw = RawTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok = HFTokenizer(raw, bos_token_id=None, eos_token_ids=(), add_bos=False, chat_template=None)
    assert tok.token_bytes() is None
    assert isinstance(make_detokenizer(tok, [0]), IncrementalDetokenizer)


def test_byte_detokenizer_replaces_a_bad_byte_as_soon_as_the_next_one_shows_it() -> None:
    """The table's detokenizer: a split character comes whole with its last byte, as before;
    a byte that can never begin a character is U+FFFD once the next byte shows that, instead
    of being held with the bytes after it (the general detokenizer's window)."""
    from backends.paged.tokenizer import ByteDetokenizer, make_detokenizer

    tok = ByteTokenizer(320)
    detok = make_detokenizer(tok, [1])
    assert isinstance(detok, ByteDetokenizer)
    ids = [b + ByteTokenizer.OFFSET for b in "é".encode()[:1] + "é".encode() + b"!"]  # C3, C3 A9, !
    assert [detok.add(i) for i in ids] == ["", "\ufffd", "é", "!"]
    assert detok.add(300) == "<300>"  # an id past the bytes reads as its "<id>" text
    assert make_detokenizer(tok, [1]).add(10_000) == ""  # past the table: no text


def test_real_smollm2_tokenizer_has_a_byte_table() -> None:
    """SmolLM2's GGUF vocabulary (skipped without it in the model store) passes the table's
    check against decode(), id by id."""
    from backends.models import ModelNotFound, resolve_model
    from backends.paged.loader import ModelSource, load_config_and_tokenizer

    try:
        path = resolve_model("smollm2-135m")
    except ModelNotFound:
        pytest.skip("smollm2-135m is not in the model store")
    _, tok = load_config_and_tokenizer(ModelSource.parse(str(path)))
    table = tok.token_bytes()
    assert table is not None and len(table) == tok.vocab_size
    ids = tok.encode("Hello, wörld! 🚀 ok")
    assert b"".join(table[i] for i in ids).decode() == tok.decode(ids)
