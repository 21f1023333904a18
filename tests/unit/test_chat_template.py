"""Chat templates render as Hugging Face renders them."""

from __future__ import annotations

import pytest

from backends.chat_template import render_chat
from backends.protocol import ChatMessage, InvalidRequest


def test_chatml_fallback_with_generation_prompt() -> None:
    text = render_chat(None, [ChatMessage(role="developer", content="be brief"), ChatMessage(role="user", content="hi")])
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_template_sees_bos_and_can_raise() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('no system role') }}{% endif %}[{{ m['content'] }}]{% endfor %}"
    )
    assert render_chat(template, [ChatMessage(role="user", content="x")], bos_token="<s>") == "<s>[x]"
    with pytest.raises(InvalidRequest, match="no system role"):
        render_chat(template, [ChatMessage(role="system", content="x")])


def test_sandbox_blocks_attribute_escapes() -> None:
    # A template from a downloaded model file must not reach Python internals.
    with pytest.raises(InvalidRequest, match="unsafe"):
        render_chat("{{ messages.__class__.__mro__ }}", [ChatMessage(role="user", content="x")])
