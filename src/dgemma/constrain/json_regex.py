"""JSON Schema (a documented subset) -> regex over the JSON text, for exact mode.

Supported: `type` (one or a list) null, boolean, integer (minimum/maximum, exclusive forms),
number (no bounds, or an integer minimum >= 0 with an optional integer maximum; no exponent then),
string (minLength/maxLength, or pattern; code points, escapes count as one), array (items,
minItems/maxItems), object (properties in schema order, required, additionalProperties false or
absent: no extra properties are ever generated), enum/const of any JSON values, anyOf, oneOf whose
branches are disjoint (checked on their automata), allOf with one entry, local $ref (not recursive).
Annotations (title, description, default, examples, ...) are ignored. Any other keyword raises
ConstraintError naming it; the caller can then use mode="default" (llguidance). Compact whitespace
emits none; flexible allows [ \\t\\n\\r]* around , : and brackets.
tests/test_constrain_json.py: generated valid documents match, mutated invalid ones do not.
"""

from __future__ import annotations

import json
from typing import Any

from dgemma.constrain import regex_parse
from dgemma.constrain.spec import ConstraintError
from dgemma.constrain.text import regex_escape

ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
               "readOnly", "writeOnly", "$defs", "definitions", "x-guidance", "contentMediaType"}
# one string character (one code point, as JSON Schema counts lengths): plain, short escape, \\u escape of
# a non-surrogate, or a surrogate pair written as two \\u escapes (lone surrogates are not characters)
JSON_CHAR = (r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})'
             r'|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})')
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
FRACTION = r"(?:\.[0-9]+)?"
_TYPE_KEYS = {
    "null": set(), "boolean": set(), "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "string": {"minLength", "maxLength", "pattern", "format"}, "array": {"items", "minItems", "maxItems"},
    "object": {"properties", "required", "additionalProperties"},
}


def schema_to_regex(schema: dict[str, Any], whitespace: str = "compact") -> str:
    """The regex of the compact (or flexibly spaced) JSON texts valid under `schema`."""
    return _Translator(schema, whitespace).node(schema, "#")


