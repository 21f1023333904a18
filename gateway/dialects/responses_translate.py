"""The Responses API onto the contract and back: a ResponsesRequest becomes a
ChatCompletionRequest (its input items the chat's messages, function tools the chat's tools,
`text.format` the response_format), what turnout cannot honour a 400 naming the field; a
ChatCompletion becomes the Response object, the request's settings echoed in it.

Stateless: nothing is stored, so `store: true`, `previous_response_id` and `conversation`
are refused; a conversation is sent whole, as input items (earlier output items included).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ValidationError

from backends.protocol import ChatCompletion, ChatCompletionRequest, InvalidRequest, Usage
from gateway.body import check_bounds
from gateway.dialects.responses_types import (
    FunctionCallItem,
    FunctionCallOutput,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionTool,
    IncompleteDetails,
    InputText,
    MessageItem,
    OtherChoice,
    OtherItem,
    OtherPart,
    OtherTool,
    OutputMessage,
    OutputText,
    OutputTextPart,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
    new_id,
)
from policies.schema import ServerConfig

UNSUPPORTED = "unsupported_parameter"

# Fields of the API that turnout does not serve, and why (refused when set).
_NOT_SERVED = {
    "previous_response_id": "turnout's Responses API is stateless and stores no responses: send the whole conversation "
    "as `input` items (the earlier output items included)",
    "conversation": "turnout's Responses API is stateless and keeps no conversations: send the whole conversation as `input` items",
    "include": "turnout adds no extra output data (logprobs, reasoning content, tool sources)",
    "reasoning": "turnout's models are not reasoning models",
    "background": "responses run in the foreground only (nothing is stored to poll)",
    "top_logprobs": "the Responses API's logprobs are not served; use /v1/chat/completions with logprobs",
    "max_tool_calls": "the number of tool calls is not bounded by turnout",
    "prompt": "prompt templates are stored on OpenAI's platform, not here",
    "prompt_cache_retention": "the engines' prefix caches keep what they can; no retention is promised",
    "prompt_cache_options": "the engines' prefix caches take no options",
    "context_management": "the context is not compacted: an input over the model's context is a 400",
    "moderation": "turnout runs no moderation",
    "image": "turnout's models take text only",
    "access_programs": "turnout has no access programs",
    "background_options": "responses run in the foreground only",
}

# The contract's names -> the Responses API's, for the errors of the contract's validation.
_TOP_NAMES = {"max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens", "response_format": "text.format"}


def refuse(param: str, why: str) -> InvalidRequest:
    """The 400 for a field turnout does not serve."""
    return unsupported(param, f"'{param}' is not supported: {why}.")


def unsupported(param: str, message: str) -> InvalidRequest:
    """The 400 for a value of `param` turnout does not serve, in `message`'s words."""
    return InvalidRequest(message, param=param, code=UNSUPPORTED)


# -- the request --------------------------------------------------------------------------------


