"""The paged engine has no grammar support yet: `response_format` json_schema is a 400 naming
`response_format`, before any token, as json_object is."""

from __future__ import annotations

import pytest

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.backend import PagedBackend
from backends.protocol import ChatCompletionRequest, InvalidRequest

from .conftest import assert_blocks_all_free

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_engine_validate_refuses_a_json_schema(make_engine) -> None:
    engine = make_engine(num_blocks=8, block_size=4)
    request = GenerationRequest("s", [1, 2], SamplingParams(max_tokens=2, json_schema=SCHEMA))
    with pytest.raises(InvalidRequest, match="json_schema is not supported by the paged backend") as caught:
        engine.add_request(request)
    assert caught.value.param == "response_format"
    assert not engine.seqs


@pytest.mark.parametrize("stream", [False, True])
async def test_backend_refuses_a_json_schema_chat(stream: bool) -> None:
    backend = PagedBackend(name="tiny", model="dummy:tiny", num_blocks=16, block_size=4, max_num_seqs=2)
    await backend.start()
    try:
        request = ChatCompletionRequest.model_validate(
            {
                "model": "dummy:tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stream": stream,
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
            }
        )
        with pytest.raises(InvalidRequest) as caught:
            if stream:
                async for _ in backend.chat_stream(request):
                    pass
            else:
                await backend.chat(request)
        assert caught.value.param == "response_format"
        assert "json_schema" in str(caught.value)
    finally:
        await backend.close()
    assert_blocks_all_free(backend.engine)
