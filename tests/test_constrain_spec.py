"""ConstraintSpec shape checks, ConstraintError messages for bad input, whitespace handling, choices."""

from __future__ import annotations

import pytest
from test_constrain_support import encode, tiny_backend

from dgemma.constrain import ConstraintError, ConstraintSpec


def accepts(spec: ConstraintSpec, text: str) -> bool:
    backend = tiny_backend()
    matcher = backend.matcher(spec)
    try:
        matcher.consume(encode(backend, text) + [backend.end_ids[0]])
    except ConstraintError:
        return False
    return matcher.is_finished()


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "yaml", "value": "a"}, "unknown constraint kind 'yaml'"),
    ({"kind": "regex", "value": "a", "mode": "fast"}, "mode must be"),
    ({"kind": "json_schema", "value": {}, "whitespace": "pretty"}, "whitespace must be"),
    ({"kind": "regex", "value": "a", "whitespace": "flexible"}, "whitespace applies to json_schema and json_object"),
    ({"kind": "json_schema", "value": "{not json"}, "json_schema is not valid JSON"),
    ({"kind": "json_schema", "value": [1, 2]}, "must be a JSON object"),
    ({"kind": "regex", "value": 5}, "regex must be a string"),
    ({"kind": "choice", "value": []}, "non-empty list of strings"),
    ({"kind": "choice", "value": ["a", 3]}, "choice entries must be strings, got 3"),
    ({"kind": "grammar", "value": "  "}, "non-empty Lark grammar"),
    ({"kind": "grammar", "value": "start: /a/", "mode": "exact"}, "exact mode needs a finite automaton"),
    ({"kind": "json_object", "mode": "exact"}, "use mode='default'"),
])
def test_bad_spec_shapes(kwargs, message):
    with pytest.raises(ConstraintError, match=message):
        ConstraintSpec(**kwargs)


@pytest.mark.parametrize("spec, message", [
    (ConstraintSpec("regex", "a(b"), "unclosed group"),
    (ConstraintSpec("regex", "[z-a]"), "invalid character class range"),
    (ConstraintSpec("regex", "(?<=a)b"), "look-around"),
    (ConstraintSpec("grammar", "start: foo\n"), 'unknown name: "foo"'),
    (ConstraintSpec("json_schema", {"type": "strin"}), "Invalid type: strin"),
    (ConstraintSpec("json_schema", {"$ref": "#/$defs/missing"}), "does not exist"),
    (ConstraintSpec("json_schema", {"type": "array", "uniqueItems": True}), r'Unimplemented keys: \["uniqueItems"\]'),
    (ConstraintSpec("json_schema", {"type": "object", "dependentRequired": {"a": ["b"]}}), "dependentRequired"),
    # x-guidance cannot switch on lenient mode: unknown keywords are never ignored silently
    (ConstraintSpec("json_schema", {"not": {"type": "null"}, "x-guidance": {"lenient": True}}),
     r'Unimplemented keys: \["not"\]'),
    (ConstraintSpec("json_schema", {"type": "string", "format": "colour"}), "Unknown format: colour"),
])
def test_backend_refuses_with_the_reason(spec, message):
    with pytest.raises(ConstraintError, match=message) as info:
        tiny_backend().matcher(spec)
    assert str(info.value).startswith(f"{spec.kind} not supported: ")
    with pytest.raises(ConstraintError, match=message):
        tiny_backend().check(spec)


def test_compact_whitespace_is_the_default_and_flexible_allows_spaces():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items":
              {"type": "integer"}}}, "required": ["a", "b"], "additionalProperties": False}
    compact, flexible = ConstraintSpec("json_schema", schema), ConstraintSpec("json_schema", schema, "flexible")
    assert accepts(compact, '{"a":1,"b":[2,3]}') and accepts(flexible, '{"a":1,"b":[2,3]}')
    for spaced in ['{"a": 1, "b": [2, 3]}', '{ "a":1,"b":[2,3]}', '{"a":1,\n"b":[2,3]}']:
        assert not accepts(compact, spaced)
        assert accepts(flexible, spaced)
    # the spec's whitespace wins over the schema's own x-guidance option
    assert not accepts(ConstraintSpec("json_schema", {**schema, "x-guidance": {"whitespace_flexible": True}}),
                       '{"a": 1, "b": [2]}')


def test_json_object_and_schema_as_text():
    assert accepts(ConstraintSpec("json_object"), '{"x":[1,{"y":null}]}')
    assert not accepts(ConstraintSpec("json_object"), "[1]")
    assert accepts(ConstraintSpec("json_schema", '{"type": "integer"}'), "-12")


def test_choice_escapes_metacharacters():
    choices = ["a.b", "x|y", '"q"', "back\\slash", "a/b", "tab\there", "zoë", "(x)*"]
    spec = ConstraintSpec("choice", choices)
    for c in choices:
        assert accepts(spec, c), c
    for other in ["axb", "x", "y", "q", "backslash", "(x)", "(x)))", "zo"]:
        assert not accepts(spec, other), other


def test_regex_digit_word_space_classes_are_ascii():
    spec = ConstraintSpec("regex", r"\d+\s\w")
    assert accepts(spec, "12 a")
    assert not accepts(spec, "١٢ a")  # Arabic-Indic digits: \d is [0-9], as in JSON Schema


def test_end_id_only_where_the_grammar_accepts():
    backend = tiny_backend()
    matcher = backend.matcher(ConstraintSpec("regex", r"[0-9]{2,3}"))
    with pytest.raises(ConstraintError, match="does not accept"):
        matcher.consume(encode(backend, "1") + [5])
    assert matcher.consume(encode(backend, "12")) == len(encode(backend, "12"))  # unchanged by the refusal
    with pytest.raises(ConstraintError, match="not allowed by the grammar"):
        matcher.copy().consume(encode(backend, "a"))
    assert matcher.consume([5, 9]) == 1 and matcher.is_finished()
    with pytest.raises(ConstraintError, match="already ended"):
        matcher.consume([9])
