"""Tool calling in Gemma 4's own format: the request's tools checked at the door, and the model's calls read back.

The format (as Gemma 4's chat template writes it, and the bundled template too, `train/data.py`):
    <|tool_call>call:NAME{key:value,key:value}<tool_call|>
one per call, several in a row for parallel calls, and `<|tool_response>` after the last one (the model's cue to
wait for results; the server stops there). Keys are bare (sorted by the template); values are strings between
`<|"|>` delimiters (no escapes inside), numbers, `true` / `false`, `null` (Gemma's template writes a Python `None`,
read as null too), objects `{key:value,...}` and arrays `[value,...]`. Whitespace between tokens is skipped.
The markers are special tokens in Gemma 4's vocabulary and plain text in a vocabulary without them; either way
the server decodes them into the text it parses (`Tokenizer.decode(keep=...)`).

`parse_call` reads one call's body into (name, arguments) or raises `ToolCallError` saying where it breaks;
`ToolSet.check_call` then checks the name and validates the arguments against the function's JSON Schema. A call
that fails either is returned as content (docs/design.md). `ToolSet.from_request` refuses malformed tool
definitions (invalid JSON Schema included) with a message naming the field. tests/test_openai_tools.py parses text
in this exact format, malformed calls included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<|tool_call>", "<tool_call|>"
STRING_DELIM = '<|"|>'
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<|tool_response>", "<tool_response|>"
TOOL_MARKERS = (TOOL_CALL_OPEN, TOOL_CALL_CLOSE, STRING_DELIM, TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE)
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"  # the thinking channel (server/reasoning.py)
THOUGHT_LABEL = "thought\n"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_BARE_KEY = re.compile(r"[^\s:,{}\[\]<]+")
_WORDS = {"true": True, "false": False, "null": None, "None": None}


class ToolCallError(ValueError):
    """A call that is not in the format, or whose name or arguments do not fit the request's tools."""


class ToolDefinitionError(ValueError):
    """A tool definition the server refuses; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


# -- reading a call -----------------------------------------------------------------------------------------
def parse_call(body: str) -> tuple[str, dict[str, Any]]:
    """The text between `<|tool_call>` and `<tool_call|>` -> (function name, arguments)."""
    if not body.startswith("call:"):
        raise ToolCallError("a call must start with 'call:'")
    brace = body.find("{")
    name = body[5:brace] if brace >= 0 else body[5:]
    if not NAME.fullmatch(name):
        raise ToolCallError(f"function name {name!r} is not 1-64 letters, digits, '_' or '-'")
    if brace < 0:
        raise ToolCallError("the arguments' '{' is missing")
    reader = _Reader(body, brace)
    args = reader.object()
    reader.skip_space()
    if reader.i != len(body):
        raise ToolCallError(f"unexpected text after the arguments at character {reader.i}: {body[reader.i:][:20]!r}")
    return name, args


class _Reader:
    """Recursive descent over Gemma's value syntax; `i` is the position in `text`."""

    def __init__(self, text: str, i: int) -> None:
        self.text, self.i = text, i

    def fail(self, what: str) -> ToolCallError:
        return ToolCallError(f"{what} at character {self.i}: {self.text[self.i:self.i + 20]!r}")

    def skip_space(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def expect(self, char: str) -> None:
        self.skip_space()
        if not self.text.startswith(char, self.i):
            raise self.fail(f"expected {char!r}")
        self.i += len(char)

    def peek(self, char: str) -> bool:
        self.skip_space()
        return self.text.startswith(char, self.i)

    def object(self) -> dict[str, Any]:
        self.expect("{")
        out: dict[str, Any] = {}
        if self.peek("}"):
            self.i += 1
            return out
        while True:
            key = self.key()
            if key in out:
                raise self.fail(f"duplicate key {key!r}")
            self.expect(":")
            out[key] = self.value()
            if self.peek("}"):
                self.i += 1
                return out
            self.expect(",")

    def array(self) -> list[Any]:
        self.expect("[")
        out: list[Any] = []
        if self.peek("]"):
            self.i += 1
            return out
        while True:
            out.append(self.value())
            if self.peek("]"):
                self.i += 1
                return out
            self.expect(",")

    def key(self) -> str:
        self.skip_space()
        if self.text.startswith(STRING_DELIM, self.i):
            return self.string()
        match = _BARE_KEY.match(self.text, self.i)
        if not match:
            raise self.fail("expected a key")
        self.i = match.end()
        return match.group()

    def string(self) -> str:
        self.i += len(STRING_DELIM)
        end = self.text.find(STRING_DELIM, self.i)
        if end < 0:
            raise self.fail("unterminated string")
        value, self.i = self.text[self.i:end], end + len(STRING_DELIM)
        return value

    def value(self) -> Any:
        self.skip_space()
        if self.text.startswith(STRING_DELIM, self.i):
            return self.string()
        if self.peek("{"):
            return self.object()
        if self.peek("["):
            return self.array()
        for word, value in _WORDS.items():
            if self.text.startswith(word, self.i) and not self.text[self.i + len(word):][:1].isalnum():
                self.i += len(word)
                return value
        match = _NUMBER.match(self.text, self.i)
        if not match or self.text[match.end():][:1].isalnum():
            raise self.fail("expected a value (a <|\"|>string<|\"|>, number, true, false, null, {...} or [...])")
        self.i = match.end()
        return float(match.group()) if match.group(1) or match.group(2) else int(match.group())


# -- the request's tools ----------------------------------------------------------------------------------
@dataclass
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any] | None
    validator: Draft202012Validator | None