def _check_fields(req: ResponsesRequest) -> None:
    """Refuse what is set but not served, and any field the API does not define."""
    for name in req.model_extra or {}:
        raise InvalidRequest(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    for name, why in _NOT_SERVED.items():
        value = getattr(req, name)
        if name == "reasoning" and isinstance(value, dict) and all(v is None for v in value.values()):
            continue  # an empty reasoning config asks for nothing
        if value is not None and value is not False and value != [] and not (name == "top_logprobs" and value == 0):
            raise refuse(name, why)
    if req.store:
        raise unsupported("store", "store: true is not supported: turnout keeps no responses (its Responses API is stateless); "
                          "omit 'store' or set it to false.")  # fmt: skip
    if req.truncation == "auto":
        raise unsupported("truncation", "truncation: 'auto' is not supported: an input over the model's context is a 400, never cut; "
                          "use 'disabled' (the default).")  # fmt: skip
    if req.service_tier not in (None, "auto", "default"):
        raise refuse("service_tier", "turnout has one service tier ('default')")
    if req.stream_options is not None and req.stream_options.include_obfuscation:
        raise refuse("stream_options.include_obfuscation", "stream events are not padded")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise refuse("text.verbosity", "the models' verbosity is not steered")
    if isinstance(req.tool_choice, OtherChoice):
        raise unsupported("tool_choice", f"tool_choice of type {_kind(req.tool_choice.type)} is not supported: turnout serves "
                          "'auto', 'none', 'required' and {'type': 'function', 'name': ...}.")  # fmt: skip
    _refuse_extras(req, ())


def _refuse_extras(model: BaseModel, path: tuple[str | int, ...]) -> None:
    """Refuse any field a nested part of the request has that its model does not declare."""
    if path:
        for name in model.model_extra or {}:
            where = ".".join(map(str, (*path, name)))
            raise refuse(where, "turnout's Responses API does not serve this field")
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if isinstance(item, BaseModel) and not isinstance(item, (OtherItem, OtherPart, OtherTool, OtherChoice)):
                _refuse_extras(item, (*path, name, index) if isinstance(value, list) else (*path, name))


def _kind(value: object) -> str:
    return repr(value) if isinstance(value, str) else "(none)"


def _text_parts(parts: str | list[Any], where: str) -> str | list[dict[str, str]]:
    """Message content as the contract's: a string, or text parts (input_text, output_text)."""
    if isinstance(parts, str):
        return parts
    out = []
    for index, part in enumerate(parts):
        if isinstance(part, OtherPart):
            raise unsupported(f"{where}.{index}.type", f"Content of type {_kind(part.type)} is not supported: turnout's models "
                              "take text only ('input_text', 'output_text' parts).")  # fmt: skip
        assert isinstance(part, (InputText, OutputTextPart))
        out.append({"type": "text", "text": part.text})
    return out


class _Messages:
    """Input items as the contract's messages, and where each message came from (for errors)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origin: list[str] = []  # the Responses param each message's content came from
        self.calls: dict[str, str] = {}  # call_id -> function name

    def add(self, message: dict[str, Any], origin: str) -> None:
        self.messages.append(message)
        self.origin.append(origin)

    def call(self, item: FunctionCallItem, origin: str) -> None:
        """A function call: into the assistant message just before it (the calls of one
        turn, and its text, are one assistant message in the contract), else a new one."""
        call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
        self.calls[item.call_id] = item.name
        last = self.messages[-1] if self.messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
            return
        self.add({"role": "assistant", "content": None, "tool_calls": [call]}, origin)


def _messages(req: ResponsesRequest) -> _Messages:
    out = _Messages()
    if req.instructions is not None:
        out.add({"role": "system", "content": req.instructions}, "instructions")
    if isinstance(req.input, str):
        out.add({"role": "user", "content": req.input}, "input")
        return out
    for index, item in enumerate(req.input):
        where = f"input.{index}"
        if isinstance(item, MessageItem):
            content = _text_parts(item.content, f"{where}.content")
            last = out.messages[-1] if out.messages else None
            if item.role == "assistant" and last is not None and last["role"] == "assistant" and last.get("content") is None:
                last["content"] = content  # text after the calls of the same turn
            else:
                out.add({"role": item.role, "content": content}, f"{where}.content")
        elif isinstance(item, FunctionCallItem):
            out.call(item, where)
        elif isinstance(item, FunctionCallOutputItem):
            message: dict[str, Any] = {"role": "tool", "tool_call_id": item.call_id, "content": _text_parts(item.output, f"{where}.output")}
            if item.call_id in out.calls:
                message["name"] = out.calls[item.call_id]  # some templates name the function a result is of
            out.add(message, f"{where}.output")
        else:
            raise unsupported(f"{where}.type", f"Input items of type {_kind(item.type)} are not supported: turnout serves "
                              "'message', 'function_call' and 'function_call_output' items.")  # fmt: skip
    return out


def _tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    if req.tools is None:
        return None
    tools = []
    for index, tool in enumerate(req.tools):
        if isinstance(tool, OtherTool):
            raise unsupported(f"tools.{index}.type", f"Tools of type {_kind(tool.type)} are not supported: turnout serves "
                              "function tools only (type 'function'); built-in tools run on OpenAI's platform.")  # fmt: skip
        assert isinstance(tool, FunctionTool)
        function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters, "strict": tool.strict}
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tools


def _response_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.name is None:
        raise InvalidRequest("Missing required parameter: 'text.format.name'.", param="text.format.name")
    if fmt.schema_ is None:
        raise InvalidRequest("Missing required parameter: 'text.format.schema'.", param="text.format.schema")
    schema = {"name": fmt.name, "schema": fmt.schema_, "description": fmt.description, "strict": fmt.strict}
    return {"type": "json_schema", "json_schema": {k: v for k, v in schema.items() if v is not None}}


def chat_request(req: ResponsesRequest, server: ServerConfig) -> ChatCompletionRequest:
    """The request as a chat completion (see `to_chat`)."""
    return to_chat(req, server)[0]


def to_chat(req: ResponsesRequest, server: ServerConfig) -> tuple[ChatCompletionRequest, list[str]]:
    """The request as a chat completion, and the Responses param each of its messages came
    from (for `renamed`); a 400 naming the Responses field for what turnout does not serve,
    and for what the contract refuses. The policy's request bounds (`server.max_messages`,
    ...) hold for the translated messages as for a chat's."""
    _check_fields(req)
    messages = _messages(req)
    data: dict[str, Any] = {"model": req.model, "messages": messages.messages, "stream": bool(req.stream)}
    fields = {
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": _tools(req),
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": _response_format(req),
        "user": req.user or req.safety_identifier,
    }
    data.update({k: v for k, v in fields.items() if v is not None})
    choice = req.tool_choice
    if choice is not None:
        data["tool_choice"] = {"type": "function", "function": {"name": choice.name}} if isinstance(choice, FunctionChoice) else choice
    try:
        check_bounds(data, server)
        return ChatCompletionRequest.model_validate(data), messages.origin
    except InvalidRequest as exc:
        raise renamed(exc, messages.origin) from None
    except ValidationError as exc:
        error = exc.errors()[0]
        param = _responses_param(tuple(p for p in error.get("loc", ()) if not _union_tag(p)), messages.origin)
        message = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{param}': {message}", param=param) from None


