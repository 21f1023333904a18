"""`POST /v1/embeddings` with the official `openai` client, on the llama.cpp runner, the paged
engine (the real SmolLM2, CPU), and through remote backends to a turnout node; with keys and
limits on; and its bad input, each a 4xx in OpenAI's shape."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest

from tests.integration.dialect_servers import *  # noqa: F403
from tests.integration.dialect_servers import LLAMA, MODELS, PAGED, REMOTE_LLAMA, REMOTE_PAGED, AuthGateway, Served

pytestmark = pytest.mark.slow

TEXTS = ["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue rose by four percent."]


def client(served: Served, model: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.server(model).base_url, api_key="unused", max_retries=0, timeout=120)


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("model", MODELS)
def test_a_batch_embeds_in_order_normalised_and_counted(served: Served, model: str) -> None:
    answer = client(served, model).embeddings.create(model=model, input=TEXTS)  # the client asks for base64
    assert answer.model == model and [d.index for d in answer.data] == [0, 1, 2]
    vectors = [d.embedding for d in answer.data]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) > 100
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])  # the cat is nearer the kitten than revenue
    assert answer.usage.prompt_tokens == answer.usage.total_tokens >= 3 * 5
    alone = client(served, model).embeddings.create(model=model, input=TEXTS[2])  # one input, batched or not: the same
    assert cosine(alone.data[0].embedding, vectors[2]) > 0.9999


@pytest.mark.parametrize("model", [LLAMA, PAGED, REMOTE_PAGED])
def test_float_and_base64_and_token_ids(served: Served, model: str) -> None:
    url = served.server(model).base_url + "/embeddings"
    floats = httpx.post(url, json={"model": model, "input": "hello world", "encoding_format": "float"}, timeout=120).json()
    packed = httpx.post(url, json={"model": model, "input": "hello world", "encoding_format": "base64"}, timeout=120).json()
    vector = floats["data"][0]["embedding"]
    raw = base64.b64decode(packed["data"][0]["embedding"])
    decoded = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert len(decoded) == len(vector) and max(abs(a - b) for a, b in zip(decoded, vector)) < 1e-6
    ids = httpx.post(url, json={"model": model, "input": [[28, 29, 30], [31, 32]]}, timeout=120).json()
    assert [d["index"] for d in ids["data"]] == [0, 1] and ids["usage"]["prompt_tokens"] == 5


def test_the_two_engines_agree_on_one_model(served: Served) -> None:
    """The same GGUF (Q4_1) on llama.cpp and on the paged engine (dequantized): the same
    pooling, so nearly the same vectors."""
    llama = client(served, LLAMA).embeddings.create(model=LLAMA, input=TEXTS).data
    paged = client(served, PAGED).embeddings.create(model=PAGED, input=TEXTS).data
    assert all(cosine(a.embedding, b.embedding) > 0.99 for a, b in zip(llama, paged))
    remote = client(served, REMOTE_LLAMA).embeddings.create(model=REMOTE_LLAMA, input=TEXTS).data
    assert all(cosine(a.embedding, b.embedding) > 0.9999 for a, b in zip(llama, remote))


@pytest.mark.parametrize("model", [LLAMA, PAGED, REMOTE_LLAMA])
@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["ok", ""]}, 400, "input.1"),
        ({"input": ["x"] * 2049}, 400, "input"),
        ({"input": 5}, 400, "input"),
        ({"input": "hi", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"input": "hi", "dimensions": 7}, 400, "dimensions"),
        ({"input": ["short", "word " * 3000]}, 400, "input.1"),
        ({}, 400, "input"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(served: Served, model: str, body: dict, status: int, param: str) -> None:
    answer = httpx.post(served.server(model).base_url + "/embeddings", json={"model": model, **body}, timeout=120)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"], error


def test_an_unknown_model_is_a_404(served: Served) -> None:
    with pytest.raises(openai.NotFoundError):
        client(served, LLAMA).embeddings.create(model="nope", input="hi")


def test_keys_and_limits_apply(auth_gateway: AuthGateway) -> None:
    base = auth_gateway.server.base_url
    wrong = openai.OpenAI(base_url=base, api_key="sk-turnout-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as denied:
        wrong.embeddings.create(model=REMOTE_LLAMA, input="hi")
    assert denied.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    assert openai.OpenAI(base_url=base, api_key=auth_gateway.secret, max_retries=0).embeddings.create(model=REMOTE_LLAMA, input="hi").data
    limited = auth_gateway.limited_key(rpm=2)
    answers = [
        httpx.post(base + "/embeddings", headers={"Authorization": f"Bearer {limited}"}, json={"model": REMOTE_LLAMA, "input": "hi"}, timeout=120)
        for _ in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["type"] == "requests" and answers[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert "retry-after" in answers[2].headers