@dataclass
class ToolSet:
    """The request's functions, by name, in request order."""

    functions: dict[str, Function]

    @classmethod
    def from_request(cls, tools: list[Any]) -> ToolSet:
        """OpenAI's `tools` list, checked: each {"type": "function", "function": {"name", "description"?,
        "parameters"? (a JSON Schema for an object), "strict"?}}, names unique. ToolDefinitionError names the
        field at fault."""
        functions: dict[str, Function] = {}
        for i, tool in enumerate(tools):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) != {"type", "function"}:
                raise ToolDefinitionError(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
            fn = tool["function"]
            if not isinstance(fn, dict) or not set(fn) <= {"name", "description", "parameters", "strict"}:
                raise ToolDefinitionError(f"{where}.function must be an object with name, and optionally description, "
                                          "parameters and strict", f"{where}.function")
            name = fn.get("name")
            if not isinstance(name, str) or not NAME.fullmatch(name):
                raise ToolDefinitionError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'",
                                          f"{where}.function.name")
            if name in functions:
                raise ToolDefinitionError(f"two tools are named {name!r}", f"{where}.function.name")
            if fn.get("description") is not None and not isinstance(fn["description"], str):
                raise ToolDefinitionError(f"{where}.function.description must be a string",
                                          f"{where}.function.description")
            if "strict" in fn and not isinstance(fn["strict"], bool | None):
                raise ToolDefinitionError(f"{where}.function.strict must be a boolean", f"{where}.function.strict")
            params = fn.get("parameters")
            functions[name] = Function(name, fn.get("description"), params, _validator(params, where))
        return cls(functions)

    def check_call(self, name: str, args: dict[str, Any]) -> None:
        """ToolCallError unless `name` is one of the tools and `args` validate against its parameters."""
        fn = self.functions.get(name)
        if fn is None:
            raise ToolCallError(f"the model called {name!r}, which is not one of the request's tools")
        if fn.validator is not None:
            error = next(iter(fn.validator.iter_errors(args)), None)
            if error is not None:
                path = "/".join(str(p) for p in error.absolute_path)
                raise ToolCallError(f"arguments of {name!r} do not validate{' at ' + path if path else ''}: "
                                    f"{error.message}")

    def rendered(self) -> list[dict[str, Any]]:
        """The tools as the chat template reads them (OpenAI's shape)."""
        return [{"type": "function", "function": {k: v for k, v in (("name", f.name), ("description", f.description),
                                                                     ("parameters", f.parameters)) if v is not None}}
                for f in self.functions.values()]


def _validator(params: Any, where: str) -> Draft202012Validator | None:
    if params is None:
        return None
    param = f"{where}.function.parameters"
    if not isinstance(params, dict):
        raise ToolDefinitionError(f"{param} must be a JSON Schema object", param)
    if params.get("type", "object") != "object":
        raise ToolDefinitionError(f"{param} must describe an object (type 'object'): the arguments are one", param)
    try:
        Draft202012Validator.check_schema(params)
    except SchemaError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        raise ToolDefinitionError(f"{param} is not a valid JSON Schema{' at ' + path if path else ''}: "
                                  f"{exc.message}", param) from None
    return Draft202012Validator(params)