def renamed(exc: InvalidRequest, origin: list[str]) -> InvalidRequest:
    """A 400 about the contract's request (the bounds' or a backend's: `messages`,
    `tools.0.function.strict`) about the Responses request instead: its param, and the
    param where the message quotes it. `origin`: from `to_chat`."""
    if exc.param is None:
        return exc
    param = _responses_param(tuple(exc.param.split(".")), origin)
    if param == exc.param:
        return exc
    return type(exc)(exc.message.replace(f"'{exc.param}'", f"'{param}'"), param=param, code=exc.code)


def _union_tag(part: object) -> bool:
    return isinstance(part, str) and ("[" in part or "-" in part or part in ("str", "int", "float", "bool", "list", "dict", "none"))


def _responses_param(loc: tuple[Any, ...], origin: list[str]) -> str:
    """The Responses param that a contract location came from."""
    if not loc or loc == ("",):
        return "input"
    head, rest = str(loc[0]), [str(p) for p in loc[1:]]
    if head == "messages":
        return origin[int(rest[0])] if rest and rest[0].isdigit() and int(rest[0]) < len(origin) else "input"
    if head == "tools" and rest[1:2] == ["function"]:
        return ".".join(["tools", rest[0], *rest[2:]])
    if head == "response_format":
        return ".".join(["text.format", *[p for p in rest if p != "json_schema"]])
    if head == "tool_choice":
        return "tool_choice.name" if "function" in rest else "tool_choice"
    return ".".join([_TOP_NAMES.get(head, head), *rest])


# -- the answer ---------------------------------------------------------------------------------


def template(req: ResponsesRequest) -> ResponseObject:
    """The Response to be, in progress, with the request's settings echoed."""
    choice = req.tool_choice
    text = req.text.model_dump(by_alias=True, exclude_none=True) if req.text is not None else {}
    return ResponseObject(
        model=req.model,
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        tools=[t.model_dump(exclude_none=False) for t in req.tools or []],
        tool_choice=choice.model_dump() if isinstance(choice, FunctionChoice) else (choice or "auto"),
        parallel_tool_calls=req.parallel_tool_calls is not False,
        text={"format": {"type": "text"}, **text},
        metadata=dict(req.metadata or {}),
        user=req.user,
        safety_identifier=req.safety_identifier,
        prompt_cache_key=req.prompt_cache_key,
        truncation=req.truncation or "disabled",
    )


def usage(counts: Usage | None) -> ResponseUsage | None:
    """The contract's usage in the Responses API's words."""
    if counts is None:
        return None
    return ResponseUsage(input_tokens=counts.prompt_tokens, output_tokens=counts.completion_tokens, total_tokens=counts.total_tokens)


def finish(response: ResponseObject, finish_reason: str | None, counts: Usage | None) -> ResponseObject:
    """Set the final status (incomplete when cut at max_output_tokens or by a filter) and usage."""
    if finish_reason in ("length", "content_filter"):
        response.status = "incomplete"
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens" if finish_reason == "length" else "content_filter")
    else:
        response.status = "completed"
        response.completed_at = int(time.time())
    response.usage = usage(counts)
    return response


def response_of(result: ChatCompletion, response: ResponseObject) -> ResponseObject:
    """A whole chat completion as the Response: its text as a message item, its tool calls
    as function_call items."""
    choice = result.choices[0]
    status = "incomplete" if choice.finish_reason in ("length", "content_filter") else "completed"
    message = choice.message
    if message.content or not message.tool_calls:
        response.output.append(OutputMessage(status=status, content=[OutputText(text=message.content or "")]))
    for call in message.tool_calls or []:
        response.output.append(
            FunctionCallOutput(call_id=call.id or new_id("call"), name=call.function.name, arguments=call.function.arguments, status=status)
        )
    return finish(response, choice.finish_reason, result.usage)