class _Translator:
    def __init__(self, root: dict[str, Any], whitespace: str) -> None:
        self.root, self.ws = root, ("" if whitespace == "compact" else r"[ \t\n\r]*")
        self.resolving: list[str] = []

    def refuse(self, path: str, what: str) -> ConstraintError:
        return ConstraintError(f"exact mode does not support {what} (at {path}); use mode='default'")

    def node(self, schema: Any, path: str) -> str:
        if not isinstance(schema, dict):
            raise self.refuse(path, f"the schema {json.dumps(schema)} (only object schemas)")
        keys = set(schema) - ANNOTATIONS
        for combinator in ("$ref", "anyOf", "oneOf", "allOf", "enum", "const"):
            if combinator in keys:
                return self.combinator(combinator, schema, keys, path)
        types = schema.get("type")
        if types is None:
            types = "object" if "properties" in keys else "array" if "items" in keys else None
            if types is None:
                raise self.refuse(path, "a schema without 'type' (any JSON value)")
        types = [types] if isinstance(types, str) else list(types)
        unknown = [t for t in types if t not in _TYPE_KEYS]
        if unknown:
            raise ConstraintError(f"unknown JSON Schema type {unknown[0]!r} at {path}")
        allowed = set().union(*(_TYPE_KEYS[t] for t in types)) | {"type"}
        extra = sorted(keys - allowed)
        if extra:
            raise self.refuse(path, f"the keyword {extra[0]!r}" + (" for type " + "/".join(types)))
        parts = [getattr(self, f"type_{t}")(schema, path) for t in types]
        return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"

    def combinator(self, key: str, schema: dict[str, Any], keys: set[str], path: str) -> str:
        others = sorted(keys - {key} - ({"type"} if key in ("enum", "const") else set()))
        if others:
            raise self.refuse(path, f"'{key}' together with {others[0]!r}")
        if key == "$ref":
            return self.ref(schema["$ref"], path)
        if key in ("enum", "const"):
            values = schema["enum"] if key == "enum" else [schema["const"]]
            if not isinstance(values, list) or not values:
                raise ConstraintError(f"'enum' must be a non-empty list at {path}")
            if "type" in schema:
                types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
                values = [v for v in values if any(_has_type(v, t) for t in types)]
                if not values:
                    raise ConstraintError(f"no '{key}' value has the type {schema['type']} at {path}")
            return "(?:" + "|".join(regex_escape(json.dumps(v, ensure_ascii=False, separators=(",", ":")))
                                    for v in values) + ")"
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise ConstraintError(f"'{key}' must be a non-empty list of schemas at {path}")
        if key == "allOf" and len(branches) != 1:
            raise self.refuse(path, "'allOf' with more than one schema")
        parts = [self.node(b, f"{path}/{key}/{i}") for i, b in enumerate(branches)]
        if key == "oneOf":
            self.check_disjoint(parts, path)
        return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"

    def check_disjoint(self, parts: list[str], path: str) -> None:
        from dgemma.constrain.regex_dfa import compile_regex, intersects

        dfas = [compile_regex(p) for p in parts]
        for i in range(len(dfas)):
            for j in range(i + 1, len(dfas)):
                if intersects(dfas[i], dfas[j]):
                    raise self.refuse(path, f"'oneOf' whose branches {i} and {j} overlap (use anyOf)")

    def ref(self, ref: str, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise self.refuse(path, f"the non-local $ref {ref!r}")
        if ref in self.resolving:
            raise self.refuse(path, f"the recursive $ref {ref!r}")
        target: Any = self.root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise ConstraintError(f"$ref {ref!r} at {path} points to nothing")
            target = target[part]
        self.resolving.append(ref)
        try:
            return self.node(target, ref)
        finally:
            self.resolving.pop()

    def type_null(self, schema: dict[str, Any], path: str) -> str:
        return "null"

    def type_boolean(self, schema: dict[str, Any], path: str) -> str:
        return "(?:true|false)"

    def type_integer(self, schema: dict[str, Any], path: str) -> str:
        lo, hi = _bounds(schema, path)
        lo = None if lo is None else -int(-lo // 1)  # ceil
        hi = None if hi is None else int(hi // 1)
        if "exclusiveMinimum" in schema and lo == schema["exclusiveMinimum"]:
            lo += 1
        if "exclusiveMaximum" in schema and hi == schema["exclusiveMaximum"]:
            hi -= 1
        if lo is not None and hi is not None and lo > hi:
            raise ConstraintError(f"no integer lies between the bounds at {path}")
        return int_range_regex(lo, hi)

    def type_number(self, schema: dict[str, Any], path: str) -> str:
        if not {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(schema):
            return NUMBER
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if "exclusiveMinimum" in schema or "exclusiveMaximum" in schema or not _is_int(lo) or lo < 0 or \
                (hi is not None and (not _is_int(hi) or hi < lo)):
            raise self.refuse(path, "number bounds other than an integer 'minimum' >= 0 with an optional "
                                    "integer 'maximum'")
        lo, hi = int(lo), None if hi is None else int(hi)
        if hi is None:
            return int_range_regex(lo, None) + FRACTION
        top = f"{hi}(?:\\.0+)?"
        return top if hi == lo else f"(?:{int_range_regex(lo, hi - 1)}{FRACTION}|{top})"

    def type_string(self, schema: dict[str, Any], path: str) -> str:
        if "format" in schema:
            raise self.refuse(path, f"the string format {schema['format']!r}")
        if "pattern" in schema:
            if "minLength" in schema or "maxLength" in schema:
                raise self.refuse(path, "'pattern' together with minLength/maxLength")
            return '"' + pattern_in_json_string(schema["pattern"]) + '"'
        lo, hi = _sizes(schema, "minLength", "maxLength", path)
        return '"' + JSON_CHAR + (f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}") + '"'

    def type_array(self, schema: dict[str, Any], path: str) -> str:
        if "items" not in schema or not isinstance(schema["items"], dict):
            raise self.refuse(path, "an array without an 'items' schema")
        item = self.node(schema["items"], f"{path}/items")
        lo, hi = _sizes(schema, "minItems", "maxItems", path)
        ws, sep = self.ws, f"{self.ws},{self.ws}"
        if hi == 0:
            return rf"\[{ws}\]"
        more = f"(?:{sep}{item})" + (f"{{{max(lo - 1, 0)},}}" if hi is None else f"{{{max(lo - 1, 0)},{hi - 1}}}")
        body = f"{item}{more}"
        return rf"\[{ws}" + (body if lo >= 1 else f"(?:{body})?") + rf"{ws}\]"

    def type_object(self, schema: dict[str, Any], path: str) -> str:
        extra = schema.get("additionalProperties", False)
        if extra is not False:
            raise self.refuse(path, "additionalProperties other than false")
        props, required = schema.get("properties", {}), schema.get("required", [])
        missing = [r for r in required if r not in props]
        if missing:
            raise self.refuse(path, f"the required property {missing[0]!r} without a schema in 'properties'")
        ws = self.ws
        members = [(regex_escape(json.dumps(k, ensure_ascii=False)) + f"{ws}:{ws}" +
                    self.node(v, f"{path}/properties/{k}"), k in required) for k, v in props.items()]
        sep = f"{ws},{ws}"
        options = []
        for first, (member, req) in enumerate(members):  # `first` is the first property present
            rest = "".join(f"{sep}{m}" if r else f"(?:{sep}{m})?" for m, r in members[first + 1:])
            options.append(member + rest)
            if req:
                break
        body = "(?:" + "|".join(options) + ")" if options else ""
        if not any(r for _, r in members):
            body = f"(?:{body})?" if body else ""
        return rf"\{{{ws}{body}{ws}\}}"


def _has_type(value: Any, kind: str) -> bool:
    checks = {"null": value is None, "boolean": isinstance(value, bool), "string": isinstance(value, str),
              "integer": _is_int(value), "number": isinstance(value, int | float) and not isinstance(value, bool),
              "array": isinstance(value, list), "object": isinstance(value, dict)}
    return checks.get(kind, False)


def _is_int(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()


def _sizes(schema: dict[str, Any], low: str, high: str, path: str) -> tuple[int, int | None]:
    lo, hi = schema.get(low, 0), schema.get(high)
    for v in (lo, hi):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConstraintError(f"{low}/{high} must be non-negative integers at {path}, got {v!r}")
    if hi is not None and lo > hi:
        raise ConstraintError(f"{low} {lo} is larger than {high} {hi} at {path}")
    return lo, hi


def _bounds(schema: dict[str, Any], path: str) -> tuple[float | None, float | None]:
    lows = [schema[k] for k in ("minimum", "exclusiveMinimum") if k in schema]
    highs = [schema[k] for k in ("maximum", "exclusiveMaximum") if k in schema]
    for v in lows + highs:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConstraintError(f"bounds must be numbers at {path}, got {v!r}")
    return (max(lows) if lows else None), (min(highs) if highs else None)


def int_range_regex(lo: int | None, hi: int | None) -> str:
    """Regex of the decimal integers in [lo, hi] (None: unbounded), no leading zeros, no '-0'."""
    parts = []
    if lo is None or lo < 0:  # negative part: -n for n in [max(1, -hi), -lo]
        n_lo = 1 if hi is None or hi >= 0 else -hi
        n_hi = None if lo is None else -lo
        parts.append("-" + _naturals(n_lo, n_hi))
    if hi is None or hi >= 0:
        parts.append(_naturals(max(lo, 0) if lo is not None else 0, hi))
    return "(?:" + "|".join(parts) + ")"


def _naturals(lo: int, hi: int | None) -> str:
    """Regex of the naturals in [lo, hi] without leading zeros."""
    if hi is None:
        digits = len(str(lo))
        return f"(?:{_naturals(lo, 10 ** digits - 1)}|[1-9][0-9]{{{digits},}})"
    parts = []
    for length in range(len(str(lo)), len(str(hi)) + 1):
        a, b = max(lo, 10 ** (length - 1) if length > 1 else 0), min(hi, 10 ** length - 1)
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    return "(?:" + "|".join(parts) + ")"


def _same_length(a: str, b: str) -> str:
    """Regex of the digit strings of one length between a and b inclusive."""
    if a == b:
        return a
    if len(a) == 1:
        return f"[{a}-{b}]"
    if a[0] == b[0]:
        return a[0] + _same_length(a[1:], b[1:])
    rest = len(a) - 1
    parts = [a[0] + _same_length(a[1:], "9" * rest)]
    if int(b[0]) - int(a[0]) > 1:
        parts.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}][0-9]{{{rest}}}")
    parts.append(b[0] + _same_length("0" * rest, b[1:]))
    return "(?:" + "|".join(parts) + ")"


_SHORT_ESCAPES = {0x08: r"\\b", 0x0C: r"\\f", 0x0A: r"\\n", 0x0D: r"\\r", 0x09: r"\\t"}


def pattern_in_json_string(pattern: str) -> str:
    """Regex over JSON string *contents* whose decoded text matches `pattern` (JSON Schema: a search,
    anchored only by ^ and $). Quote, backslash and control characters appear in their escaped forms."""
    node = regex_parse.parse(pattern)
    core = _render(node)
    start = "" if pattern.startswith("^") else JSON_CHAR + "*"
    end = "" if pattern.endswith("$") and not pattern.endswith("\\$") else JSON_CHAR + "*"
    return start + core + end


def _render(node: regex_parse.Node) -> str:
    if node.op == "set":
        return _render_set(node.ranges)
    inner = [_render(c) for c in node.children]
    if node.op == "cat":
        return "".join(inner)
    if node.op == "alt":
        return "(?:" + "|".join(inner) + ")"
    hi = "" if node.hi is None else str(node.hi)
    return f"(?:{inner[0]}){{{node.lo},{hi}}}"


def _render_set(ranges: regex_parse.Ranges) -> str:
    """A code-point set as JSON string content: plain characters as a class, the others escaped."""
    plain = regex_parse.normalize([(max(lo, 0x20), hi) for lo, hi in ranges if hi >= 0x20])
    plain = tuple(r for r in regex_parse.normalize(
        [(a, b) for lo, hi in plain for a, b in ((lo, min(hi, 0x21)), (max(lo, 0x23), min(hi, 0x5B)),
                                                  (max(lo, 0x5D), hi))]))
    options = ["[" + "".join(f"\\x{{{lo:x}}}-\\x{{{hi:x}}}" for lo, hi in plain) + "]"] if plain else []
    for lo, hi in ranges:
        for cp in range(lo, min(hi, 0x5C) + 1):
            if cp < 0x20:
                options.append(_SHORT_ESCAPES.get(cp, "\\\\u00" + "".join(
                    f"[{d}{d.upper()}]" if d.isalpha() else d for d in f"{cp:02x}")))
            elif cp == 0x22:
                options.append(r'\\"')
            elif cp == 0x5C:
                options.append(r"\\\\")
    if not options:
        raise ConstraintError("a pattern character class matches nothing a JSON string can hold")
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"
