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


def test_continue_final_message_ends_inside_the_assistants_turn() -> None:
    history = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="Hello, I am")]
    text = render_chat(None, history, add_generation_prompt=False, continue_final_message=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nHello, I am"
    # Without it the same history is a closed turn.
    assert render_chat(None, history, add_generation_prompt=False).endswith("Hello, I am<|im_end|>\n")
    # An empty final message is a new turn: the generation prompt, as without it.
    empty = [history[0], ChatMessage(role="assistant", content="")]
    assert render_chat(None, empty, continue_final_message=True) == render_chat(None, history[:1])


def test_continue_final_message_through_a_trimming_template_and_a_refusal() -> None:
    trims = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</{{ m['role'] }}>{% endfor %}"
    history = [ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content=" so far ")]
    assert render_chat(trims, history, continue_final_message=True) == "<user>q</user><assistant>so far"
    hides = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | upper }}</{{ m['role'] }}>{% endfor %}"
    with pytest.raises(InvalidRequest, match="cannot be continued"):
        render_chat(hides, [ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="abc")], continue_final_message=True)
