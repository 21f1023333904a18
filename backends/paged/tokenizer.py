"""Tokenizers: built from a GGUF's BPE vocab, merges and pre-tokenizer (so tokens match
llama.cpp's), from an HF tokenizer.json, or a byte tokenizer for dummy models; each also gives
its vocabulary to llguidance (`grammar_compiler`); plus incremental detokenization for
streaming."""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from backends.grammar import GrammarCompiler

# llama.cpp's pre-tokenizer regexes by `tokenizer.ggml.pre` (llama-vocab.cpp). Each is applied
# in turn as an isolating split, as llama.cpp does, before byte-level BPE.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "default": [_GPT2],
    "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "refact": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3],
    "llama3": [_LLAMA3],
    "dbrx": [_LLAMA3],
    "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2],
    "stablelm2": [_QWEN2],
}
# Pre-tokenizers for which llama.cpp looks a whole word up in the vocab before merging.
_IGNORE_MERGES = {"llama-bpe", "llama3", "dbrx", "smaug-bpe"}

# GGUF token types (gguf.TokenType).
_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer(Protocol):
    """What the engine and backend need of a tokenizer."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    bos_text: str
    eos_text: str
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_text(self, token_id: int) -> str: ...

    def grammar_compiler(self, vocab_size: int) -> GrammarCompiler:
        """This vocabulary as llguidance sees it, for a model whose logits are `vocab_size`
        wide (ids past the tokenizer's own are never allowed). Costs up to a second: callers
        build it once (PagedBackend.grammar_compiler)."""
        ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the model's special tokens and chat template."""

    def __init__(
        self,
        tok: Any,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self._tok = tok
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_text = tok.id_to_token(bos_token_id) or "" if bos_token_id is not None else ""
        self.eos_text = tok.id_to_token(eos_token_ids[0]) or "" if eos_token_ids else ""
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._token_bytes: list[bytes] | None | bool = False  # False: not built yet

    def encode(self, text: str) -> list[int]:
        """Token ids with special tokens parsed and BOS prepended where the model wants it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens (EOS, chat markers) left out, as vLLM does."""
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token's own text (for logprobs), special tokens included."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def special_token_ids(self) -> set[int]:
        """Ids of the special (control) tokens, which decode drops."""
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def token_bytes(self) -> list[bytes] | None:
        """Every id's bytes, such that decode(ids) is their concatenation read as UTF-8 (bad
        bytes replaced), for a byte-level BPE decoder (GPT-2 style: GGUF "gpt2" vocabularies,
        Llama 3, Qwen2, SmolLM2); None for any other decoder. Built on first call (tens of
        milliseconds) and checked against decode() id by id: one disagreement, and None."""
        if self._token_bytes is False:
            self._token_bytes = _byte_level_table(self._tok, self.vocab_size)
        return self._token_bytes  # type: ignore[return-value]

    def grammar_compiler(self, vocab_size: int) -> GrammarCompiler:
        """From the tokenizer's JSON, as llguidance reads HF tokenizers (see Tokenizer)."""
        from backends.grammar import GrammarCompiler

        return GrammarCompiler.from_tokenizer_json(self._tok.to_str(), vocab_size=vocab_size, eos_token_ids=list(self.eos_token_ids))


def tokenizer_from_gguf(reader: Any) -> HFTokenizer:
    """Byte-level BPE tokenizer from a GGUF's tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    fields = reader.fields

    def get(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        return default if f is None else f.contents()

    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported by the paged backend yet "
            "(byte-level BPE 'gpt2' is); use an HF model directory with tokenizer.json"
        )
    tokens: list[str] = get("tokenizer.ggml.tokens")
    merges: list[str] = get("tokenizer.ggml.merges") or []
    types: list[int] = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = get("tokenizer.ggml.pre", "default")
    regexes = PRE_TOKENIZER_REGEXES.get(pre)
    if regexes is None:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported by the paged backend yet")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES)
    tok = RawTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|eot_id|>, ...) are matched in the text before BPE, as
    # llama.cpp does with parse_special; user-defined tokens likewise but are not "special".
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL])
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if user:
        tok.add_tokens(user)
    bos = get("tokenizer.ggml.bos_token_id")
    eos = get("tokenizer.ggml.eos_token_id")
    eot = get("tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None))
    return HFTokenizer(
        tok,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=eos_ids,
        # llama.cpp's default for BPE vocabularies without the flag is not to add BOS.
        add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
        chat_template=get("tokenizer.chat_template"),
    )


def tokenizer_from_hf_dir(model_dir: Path, eos_token_ids: tuple[int, ...]) -> HFTokenizer:
    """tokenizer.json plus tokenizer_config.json (chat template, BOS/EOS, add_bos_token)."""
    from tokenizers import Tokenizer as RawTokenizer

    tok = RawTokenizer.from_file(str(model_dir / "tokenizer.json"))
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    def token_id(value: Any) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(text) if text else None

    bos_id = token_id(cfg.get("bos_token"))
    eos_id = token_id(cfg.get("eos_token"))
    eos_ids = tuple(dict.fromkeys([*([eos_id] if eos_id is not None else []), *eos_token_ids]))
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return HFTokenizer(
        tok,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos=bool(cfg.get("add_bos_token", False)),
        chat_template=template,
    )


class ByteTokenizer:
    """UTF-8 bytes as tokens, for dummy models: 0 pad, 1 BOS, 2 EOS, 3..258 the bytes.
    Ids beyond that (random models sample them) read as "<id>"."""

    OFFSET = 3

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id = 1
        self.eos_token_ids = (2,)
        self.bos_text = "<s>"
        self.eos_text = "</s>"
        self.chat_template: str | None = None
        # Every id's bytes, built once: decoding runs for every generated token of every
        # sequence, so it must be a table lookup (benchmarks decode 65k tokens a second).
        self._table = [self._bytes(i) for i in range(max(vocab_size, self.OFFSET + 256))]

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *(b + self.OFFSET for b in text.encode())]

    def _bytes(self, token_id: int) -> bytes:
        if token_id < self.OFFSET:
            return b""
        if token_id < self.OFFSET + 256:
            return bytes([token_id - self.OFFSET])
        return f"<{token_id}>".encode()

    def decode(self, ids: list[int]) -> str:
        return b"".join(map(self._table.__getitem__, ids)).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self._table[token_id].decode("utf-8", errors="replace")

    def special_token_ids(self) -> set[int]:
        """Pad, BOS and EOS."""
        return set(range(self.OFFSET))

    def token_bytes(self) -> list[bytes]:
        """Every id's bytes: decode(ids) is their concatenation read as UTF-8."""
        return self._table

    def grammar_compiler(self, vocab_size: int) -> GrammarCompiler:
        """From every id's bytes (see Tokenizer): the specials are none, ids past the bytes
        are their "<id>" text, as decode shows them."""
        from backends.grammar import GrammarCompiler

        specials = list(range(self.OFFSET))
        return GrammarCompiler.from_token_bytes(
            [self._bytes(i) for i in range(vocab_size)], eos_token_id=self.eos_token_ids[0], bos_token_id=self.bos_token_id, special_ids=specials
        )


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's scheme): bytes that are
    printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves, the other 68 for
    chr(256), chr(257), ... in byte order. Returns char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _byte_level_table(tok: Any, vocab_size: int) -> list[bytes] | None:
    """HFTokenizer.token_bytes for a `tokenizers.Tokenizer` (see there), or None."""
    from tokenizers import decoders

    if not isinstance(tok.decoder, decoders.ByteLevel):
        return None
    alphabet = _byte_level_alphabet()
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    table: list[bytes] = []
    for i in range(vocab_size):
        piece = tok.id_to_token(i)
        if piece is None or i in special:
            table.append(b"")  # decode leaves specials out (skip_special_tokens)
        elif all(c in alphabet for c in piece):
            table.append(bytes(alphabet[c] for c in piece))
        else:  # not byte-level text (an added token): its own UTF-8
            table.append(piece.encode())
    # The check: every id alone decodes as its bytes do (whole pieces, and partial characters,
    # both replaced alike).
    texts = tok.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=True)
    if any(t != b.decode("utf-8", errors="replace") for t, b in zip(texts, table)):
        return None
    return table


class ByteTables:
    """A byte-level tokenizer's per-id bytes, and each id's text where its bytes are whole
    UTF-8 characters (None where they are not: part of a character, or bad bytes)."""

    __slots__ = ("bytes", "texts")

    def __init__(self, table: list[bytes]) -> None:
        self.bytes = table
        self.texts: list[str | None] = []
        for piece in table:
            try:
                self.texts.append(piece.decode())
            except UnicodeDecodeError:
                self.texts.append(None)


def byte_tables(tokenizer: Tokenizer) -> ByteTables | None:
    """`tokenizer`'s ByteTables if its decode is its tokens' bytes read as UTF-8
    (`token_bytes()`), else None. Build once per tokenizer and share: it walks the vocabulary."""
    table = tokenizer.token_bytes() if hasattr(tokenizer, "token_bytes") else None
    return None if table is None else ByteTables(table)


class ByteDetokenizer:
    """Text deltas for a tokenizer whose decode is its tokens' bytes read as UTF-8
    (`byte_tables`): a table lookup per token, instead of IncrementalDetokenizer's two decodes
    of a window. A character split across tokens comes whole with its last byte; bytes that
    can never complete one come as U+FFFD once the next byte shows it; the concatenated deltas
    equal decode() of the ids (an unfinished character at the end is never emitted, as
    IncrementalDetokenizer holds it back too)."""

    __slots__ = ("_bytes", "_texts", "_pending")

    def __init__(self, tables: ByteTables) -> None:
        self._bytes = tables.bytes
        self._texts = tables.texts
        self._pending = b""  # the start of a character whose other bytes have not come yet

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (maybe empty)."""
        if not self._pending:
            try:
                text = self._texts[token_id]
            except IndexError:  # an id of the model's padded vocabulary, past the tokenizer's: no text
                return ""
            if text is not None:  # the common case: whole characters, nothing held
                return text
            piece = self._bytes[token_id]
        else:
            piece = self._pending + (self._bytes[token_id] if token_id < len(self._bytes) else b"")
        # What codecs' incremental UTF-8 decoder does, without its Python-level wrapper.
        text, used = codecs.utf_8_decode(piece, "replace", False)
        self._pending = piece[used:]
        return text


def make_detokenizer(tokenizer: Tokenizer, prompt_ids: list[int], tables: ByteTables | None = None) -> IncrementalDetokenizer | ByteDetokenizer:
    """The cheapest detokenizer that gives `tokenizer`'s text: the byte tables' (`tables`, or
    built here) where it has them, else the general one (which keeps a few prompt tokens as
    context)."""
    if tables is None:
        tables = byte_tables(tokenizer)
    return ByteDetokenizer(tables) if tables is not None else IncrementalDetokenizer(tokenizer, prompt_ids)


class IncrementalDetokenizer:
    """Turns generated ids into text deltas without re-decoding everything each step and
    without emitting half a UTF-8 character (vLLM's prefix/read offset scheme)."""

    # Prompt tokens kept as context: decoders that strip a leading space (SentencePiece)
    # need something before the first generated token.
    CONTEXT = 4
    MAX_PENDING = 6

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-self.CONTEXT :])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        # A trailing U+FFFD may be a character still being completed; but a UTF-8 character is
        # at most 4 bytes, so after MAX_PENDING more tokens it is an invalid byte for good.
        # Emitting it then keeps the window (and each decode) short instead of growing forever.
        settled = not full.endswith("\ufffd") or len(self._ids) - self._read >= self.MAX_PENDING
        if len(full) > len(prefix_text) and settled:
            delta = full[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return delta
        return ""
