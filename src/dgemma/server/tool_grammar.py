"""Grammars (llguidance's Lark dialect) for output the server guarantees: tool calls in Gemma 4's format whose
arguments fit each function's JSON Schema (`tool_choice` "required" or a named function), and an optional thinking
block before any structured output.

`Markers` says how each format marker is written in a grammar: `<[id]>` when it is one special token of the
model's vocabulary, a quoted literal when it is plain text. A string value is `<|"|>` + text without the delimiter
+ `<|"|>`: with a special-token delimiter the text is any text (the token cannot occur in it); with a text
delimiter the text is `avoiding('<|"|>')`, a regex of every string that does not contain it.

Arguments follow the template's rendering: object keys in dictsort order (case-insensitive), bare; required
properties always present, optional ones optional, no others generated. Supported JSON Schema: type (one or a
list), string (enum/const), integer (minimum/maximum, exclusive forms), number (no bounds), boolean, null, array
(items, minItems/maxItems), object (properties, required, additionalProperties), enum/const, anyOf/oneOf (as
alternatives), allOf with one entry, local non-recursive $ref; annotations are ignored; `{}` is any value. Any
other keyword is a `ConstraintError` naming it and its place (the request then gets a 400 that suggests
tool_choice "auto"). tests/test_openai_tools.py checks that every grammar accepts the template's own rendering of
valid calls and that the engine's constrained calls parse and validate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from dgemma.constrain.json_regex import int_range_regex
from dgemma.constrain.spec import ConstraintError
from dgemma.server.tools import (
    CHANNEL_CLOSE,
    CHANNEL_OPEN,
    STRING_DELIM,
    THOUGHT_LABEL,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TOOL_RESPONSE_OPEN,
    Function,
)

ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "strict", "additionalProperties"}
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_KEY = r"[A-Za-z_][A-Za-z0-9_\-]*"


def lark_literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def regex_escape(text: str) -> str:
    """`text` as a regex matching itself (Rust syntax, as llguidance reads it, inside a Lark /.../ literal)."""
    controls = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return "".join(controls.get(c) or ("\\" + c if c in r"\.+*?()|[]{}^$#&-~/\"" else c) for c in text)


def avoiding(word: str) -> str:
    """A regex of every string that does not contain `word`, whose first character occurs nowhere else in it (true
    of `<|"|>` and `<channel|>`). Its states are how much of `word` was just read: from 0 a character other than
    word[0] stays; after word[0] the text goes on through word[1:k] and then leaves by any character other than
    word[k] and word[0] (back to 0) or by word[0] (read again), or ends there."""
    if len(word) < 2 or word[0] in word[1:]:
        raise ValueError(f"avoiding() needs a word whose first character does not recur, got {word!r}")
    first, n = regex_escape(word[0]), len(word)
    cls = lambda *chars: "[^" + "".join("\\" + c if c in "\\]^-[/" else c for c in chars) + "]"
    restart = "|".join(regex_escape(word[1:k]) + first for k in range(1, n))
    leave = "|".join(regex_escape(word[1:k]) + cls(word[k], word[0]) for k in range(1, n))
    partial = "|".join(regex_escape(word[1:k]) for k in range(1, n))
    return f"(?:{cls(word[0])}|{first}(?:{restart})*(?:{leave}))*(?:{first}(?:{restart})*(?:{partial}))?"


@dataclass(frozen=True)
class Markers:
    """Marker -> its token id when it is a single special token of the model's vocabulary."""

    ids: dict[str, int]

    def expr(self, marker: str) -> str:
        return f"<[{self.ids[marker]}]>" if marker in self.ids else lark_literal(marker)

    def block(self, open_: str, label: str, close: str) -> str:
        """open_ + label + any text without `close` + close, as one grammar expression."""
        if open_ in self.ids and close in self.ids:
            return f"{self.expr(open_)} /{regex_escape(label)}(?s:.*)/ {self.expr(close)}"
        middle = avoiding(close) if close not in self.ids else "(?s:.*)"
        head = f"{self.expr(open_)} " if open_ in self.ids else ""
        tail = f" {self.expr(close)}" if close in self.ids else ""
        opening = "" if open_ in self.ids else regex_escape(open_)
        closing = "" if close in self.ids else regex_escape(close)
        return f"{head}/{opening}{regex_escape(label)}{middle}{closing}/{tail}"


