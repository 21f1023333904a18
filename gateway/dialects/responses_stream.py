"""The Responses API's answers from the contract's (gateway.dialects.base.Dialect): the
Response object for a whole answer, and for a stream the `response.*` server-sent events,
each `event: <type>` with `data:` the event's JSON (its `type` and `sequence_number`):

    response.created, response.in_progress
    per message:  response.output_item.added, response.content_part.added,
                  response.output_text.delta..., response.output_text.done,
                  response.content_part.done, response.output_item.done
    per call:     response.output_item.added, response.function_call_arguments.delta...,
                  response.function_call_arguments.done, response.output_item.done
    response.completed (response.incomplete when cut at max_output_tokens), with usage

A failure after the first byte is an `error` event, then `response.failed` with the output
so far. No `[DONE]`: the Responses API ends with its last event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from backends.protocol import APIError, ChatCompletion, ChatCompletionChunk
from gateway.dialects.base import SSE
from gateway.dialects.responses_translate import finish, response_of
from gateway.dialects.responses_types import FunctionCallOutput, OutputMessage, OutputText, ResponseError, ResponseObject, new_id

_FAILED = "The server had an error while streaming."


class ResponsesDialect:
    """One Responses request's answer; `response`: the Response to be (ids and the echoed
    settings, from gateway.dialects.responses_translate.template)."""

    route = "responses"
    forwards_raw = False  # the body is not the contract's: remotes get the translation

    def __init__(self, response: ResponseObject, *, streamed: bool) -> None:
        self.response = response
        self.media_type = SSE if streamed else "application/json"
        self._sequence = 0
        self._open: OutputMessage | FunctionCallOutput | None = None  # the item being streamed
        self._calls: dict[int, FunctionCallOutput] = {}  # the contract's tool-call index -> its item

    # -- Dialect ------------------------------------------------------------------------------

    def answer(self, result: Any) -> bytes:
        """The whole Response."""
        assert isinstance(result, ChatCompletion)
        return response_of(result, self.response).model_dump_json().encode()

    async def events(self, chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        """The `response.*` events of a stream of chat chunks (the last carries usage)."""
        yield self._event("response.created", response=self._snapshot())
        yield self._event("response.in_progress", response=self._snapshot())
        reason, usage = None, None
        async for chunk in chunks:
            assert isinstance(chunk, ChatCompletionChunk)
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices[:1]:  # n is not a Responses field: one choice
                if choice.delta.content:
                    for data in self._text(choice.delta.content):
                        yield data
                for call in choice.delta.tool_calls or []:
                    for data in self._call(call.index, call.id, call.function.name, call.function.arguments):
                        yield data
                reason = choice.finish_reason or reason
        status = "incomplete" if reason in ("length", "content_filter") else "completed"
        if not self.response.output:  # nothing generated: an empty message, as a whole answer has
            for data in self._text(""):
                yield data
        for data in self._close(status):
            yield data
        final = finish(self.response, reason, usage)
        yield self._event("response.incomplete" if final.status == "incomplete" else "response.completed", response=self._snapshot())

    def stream_error(self, error: APIError | None) -> bytes:
        """An `error` event, then `response.failed` with the output so far."""
        message = error.message if error is not None else _FAILED
        code = "rate_limit_exceeded" if error is not None and error.status == 429 else "server_error"
        param = error.param if error is not None else None
        data = self._event("error", code=code, message=message, param=param)
        for item in self.response.output:
            if item.status == "in_progress":
                item.status = "incomplete"
        self.response.status = "failed"
        self.response.error = ResponseError(code=code, message=message)
        return data + self._event("response.failed", response=self._snapshot())

    # -- items --------------------------------------------------------------------------------

    def _text(self, delta: str) -> list[bytes]:
        """A piece of the answer's text: into the open message, or a new one."""
        out: list[bytes] = []
        message = self._open
        if not isinstance(message, OutputMessage):
            out += self._close("completed")
            message = OutputMessage(status="in_progress")
            out += self._add(message)
            message.content.append(OutputText(text=""))
            out.append(self._event("response.content_part.added", **self._at(message), content_index=0, part=OutputText(text="").model_dump()))
        message.content[0].text += delta
        if delta:
            out.append(self._event("response.output_text.delta", **self._at(message), content_index=0, delta=delta, logprobs=[]))
        return out

    def _call(self, index: int, call_id: str | None, name: str | None, arguments: str | None) -> list[bytes]:
        """A tool-call delta: its first opens a function_call item, the next ones add to its arguments."""
        out: list[bytes] = []
        item = self._calls.get(index)
        if item is None:
            out += self._close("completed")
            item = FunctionCallOutput(call_id=call_id or new_id("call"), name=name or "", arguments="", status="in_progress")
            self._calls[index] = item
            out += self._add(item)
        elif name:  # a name in pieces (not sent so by turnout's engines, allowed by the contract)
            item.name += name
        if arguments:
            item.arguments += arguments
            out.append(self._event("response.function_call_arguments.delta", **self._at(item), delta=arguments))
        return out

    def _add(self, item: OutputMessage | FunctionCallOutput) -> list[bytes]:
        self.response.output.append(item)
        self._open = item
        return [self._event("response.output_item.added", output_index=len(self.response.output) - 1, item=item.model_dump())]

    def _close(self, status: str) -> list[bytes]:
        """Finish the open item (its `.done` events), if there is one."""
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = status  # type: ignore[assignment]
        out: list[bytes] = []
        if isinstance(item, OutputMessage):
            part = item.content[0]
            out.append(self._event("response.output_text.done", **self._at(item), content_index=0, text=part.text, logprobs=[]))
            out.append(self._event("response.content_part.done", **self._at(item), content_index=0, part=part.model_dump()))
        else:
            out.append(self._event("response.function_call_arguments.done", **self._at(item), name=item.name, arguments=item.arguments))
        out.append(self._event("response.output_item.done", output_index=self._index(item), item=item.model_dump()))
        return out

    # -- events -------------------------------------------------------------------------------

    def _index(self, item: OutputMessage | FunctionCallOutput) -> int:
        return next(i for i, it in enumerate(self.response.output) if it is item)

    def _at(self, item: OutputMessage | FunctionCallOutput) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": self._index(item)}

    def _snapshot(self) -> dict[str, Any]:
        return self.response.model_dump()

    def _event(self, kind: str, **fields: Any) -> bytes:
        """One server-sent event: `event: <type>`, and the event's JSON as its data."""
        data = json.dumps({"type": kind, "sequence_number": self._sequence, **fields}, ensure_ascii=False, separators=(",", ":"))
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + data.encode() + b"\n\n"
