"""The paged engine on the real SmolLM2-135M GGUF (fp32, CPU): greedy tokens equal
transformers' for the same file, alone and batched; tokens equal llama.cpp's; prefix
caching and aborts on the real model; the backend answers a chat."""

from __future__ import annotations

import pytest
import torch

from backends.generation import GenerationRequest, SamplingParams
from backends.paged.engine import LLMEngine

pytestmark = pytest.mark.slow

N_TOKENS = 32

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
]

TOKENIZER_TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnewlines  ",
    "Numbers: 1234567 and 3.14159, dates 2024-05-01.",
    "Unicode: café, naïve, Ελληνικά, 日本語, emoji 🚀🎉",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'll we've they're",
    "<|endoftext|>text after a special token",
]


@pytest.fixture(scope="module")
def model_path() -> str:
    from backends.models import pull

    return str(pull("smollm2-135m"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: on a 2-core box shared with live servers, OpenMP threads that wait
    for a descheduled sibling make each op many times slower; one thread keeps this module's
    runtime predictable. Restored afterwards (the setting is process-wide)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(model_path: str) -> LLMEngine:
    return LLMEngine.from_model(model_path, kv_cache_gib=0.25, max_num_seqs=16, dtype="float32")


@pytest.fixture(autouse=True)
def blocks_back_to_free(request):
    yield
    if "engine" in request.fixturenames:
        from tests.unit.paged.conftest import assert_blocks_all_free

        assert_blocks_all_free(request.getfixturevalue("engine"))


@pytest.fixture(scope="module")
def prompts(engine: LLMEngine) -> list[list[int]]:
    from backends.chat_template import render_chat
    from backends.protocol import ChatMessage

    tok = engine.tokenizer
    return [
        tok.encode(render_chat(tok.chat_template, [ChatMessage(role="user", content=c)], bos_token=tok.bos_text, eos_token=tok.eos_text))
        for c in CHATS
    ]


@pytest.fixture(scope="module")
def hf_greedy(model_path: str, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, exactly N_TOKENS (EOS not special)."""
    import os

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch.float32
    )
    model.eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            past = None
            got: list[int] = []
            for _ in range(N_TOKENS):
                r = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = r.past_key_values
                nxt = int(r.logits[0, -1].argmax())
                got.append(nxt)
                ids = torch.tensor([[nxt]])
            outs.append(got)
    del model
    return outs


def greedy(rid: str, prompt: list[int]) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True))


def test_greedy_alone_equals_transformers(engine: LLMEngine, prompts, hf_greedy) -> None:
    for i, (p, expected) in enumerate(zip(prompts, hf_greedy)):
        out = engine.generate_sync([greedy(f"alone{i}", p)])[f"alone{i}"]
        assert out == expected, f"prompt {i}: {CHATS[i]!r}"


def test_greedy_batched_equals_transformers(engine: LLMEngine, prompts, hf_greedy) -> None:
    out = engine.generate_sync([greedy(f"batch{i}", p) for i, p in enumerate(prompts)])
    for i, expected in enumerate(hf_greedy):
        assert out[f"batch{i}"] == expected, f"prompt {i}: {CHATS[i]!r}"


def test_shared_system_prompt_hits_prefix_cache(engine: LLMEngine) -> None:
    system = "You are a meticulous assistant. Answer briefly and precisely, and never invent facts. " * 2
    tok = engine.tokenizer
    a = tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    b = tok.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    bm = engine.block_manager
    engine.generate_sync([GenerationRequest("sys-a", a, SamplingParams(max_tokens=4, temperature=0.0))])
    before = bm.prefix_hits
    engine.generate_sync([GenerationRequest("sys-b", b, SamplingParams(max_tokens=4, temperature=0.0))])
    assert bm.prefix_hits - before == (shared // bm.block_size) * bm.block_size
    assert shared >= 2 * bm.block_size


def test_abort_mid_generation_frees_blocks(engine: LLMEngine, prompts) -> None:
    bm = engine.block_manager
    engine.add_request(GenerationRequest("ab", prompts[0], SamplingParams(max_tokens=64, temperature=0.0)))
    for _ in range(4):
        engine.step()
    assert bm.num_free_blocks < bm.num_blocks
    assert engine.abort("ab")
    assert bm.num_free_blocks == bm.num_blocks


def test_tokens_equal_llama_cpp(engine: LLMEngine, model_path: str) -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path, vocab_only=True, verbose=False)
    for text in TOKENIZER_TEXTS:
        expected = vocab.tokenize(text.encode(), add_bos=True, special=True)
        assert engine.tokenizer.encode(text) == expected, text


async def test_backend_chat_answers(model_path: str) -> None:
    from backends.paged.backend import PagedBackend
    from backends.protocol import ChatCompletionRequest

    backend = PagedBackend(name="paged", model=model_path, kv_cache_gib=0.1)
    await backend.start()
    try:
        req = ChatCompletionRequest(model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=16, temperature=0.0)
        reply = await backend.chat(req)
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        text = "".join(
            [c.choices[0].delta.content or "" async for c in backend.chat_stream(req.model_copy(update={"stream": True})) if c.choices]
        )
        assert text == reply.choices[0].message.content
        assert backend.load().kv_usage == 0.0 and backend.load().healthy
    finally:
        await backend.close()


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("n", [1, 2])
async def test_backend_chat_with_a_json_schema_returns_valid_json(model_path: str, n: int) -> None:
    """Grammar-constrained decoding on the real vocabulary (llguidance over the GGUF's BPE),
    greedy and seeded choices alike, the prompt's KV shared by the choices."""
    import json

    import jsonschema

    from backends.paged.backend import PagedBackend
    from backends.protocol import ChatCompletionRequest

    backend = PagedBackend(name="paged", model=model_path, kv_cache_gib=0.1)
    await backend.start()
    try:
        req = ChatCompletionRequest.model_validate(
            {
                "model": "smollm2-135m",
                "messages": [{"role": "user", "content": "Invent a person, as JSON."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
                "max_tokens": 80,
                "temperature": 0.0 if n == 1 else 0.8,
                "seed": 3,
                "n": n,
            }
        )
        reply = await backend.chat(req)
        assert [c.index for c in reply.choices] == list(range(n))
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON)
        assert backend.engine.scheduler.num_grammar_rejections == 0
        from tests.unit.paged.conftest import assert_blocks_all_free

        assert_blocks_all_free(backend.engine)
    finally:
        await backend.close()