class _Rules:
    """Named Lark rules, made once per (schema, path)."""

    def __init__(self, markers: Markers) -> None:
        self.markers = markers
        self.lines: list[str] = []
        self.count = 0

    def add(self, body: str, hint: str = "v") -> str:
        self.count += 1
        name = f"{re.sub('[^a-z0-9_]', '_', hint.lower())[:24]}_{self.count}"
        self.lines.append(f"{name}: {body}")
        return name

    def string(self) -> str:
        delim = self.markers.expr(STRING_DELIM)
        if STRING_DELIM in self.markers.ids:
            return f"{delim} /(?s:.*)/ {delim}"
        d = regex_escape(STRING_DELIM)
        return f"/{d}{avoiding(STRING_DELIM)}{d}/"

    def literal(self, value: Any, path: str) -> str:
        """One JSON value written in Gemma's format, as a grammar expression."""
        if isinstance(value, str):
            delim = self.markers.expr(STRING_DELIM)
            return f"{delim} {lark_literal(value)} {delim}" if value else f"{delim} {delim}"
        if isinstance(value, bool) or value is None:
            return lark_literal({True: "true", False: "false", None: "null"}[value])
        if isinstance(value, int | float):
            return lark_literal(json.dumps(value))
        if isinstance(value, list):
            items = ' "," '.join(self.literal(v, path) for v in value)
            return f'"[" {items} "]"' if value else '"[" "]"'
        if isinstance(value, dict):
            members = ' "," '.join(f"{lark_literal(k + ':')} {self.literal(value[k], path)}"
                                   for k in sorted(value, key=str.lower))
            return f'"{{" {members} "}}"' if value else '"{" "}"'
        raise ConstraintError(f"{path}: cannot write {value!r} as a value")


