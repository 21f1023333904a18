"""A choice's generated text in, its content and tool calls out, per template family.

Fed as the text streams (`feed`), then told it ended (`finish`). Content is passed on as it
comes, except what could still be the start of a call marker, which is held back until it
cannot be. A call is handed on once it is complete: a delimited one (Hermes) at its end
marker, the others (Mistral's array, Llama's JSON) when the output ends. Text that looked
like a call but does not parse as one is content after all.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from backends.tools.formats import ToolFormat


@dataclass
class ParsedCall:
    index: int  # the call's place among this choice's calls
    id: str
    name: str
    arguments: str  # JSON text of an object


def new_call_id() -> str:
    """An id in OpenAI's form, `call_...`."""
    return f"call_{uuid.uuid4().hex[:24]}"


def _held_prefix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolCallParser:
    """One choice's parser (see the module docstring)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self._buf = ""
        self._in_call = False
        self._seen_text = False  # anything but whitespace passed on: a bare call can no longer start
        self._count = 0

    @property
    def calls(self) -> int:
        """Calls handed on so far."""
        return self._count

    def feed(self, text: str) -> tuple[str, list[ParsedCall]]:
        """(content to pass on now, calls completed by `text`)."""
        self._buf += text
        content: list[str] = []
        calls: list[ParsedCall] = []
        fmt = self.fmt
        while True:
            if self._in_call:
                if fmt.end is None:
                    return "".join(content), calls  # runs to the end of the output
                j = self._buf.find(fmt.end)
                if j < 0:
                    return "".join(content), calls
                block, self._buf = self._buf[:j], self._buf[j + len(fmt.end) :]
                self._in_call = False
                parsed = self._parse(block)
                if parsed is None:
                    content.append(fmt.start + block + fmt.end)
                    self._seen_text = True
                calls += parsed or []
                continue
            if fmt.bare and not self._seen_text:
                stripped = self._buf.lstrip()
                if not stripped:
                    return "".join(content), calls
                if stripped.startswith("{"):  # Llama's JSON call, without its tag
                    self._buf, self._in_call = stripped, True
                    continue
            i = self._buf.find(fmt.start)
            if i >= 0:
                content.append(self._buf[:i])
                self._buf = self._buf[i + len(fmt.start) :]
                self._in_call = True
                continue
            keep = _held_prefix(self._buf, fmt.start)
            out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
            if out.strip():
                self._seen_text = True
            content.append(out)
            return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """(the rest of the content, the calls still open) once the output has ended."""
        rest, self._buf = self._buf, ""
        if not self._in_call:
            return rest, []
        self._in_call = False
        parsed = self._parse(rest)
        if parsed is None:
            tag = "" if rest.lstrip().startswith("{") and self.fmt.bare else self.fmt.start
            return tag + rest, []
        return "", parsed

    def _parse(self, text: str) -> list[ParsedCall] | None:
        """The calls in a call block's text; None when it is not calls after all."""
        objects = _json_values(text.strip())
        if objects is None:
            return None
        if self.fmt.array and len(objects) == 1 and isinstance(objects[0], list):
            objects = objects[0]
        calls: list[ParsedCall] = []
        for obj in objects:
            call = self._call(obj)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def _call(self, obj: Any) -> ParsedCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = obj.get(self.fmt.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        call = ParsedCall(self._count, new_call_id(), obj["name"], json.dumps(arguments, ensure_ascii=False))
        self._count += 1
        return call


def _json_values(text: str) -> list[Any] | None:
    """The JSON values one after another in `text` (separated by whitespace, `;` or `,`, as
    models write several calls); None unless all of it is JSON."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i = 0
    while i < len(text):
        try:
            value, i = decoder.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)
        while i < len(text) and (text[i].isspace() or text[i] in ";,"):
            i += 1
    return values or None
