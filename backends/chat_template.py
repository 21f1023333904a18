"""Chat templates: the Jinja template a model file carries, rendered as HF does."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.protocol import ChatMessage, InvalidRequest

# Used when a model file carries no template: ChatML, which SmolLM2 and Qwen use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: list[ChatMessage],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render messages into the prompt text the model was trained on."""
    plain: list[dict[str, Any]] = [{"role": m.role, "content": m.text()} for m in messages]
    for m in plain:
        if m["role"] == "developer":  # OpenAI's newer name for the system role
            m["role"] = "system"
    try:
        return _compile(template or CHATML_TEMPLATE).render(
            messages=plain,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.exceptions.TemplateError as exc:
        # Templates reject e.g. a conversation that does not alternate roles.
        raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", param="messages") from exc