class ArgumentGrammar:
    """Gemma-format values valid under JSON Schemas (see the module docstring)."""

    def __init__(self, markers: Markers) -> None:
        self.rules = _Rules(markers)
        self.any_value: str | None = None
        self.root: dict[str, Any] = {}
        self.resolving: list[str] = []

    def refuse(self, path: str, what: str) -> ConstraintError:
        return ConstraintError(f"{path}: {what} is not supported for a guaranteed tool call (tool_choice 'required' "
                               "or a named function); use tool_choice 'auto'")

    def arguments(self, fn: Function) -> str:
        """`{...}` of `fn`'s arguments (an expression)."""
        self.root = fn.parameters or {}
        if not fn.parameters:
            return '"{" "}"'
        return self.value(fn.parameters, f"tools.{fn.name}.parameters")

    def value(self, schema: Any, path: str) -> str:
        if schema is True or schema == {}:
            return self.anything()
        if not isinstance(schema, dict):
            raise self.refuse(path, f"the schema {json.dumps(schema)}")
        keys = set(schema) - ANNOTATIONS
        for key in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const"):
            if key in keys:
                return self.combinator(key, schema, keys, path)
        types = schema.get("type")
        if types is None:
            if keys - {"type"}:
                raise self.refuse(path, f"a schema without type holding {sorted(keys)}")
            return self.anything()
        types = [types] if isinstance(types, str) else types
        parts = [self.typed(t, schema, keys, path) for t in types]
        return parts[0] if len(parts) == 1 else self.rules.add(" | ".join(parts), "types")

    def combinator(self, key: str, schema: dict[str, Any], keys: set[str], path: str) -> str:
        if keys - {key, "type"}:
            raise self.refuse(path, f"{key} together with {sorted(keys - {key, 'type'})}")
        value = schema[key]
        if key == "$ref":
            return self.ref(value, path)
        if key == "const":
            return self.rules.literal(value, path)
        if key == "enum":
            if not isinstance(value, list) or not value:
                raise self.refuse(path, "an empty or malformed enum")
            return self.rules.add(" | ".join(self.rules.literal(v, path) for v in value), "enum")
        if key == "allOf" and len(value) != 1:
            raise self.refuse(path, "allOf with more than one entry")
        branches = [self.value(s, f"{path}.{key}[{i}]") for i, s in enumerate(value)]
        return self.rules.add(" | ".join(branches), key)

    def ref(self, ref: str, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise self.refuse(path, f"$ref {ref!r} (only local references)")
        if ref in self.resolving:
            raise self.refuse(path, f"the recursive $ref {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(node, dict) or part not in node:
                raise self.refuse(path, f"$ref {ref!r}, which does not resolve")
            node = node[part]
        self.resolving.append(ref)
        try:
            return self.value(node, ref)
        finally:
            self.resolving.pop()

    def typed(self, kind: str, schema: dict[str, Any], keys: set[str], path: str) -> str:
        allowed = {"string": set(), "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
                   "number": set(), "boolean": set(), "null": set(), "array": {"items", "minItems", "maxItems"},
                   "object": {"properties", "required"}}
        if kind not in allowed:
            raise self.refuse(path, f"type {kind!r}")
        extra = keys - {"type"} - allowed[kind]
        if extra:
            raise self.refuse(path, f"{', '.join(sorted(extra))} on a {kind}")
        if kind == "string":
            return self.rules.add(self.rules.string(), "str")
        if kind == "integer":
            return f"/{int_range_regex(*_int_bounds(schema, path))}/"
        if kind == "number":
            return f"/{NUMBER}/"
        if kind in ("boolean", "null"):
            return self.rules.add('"true" | "false"', "bool") if kind == "boolean" else '"null"'
        if kind == "array":
            return self.array(schema, path)
        return self.object(schema, path)

    def array(self, schema: dict[str, Any], path: str) -> str:
        item = self.value(schema.get("items", {}), f"{path}.items")
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(low, int) or (high is not None and (not isinstance(high, int) or high < low)):
            raise self.refuse(path, "minItems/maxItems that are not integers with min <= max")
        if high == 0:
            return self.rules.add('"[" "]"', "arr")
        more = f'("," {item}){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
        body = f"{item} {more}"
        return self.rules.add(f'"[" {body} "]"' if low > 0 else f'"[" ({body})? "]"', "arr")

    def object(self, schema: dict[str, Any], path: str) -> str:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        if not isinstance(props, dict) or required - set(props):
            raise self.refuse(path, "required names that are not properties")
        names = sorted(props, key=str.lower)  # the template's dictsort
        kv = [f"{lark_literal(n + ':')} {self.value(props[n], f'{path}.{n}')}" for n in names]
        rest = lambda i: " ".join(f'"," {kv[j]}' if names[j] in required else f'("," {kv[j]})?'
                                  for j in range(i, len(names)))
        first: str | None = None
        for i in range(len(names) - 1, -1, -1):  # the members starting at property i, which comes first
            own = f"{kv[i]} {rest(i + 1)}".strip()
            if names[i] in required:
                first = self.rules.add(own, "members")
            else:
                first = self.rules.add(own if first is None else f"{own} | {first}", "members")
        if first is None:
            return self.rules.add('"{" "}"', "obj")
        optional = not required
        return self.rules.add(f'"{{" {first}{"?" if optional else ""} "}}"', "obj")

    def anything(self) -> str:
        """Any value: strings, numbers, booleans, null, objects with bare keys, arrays."""
        if self.any_value is None:
            self.any_value = name = "any_value"
            member = f"/{_KEY}/ \":\" {name}"
            self.rules.lines.append(
                f'{name}: {self.rules.string()} | /{NUMBER}/ | "true" | "false" | "null" '
                f'| "{{" ({member} ("," {member})*)? "}}" | "[" ({name} ("," {name})*)? "]"')
        return self.any_value


def _int_bounds(schema: dict[str, Any], path: str) -> tuple[int | None, int | None]:
    low, high = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema:
        low = schema["exclusiveMinimum"] + 1
    if "exclusiveMaximum" in schema:
        high = schema["exclusiveMaximum"] - 1
    for v in (low, high):
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or v != int(v)):
            raise ConstraintError(f"{path}: integer bounds must be integers, got {v!r}")
    low, high = (None if low is None else int(low)), (None if high is None else int(high))
    if low is not None and high is not None and low > high:
        raise ConstraintError(f"{path}: no integer lies in [{low}, {high}]")
    return low, high


def tool_call_grammar(functions: list[Function], markers: Markers, parallel: bool, thinking: bool) -> str:
    """The Lark grammar of a reply made of tool calls to `functions` (one, or one or more with `parallel`), each in
    Gemma's format with valid arguments; an optional thinking block first; `<|tool_response>` last when it is text
    (when it is a special token it is one of the request's end ids, which follow)."""
    args = ArgumentGrammar(markers)
    calls = " | ".join(f"{lark_literal(f.name)} {args.arguments(f)}" for f in functions)
    call = f'{markers.expr(TOOL_CALL_OPEN)} "call:" ({calls}) {markers.expr(TOOL_CALL_CLOSE)}'
    end = "" if TOOL_RESPONSE_OPEN in markers.ids else f" {lark_literal(TOOL_RESPONSE_OPEN)}"
    lines = [f"start: {'thinking? ' if thinking else ''}call{'+' if parallel else ''}{end}", f"call: {call}",
             *args.rules.lines]
    if thinking:
        lines.append(f"thinking: {thinking_block(markers)}")
    return "\n".join(lines)


def thinking_block(markers: Markers) -> str:
    """Gemma 4's thinking channel, `<|channel>thought\\n...<channel|>`, as a grammar expression."""
    return markers.block(CHANNEL_OPEN, THOUGHT_LABEL, CHANNEL_CLOSE)
