"""Fixtures of the GPU tests: the figures they measure (written to TURNOUT_GPU_REPORT when it
is set, so that a device run brings them back), and the real SmolLM2 GGUF with its chat
prompts and transformers' fp32 greedy answers, shared by test_real_weights and test_fp8."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

# Real chat prompts for the real-weight checks, rendered with the model's own chat template.
CHATS = [
    "What is the capital of France?",
    "Explain how a CPU cache works.",
    "Write a haiku about the sea.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a compiler do?",
    "List three prime numbers greater than 100.",
]
N_TOKENS = 32

_FIGURES: dict[str, Any] = {}


@pytest.fixture
def gpu_report(request: pytest.FixtureRequest):
    """record(**figures): kept under the test's name, printed, and written at once (a run cut
    short by a timeout keeps what it measured) to the JSON file named by TURNOUT_GPU_REPORT."""

    def record(**figures: Any) -> None:
        _FIGURES.setdefault(request.node.name, {}).update(figures)
        print(request.node.name, json.dumps(figures, default=str))
        path = os.environ.get("TURNOUT_GPU_REPORT")
        if path:
            Path(path).write_text(json.dumps(_FIGURES, indent=2, default=str))

    return record


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF named by TURNOUT_SMOLLM2_GGUF (skipped without it)."""
    value = os.environ.get("TURNOUT_SMOLLM2_GGUF")
    if not value:
        pytest.skip("TURNOUT_SMOLLM2_GGUF is not set (path of SmolLM2-135M-Instruct.Q4_1.gguf)")
    path = Path(value).expanduser()
    if not path.is_file():
        pytest.skip(f"TURNOUT_SMOLLM2_GGUF={value} is not a file")
    return path


@pytest.fixture(scope="session")
def smollm2_prompts(smollm2_gguf: Path) -> list[list[int]]:
    """CHATS as token ids, each rendered with the GGUF's chat template (the engine's tokenizer,
    whose ids equal llama.cpp's)."""
    from backends.chat_template import render_chat
    from backends.paged.loader import ModelSource, load_config_and_tokenizer
    from backends.protocol import ChatMessage

    _, tok = load_config_and_tokenizer(ModelSource.parse(str(smollm2_gguf)))
    return [
        tok.encode(render_chat(tok.chat_template, [ChatMessage(role="user", content=c)], bos_token=tok.bos_text, eos_token=tok.eos_text))
        for c in CHATS
    ]


def load_hf_gguf(path: Path, dtype: Any) -> Any:
    """transformers' own model of the GGUF (its own dequantization), on the GPU."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    return model.to("cuda").eval()


@pytest.fixture(scope="session")
def smollm2_hf_fp32(smollm2_gguf: Path) -> Any:
    """transformers' fp32 SmolLM2 on the GPU: the ground truth of the real-weight checks."""
    import torch

    return load_hf_gguf(smollm2_gguf, torch.float32)


@pytest.fixture(scope="session")
def smollm2_hf_greedy(smollm2_hf_fp32: Any, smollm2_prompts: list[list[int]]) -> list[list[int]]:
    """transformers' fp32 greedy answers, N_TOKENS each: the expected tokens of the fp32
    engine, and the script the bf16 and FP8 engines are teacher-forced along."""
    from tests.gpu.scoring import hf_greedy

    return [hf_greedy(smollm2_hf_fp32, p, N_TOKENS) for p in smollm2_prompts]
