"""What a route serves: embeddings only where a backend of its pool embeds (the `Embeds`
capability), chat and completions not from a pool of `task: embed` backends; each a 400
naming the model before anything is reserved or dispatched."""

from __future__ import annotations

import pytest

from backends.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, Embeds, InvalidRequest
from gateway.dispatch import Dispatcher
from policies.schema import parse_config
from tests.unit.test_timeouts import Answers


class Embedder(Answers):
    """A backend that also embeds."""

    async def embeddings(self, request: EmbeddingRequest) -> EmbeddingResponse:
        data = [Embedding(index=i, embedding=[1.0]) for i, _ in enumerate(request.inputs())]
        return EmbeddingResponse(data=data, model=request.model, usage=EmbeddingUsage(prompt_tokens=1, total_tokens=1))


def dispatcher() -> Dispatcher:
    config = parse_config(
        "backends:\n"
        "  - {name: chatty, kind: remote, model: m, url: 'http://127.0.0.1:9', metrics_url: none}\n"
        "  - {name: vectors, kind: remote, model: e, url: 'http://127.0.0.1:9', metrics_url: none, task: embed}\n"
        "routes:\n"
        "  - {model: chat, backends: [chatty]}\n"
        "  - {model: embed, backends: [vectors]}\n"
    )
    return Dispatcher(config, {"chatty": Answers("chatty"), "vectors": Embedder("vectors")})


def test_embeddings_need_a_backend_that_embeds() -> None:
    d = dispatcher()
    assert isinstance(d.backends["vectors"], Embeds) and not isinstance(d.backends["chatty"], Embeds)
    d.check_serves("embed", "embeddings")
    with pytest.raises(InvalidRequest, match="does not serve embeddings") as info:
        d.check_serves("chat", "embeddings")
    assert info.value.param == "model" and info.value.status == 400


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_an_embedding_model_serves_no_generation(kind: str) -> None:
    d = dispatcher()
    d.check_serves("chat", kind)
    with pytest.raises(InvalidRequest, match="embedding model: it serves /v1/embeddings only"):
        d.check_serves("embed", kind)


def test_an_unknown_model_is_left_to_the_call() -> None:
    dispatcher().check_serves("nope", "embeddings")  # the call answers its 404
