"""Chat templates: the Jinja template a model file carries, rendered as HF does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.protocol import ChatMessage, InvalidRequest, ToolDefinition
from backends.tools.formats import template_format
from backends.tools.prompt import template_messages

# Used when a model file carries no template: ChatML, which SmolLM2 and Qwen use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON as Hugging Face's template environment writes it (templates are written against
    it): keys in their order and no HTML escaping, where Jinja's own filter sorts the keys and
    escapes <, > and &."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def render_chat(
    template: str | None,
    messages: list[ChatMessage],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools: list[ToolDefinition] | None = None,
) -> str:
    """Render messages (and the tools offered, with their call history) into the prompt text
    the model was trained on: through the template itself where it renders tools, else with
    turnout's fallback tool prompt (backends.tools.prompt).

    `continue_final_message`: the prompt ends inside the final (assistant) message, right
    after its content, so that the model goes on with it (as HF's and vLLM's option: the
    rendered text is cut after the content's last occurrence; an empty one is a new turn)."""
    if continue_final_message:
        final = messages[-1].text()
        if not final:
            return render_chat(template, messages[:-1], bos_token=bos_token, eos_token=eos_token, tools=tools)
        rendered = render_chat(template, messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=False, tools=tools)
        for content in (final, final.strip()):  # some templates trim the content
            cut = rendered.rfind(content) if content else -1
            if cut >= 0:
                return rendered[: cut + len(content)]
        raise InvalidRequest("the model's chat template does not render the final message's content as given, so it cannot be continued", param="messages")
    source = template or CHATML_TEMPLATE
    plain, tool_list = template_messages(messages, tools or [], native=template_format(source) is not None)
    context: dict[str, Any] = {}
    if tool_list is not None:
        context["tools"] = tool_list
    try:
        return _compile(source).render(
            messages=plain,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **context,
        )
    except jinja2.exceptions.TemplateError as exc:
        # Templates reject e.g. a conversation that does not alternate roles.
        raise InvalidRequest(f"messages do not fit the model's chat template: {exc}", param="messages") from exc
