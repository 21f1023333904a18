"""backends.embeddings: pooling, normalisation, dimensions, the context check, base64 and
the response; and the embedding options every local kind declares."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from backends import embeddings as emb
from backends.llamacpp.options import LlamaCppOptions
from backends.paged.options import EngineOptions
from backends.protocol import ContextLengthExceeded, EmbeddingRequest, InvalidRequest

HIDDEN = np.arange(12, dtype=np.float32).reshape(4, 3)  # 4 tokens, hidden size 3


def test_pooling_methods() -> None:
    np.testing.assert_allclose(emb.pool(HIDDEN, "mean"), HIDDEN.mean(0))
    np.testing.assert_allclose(emb.pool(HIDDEN, "last"), HIDDEN[-1])
    np.testing.assert_allclose(emb.pool(HIDDEN, "cls"), HIDDEN[0])
    with pytest.raises(ValueError):
        emb.PoolState("max", 4)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", emb.POOLINGS)
def test_pooling_in_chunks_equals_at_once(method: emb.Pooling) -> None:
    state = emb.PoolState(method, 4)
    state.add(HIDDEN[:1], 0)
    state.add(HIDDEN[1:3], 1)
    state.add(HIDDEN[3:], 3)
    np.testing.assert_allclose(state.result(), emb.pool(HIDDEN, method))
    state.reset()  # preempted: pooled again from the start
    with pytest.raises(RuntimeError):
        state.result()


def test_pooling_resolution_and_gguf_values() -> None:
    assert emb.DEFAULT_POOLING == "last"
    assert [emb.gguf_pooling(v) for v in (None, 0, 1, 2, 3, 4, "x")] == [None, None, "mean", "cls", "last", None, None]
    assert emb.resolve_pooling(None, None) == "last"
    assert emb.resolve_pooling(None, "mean") == "mean"
    assert emb.resolve_pooling("cls", "mean") == "cls"


def test_finish_normalises_and_renormalises_a_prefix() -> None:
    v = np.array([3.0, 4.0, 12.0])
    np.testing.assert_allclose(emb.finish_vector(v, None), v / 13)
    cut = emb.finish_vector(v, 2)
    np.testing.assert_allclose(cut, [0.6, 0.8], rtol=1e-6)
    assert cut.dtype == np.float32
    np.testing.assert_array_equal(emb.l2_normalize(np.zeros(3)), np.zeros(3))


def test_dimensions_only_for_matryoshka_models() -> None:
    assert emb.check_dimensions(None, 64, False, "m") is None
    assert emb.check_dimensions(64, 64, False, "m") is None  # the native size is always fine
    with pytest.raises(InvalidRequest, match="matryoshka") as exc:
        emb.check_dimensions(32, 64, False, "m")
    assert exc.value.param == "dimensions" and exc.value.status == 400
    assert emb.check_dimensions(32, 64, True, "m") == 32
    with pytest.raises(InvalidRequest) as big:
        emb.check_dimensions(65, 64, True, "m")
    assert big.value.param == "dimensions"
    assert emb.check_dimensions(16, 64, [16, 32], "m") == 16
    with pytest.raises(InvalidRequest, match="16, 32, 64") as listed:
        emb.check_dimensions(20, 64, [16, 32], "m")
    assert listed.value.param == "dimensions"


def test_context_check_per_input_and_truncate() -> None:
    many = EmbeddingRequest(model="m", input=["a", "b", "c"])
    with pytest.raises(ContextLengthExceeded) as exc:
        emb.fit_to_window(many, [[1], [1] * 5, [1] * 9], 4)
    assert exc.value.param == "input.1" and exc.value.status == 400
    one = EmbeddingRequest(model="m", input="a")
    with pytest.raises(ContextLengthExceeded) as single:
        emb.fit_to_window(one, [[1] * 5], 4)
    assert single.value.param == "input"
    cut = EmbeddingRequest(model="m", input=["a", "b"], truncate=True)
    assert emb.fit_to_window(cut, [[1, 2, 3, 4, 5], [6]], 4) == [[1, 2, 3, 4], [6]]
    with pytest.raises(InvalidRequest) as vocab:
        emb.check_vocabulary(EmbeddingRequest(model="m", input=[[1], [2, 900]]), [[1], [2, 900]], 100)
    assert vocab.value.param == "input.1"


def test_base64_is_little_endian_float32() -> None:
    v = np.array([1.0, -2.5, 0.125], dtype=np.float32)
    text = emb.encode(v, "base64")
    assert isinstance(text, str) and base64.b64decode(text) == np.array(v, dtype="<f4").tobytes()
    np.testing.assert_array_equal(emb.decode_base64(text), v)
    assert emb.encode(v, "float") == [1.0, -2.5, 0.125]


def test_response_counts_every_input_token() -> None:
    res = emb.build_response("alias", [np.ones(2), np.zeros(2)], 11, "float")
    assert res.object == "list" and res.model == "alias"
    assert [(d.index, d.object) for d in res.data] == [(0, "embedding"), (1, "embedding")]
    assert res.usage.prompt_tokens == res.usage.total_tokens == 11


@pytest.mark.parametrize("model", [LlamaCppOptions, EngineOptions])
def test_embedding_options_are_declared_per_kind(model: type) -> None:
    opts = model.from_dict({"pooling": "mean", "matryoshka": [256, 512]})
    assert opts.pooling == "mean" and opts.matryoshka == [256, 512]
    assert model.from_dict({}).pooling is None and model.from_dict({}).matryoshka is False
    for bad in ({"pooling": "max"}, {"matryoshka": "yes"}, {"matryoshka": []}, {"pool": "mean"}):
        with pytest.raises(ValueError):
            model.from_dict(bad)
