"""A chat reply read as it grows: thinking, content and tool calls, each released once it can no longer change.

`ReplyParser.feed(text, final)` takes the reply's text so far (append-only: committed tokens, cut at stop strings)
and returns what is new: reasoning text (the thinking channel, `reasoning.py`), content text, and complete tool
calls (`tools.py`). Text that might still turn out to be part of a marker (`<|chan...`, `<|tool_c...`, the
`thought\\n` label) is held back until it resolves; a call is released when its `<tool_call|>` arrives, as one
OpenAI tool-call delta with its whole arguments. A call that does not parse or does not fit the request's tools
is released as content, in its raw text, and the reason is kept in `errors`. With tools, whitespace-only content
is held until other content arrives, and dropped if the reply is only calls (content null, as OpenAI answers).
The streamed deltas and the whole body come from this one parser, so they are equal
(tests/test_openai_tools.py feeds every split of replies and compares).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from dgemma.server.reasoning import CHANNEL_CLOSE, CHANNEL_OPEN, THOUGHT_LABEL
from dgemma.server.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ToolCallError, ToolSet, parse_call


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def body(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (what may still become it)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReplyParser:
    def __init__(self, tools: ToolSet | None = None) -> None:
        self.tools = tools  # None: no tool parsing (no tools, or tool_choice "none")
        self.pos = 0  # characters of the text consumed
        self.phase = "start"  # "start" (before a possible thinking channel), "reasoning", "rest"
        self.label_checked = False
        self.held_ws = ""  # whitespace-only content not yet released
        self.content_seen = False  # content other than whitespace was released
        self.reasoning: str | None = None
        self.content = ""
        self.calls: list[ToolCall] = []
        self.errors: list[str] = []

    def feed(self, text: str, final: bool = False) -> Delta:
        d = Delta()
        if self.phase == "start":
            self._start(text, final)
        if self.phase == "reasoning":
            self._reasoning(text, final, d)
        if self.phase == "rest":
            self._rest(text, final, d)
        if final and self.held_ws and (self.content_seen or not self.calls):
            self._emit_content(self.held_ws, d)
            self.held_ws = ""
        return d

    def content_or_none(self) -> str | None:
        """The whole content as the response body gives it: None for a reply that is only tool calls."""
        return None if self.calls and not self.content_seen else self.content

    def _start(self, text: str, final: bool) -> None:
        head = text[self.pos:]
        stripped = head.lstrip()
        if stripped.startswith(CHANNEL_OPEN):
            self.pos += len(head) - len(stripped) + len(CHANNEL_OPEN)
            self.phase, self.reasoning = "reasoning", ""
        elif final or not CHANNEL_OPEN.startswith(stripped):
            self.phase = "rest"

    def _reasoning(self, text: str, final: bool, d: Delta) -> None:
        body = text[self.pos:]
        end = body.find(CHANNEL_CLOSE)
        chunk = body[:end] if end >= 0 else body if final else body[:len(body) - held_suffix(body, CHANNEL_CLOSE)]
        if not self.label_checked:
            if chunk.startswith(THOUGHT_LABEL):
                self.pos += len(THOUGHT_LABEL)
                chunk = chunk[len(THOUGHT_LABEL):]
            elif end < 0 and not final and THOUGHT_LABEL.startswith(chunk):
                return  # the label may still be arriving
            self.label_checked = True
        d.reasoning += chunk
        self.reasoning += chunk
        self.pos += len(chunk)
        if end >= 0:
            self.pos += len(CHANNEL_CLOSE)
            self.phase = "rest"

    def _rest(self, text: str, final: bool, d: Delta) -> None:
        if self.tools is None:
            self._emit_content(text[self.pos:], d)
            self.pos = len(text)
            return
        while True:
            body = text[self.pos:]
            start = body.find(TOOL_CALL_OPEN)
            if start < 0:
                cut = len(body) - (0 if final else held_suffix(body, TOOL_CALL_OPEN))
                self._content(body[:cut], d)
                self.pos += cut
                return
            self._content(body[:start], d)
            self.pos += start
            inner = body[start + len(TOOL_CALL_OPEN):]
            end = inner.find(TOOL_CALL_CLOSE)
            if end < 0:  # an open call: wait for its end, or give its text back as content at the end
                if final:
                    self.errors.append("a call was opened and never closed (no <tool_call|>)")
                    self._content(body[start:], d)
                    self.pos = len(text)
                return
            self._call(inner[:end], d)
            self.pos += len(TOOL_CALL_OPEN) + end + len(TOOL_CALL_CLOSE)

    def _call(self, raw: str, d: Delta) -> None:
        try:
            name, args = parse_call(raw)
            self.tools.check_call(name, args)
        except ToolCallError as exc:
            self.errors.append(str(exc))
            self._content(TOOL_CALL_OPEN + raw + TOOL_CALL_CLOSE, d)
            return
        call = ToolCall(name, json.dumps(args, ensure_ascii=False))
        self.calls.append(call)
        d.tool_calls.append(call)

    def _content(self, text: str, d: Delta) -> None:
        if not text:
            return
        if not self.content_seen and not text.strip():
            self.held_ws += text
            return
        self._emit_content(self.held_ws + text, d)
        self.held_ws = ""
        self.content_seen = True

    def _emit_content(self, text: str, d: Delta) -> None:
        d.content += text
        self.content += text
