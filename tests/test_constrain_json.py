"""JSON Schema -> regex (exact mode): generated valid documents match, mutated invalid ones do not,
integer ranges are exact, unsupported keywords are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dgemma.constrain import ConstraintError
from dgemma.constrain.json_regex import int_range_regex, schema_to_regex
from dgemma.constrain.regex_dfa import compile_regex

try:  # an independent validator, when installed, double-checks the generated documents
    import jsonschema
except ImportError:  # pragma: no cover
    jsonschema = None

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.(com|org)$"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
    "role": {"enum": ["admin", "user", None]},
    "score": {"type": "number", "minimum": 0, "maximum": 10},
    "ratio": {"type": "number"},
    "nick": {"type": ["string", "null"], "maxLength": 4},
    "pos": {"$ref": "#/$defs/point"},
    "kind": {"oneOf": [{"type": "integer", "maximum": -1}, {"type": "string", "maxLength": 2}]},
    "flag": {"anyOf": [{"type": "boolean"}, {"const": {"x": [1, "é"]}}]}},
    "required": ["name", "age", "pos"], "additionalProperties": False,
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                         "y": {"type": "integer"}}, "required": ["x"]}}}


def sample(schema, rng, root):
    """A random valid instance (independent of the regex translation)."""
    if "$ref" in schema:
        return sample(root["$defs"][schema["$ref"].split("/")[-1]], rng, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][rng.integers(len(schema["enum"]))]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return sample(schema[key][rng.integers(len(schema[key]))], rng, root)
    kind = schema["type"] if isinstance(schema["type"], str) else rng.choice(schema["type"])
    if kind == "null":
        return None
    if kind == "boolean":
        return bool(rng.integers(2))
    if kind == "integer":
        return int(rng.integers(schema.get("minimum", -10**6), schema.get("maximum", 10**6) + 1))
    if kind == "number":
        value = float(rng.uniform(schema.get("minimum", -1e4), schema.get("maximum", 1e4)))
        return round(value, int(rng.integers(0, 4)))
    if kind == "string":
        if "pattern" in schema:
            return "".join(rng.choice(list("abc"), rng.integers(1, 4))) + "@x." + rng.choice(["com", "org"])
        n = int(rng.integers(schema.get("minLength", 0), schema.get("maxLength", 8) + 1))
        return "".join(rng.choice(list('ab é"\\\n/\t中😀'), n))
    if kind == "array":
        n = int(rng.integers(schema.get("minItems", 0), schema.get("maxItems", 4) + 1))
        return [sample(schema["items"], rng, root) for _ in range(n)]
    required = schema.get("required", [])
    return {k: sample(v, rng, root) for k, v in schema["properties"].items() if k in required or rng.random() < 0.5}


def dumps(value, **kw):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, **kw)


@pytest.fixture(scope="module")
def person_dfa():
    return compile_regex(schema_to_regex(PERSON))


def test_generated_documents_match(person_dfa):
    rng = np.random.default_rng(0)
    for _ in range(300):
        doc = sample(PERSON, rng, PERSON)
        if jsonschema is not None:
            jsonschema.validate(doc, PERSON)
        assert person_dfa.matches(dumps(doc)), dumps(doc)
        if "email" not in doc and not isinstance(doc.get("flag"), dict):  # \uXXXX escapes (not in const/pattern)
            assert person_dfa.matches(json.dumps(doc, separators=(",", ":"), ensure_ascii=True))


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("age"), lambda d: d.update(extra=1), lambda d: d.update(age=131), lambda d: d.update(age=-1),
    lambda d: d.update(age=1.5), lambda d: d.update(name=""), lambda d: d.update(name="abcdefg"),
    lambda d: d.update(tags=["a", "b", "c", "d"]), lambda d: d.update(tags=["abcd"]), lambda d: d.update(role="x"),
    lambda d: d.update(score=10.5), lambda d: d.update(score=-0.5), lambda d: d.update(nick=5),
    lambda d: d.update(email="a@b.net"), lambda d: d.update(pos={"y": 1}), lambda d: d.update(pos={"x": 6}),
    lambda d: d.update(kind=3), lambda d: d.update(kind="abc"), lambda d: d.update(flag={"x": [1]}),
])
def test_invalid_documents_do_not_match(person_dfa, mutate):
    rng = np.random.default_rng(1)
    for _ in range(10):
        doc = sample(PERSON, rng, PERSON)
        mutate(doc)
        if jsonschema is not None:
            assert not jsonschema.Draft202012Validator(PERSON).is_valid(doc)
        assert not person_dfa.matches(dumps(doc)), dumps(doc)


def test_compact_and_flexible_whitespace():
    schema = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}},
              "required": ["a"]}
    compact, flexible = compile_regex(schema_to_regex(schema)), compile_regex(schema_to_regex(schema, "flexible"))
    for text in ['{"a":[1,2]}', '{ "a" : [ 1 ,\n 2 ] }', '{"a":[]}', '{\t"a":[\r\n]}']:
        assert compact.matches(text) == (" " not in text and "\n" not in text and "\t" not in text)
        assert flexible.matches(text)
    assert not compact.matches('{"a":[1,2],}') and not flexible.matches('{"a":[1 2]}')


@pytest.mark.parametrize("lo, hi", [(5, 10), (-3, 12), (None, 0), (0, None), (17, None), (-120, -5), (None, None),
                                    (999, 1001), (0, 0), (-1, -1)])
def test_integer_ranges_are_exact(lo, hi):
    dfa = compile_regex(int_range_regex(lo, hi))
    for n in range(-1300, 1300):
        assert dfa.matches(str(n)) == ((lo is None or n >= lo) and (hi is None or n <= hi)), n
    assert not dfa.matches("-0") and not dfa.matches("01")


def test_pattern_is_a_search_unless_anchored():
    def dfa(pattern):
        return compile_regex(schema_to_regex({"type": "string", "pattern": pattern}))

    assert dfa("ab").matches('"xxabyy"') and not dfa("ab").matches('"xxa"')
    assert dfa("^ab").matches('"aby"') and not dfa("^ab").matches('"xab"')
    assert dfa('^a"\\\\$').matches('"a\\"\\\\"')  # quote and backslash appear escaped in the JSON text
    assert not dfa('^a"$').matches('"a""')
    assert dfa("^\\n$").matches('"\\n"') and dfa("^[\\x01]$").matches('"\\u0001"')


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "format": "email"}, "string format 'email'"),
    ({"type": "integer", "multipleOf": 3}, "'multipleOf'"),
    ({"type": "object", "properties": {}, "additionalProperties": True}, "additionalProperties other than false"),
    ({"type": "object", "minProperties": 1}, "'minProperties'"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "array", "prefixItems": [{"type": "integer"}]}, "'prefixItems'"),
    ({"type": "array"}, "without an 'items' schema"),
    ({"not": {"type": "null"}}, "without 'type'"),
    ({"type": "number", "minimum": 0.5}, "number bounds"),
    ({"oneOf": [{"type": "integer"}, {"type": "integer", "minimum": 3}]}, "overlap"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "'allOf' with more than one"),
    ({"$ref": "#/$defs/a", "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}}, "recursive \\$ref"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'pattern' together with"),
    ({"type": "string", "pattern": "(?=a)"}, "look-around"),
    ({"type": "object", "required": ["a"]}, "required property 'a'"),
    (True, "only object schemas"),
])
def test_unsupported_features_are_refused_by_name(schema, message):
    with pytest.raises(ConstraintError, match=message):
        schema_to_regex(schema)


@pytest.mark.parametrize("schema, message", [
    ({"type": "strng"}, "unknown JSON Schema type 'strng'"), ({"$ref": "#/nope"}, "points to nothing"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "larger than maxLength"),
    ({"type": "integer", "minimum": 3, "maximum": 2}, "no integer lies between"), ({"enum": []}, "non-empty list"),
])
def test_invalid_schemas(schema, message):
    with pytest.raises(ConstraintError, match=message):
        schema_to_regex(schema)


def test_string_length_counts_code_points_in_every_encoding():
    dfa = compile_regex(schema_to_regex({"type": "string", "minLength": 2, "maxLength": 2}))
    assert dfa.matches('"a😀"') and dfa.matches('"a\\ud83d\\ude00"') and dfa.matches('"\\u00e9\\n"')
    assert not dfa.matches('"\\ud83d\\ude00"')  # one code point written as two escapes
    assert not dfa.matches('"a\\ud83d"')  # a lone surrogate is not a character
