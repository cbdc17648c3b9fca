"""Gemma 4's tool-call format: the parser on text in that exact format (malformed calls included), the round trip
through the chat template, the reply reader streamed at every split, the thinking split, and the grammars that
guarantee a call (they accept the template's own rendering of valid calls, with markers as text or as tokens)."""

import json
import re

import llguidance as llg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_fixtures import CITIES, TIME, WEATHER, gemma4_checkpoint

from dgemma.bundled import resolve_model
from dgemma.constrain.backend import LLGuidanceBackend
from dgemma.constrain.spec import ConstraintError, ConstraintSpec
from dgemma.server.reasoning import after_thinking, split_reasoning
from dgemma.server.reply import ReplyParser
from dgemma.server.tool_grammar import Markers, avoiding, tool_call_grammar
from dgemma.server.tools import (
    TOOL_MARKERS,
    ToolCallError,
    ToolDefinitionError,
    ToolSet,
    parse_call,
)
from dgemma.tokenizer import Tokenizer

Q = '<|"|>'


@pytest.mark.parametrize("body,name,args", [
    ("call:get_weather{city:<|\"|>Paris<|\"|>}", "get_weather", {"city": "Paris"}),
    ("call:get_weather{city:<|\"|>San Francisco, CA<|\"|>,days:3}", "get_weather",
     {"city": "San Francisco, CA", "days": 3}),
    ("call:f{}", "f", {}),
    ("call:f{a:-1.5,b:1e+20,c:true,d:false,e:null,g:None,h:0}", "f",
     {"a": -1.5, "b": 1e20, "c": True, "d": False, "e": None, "g": None, "h": 0}),
    ("call:f{items:[<|\"|>a<|\"|>,<|\"|>b{c}<|\"|>],nested:{x:{y:[1,[2],{}]}}}", "f",
     {"items": ["a", "b{c}"], "nested": {"x": {"y": [1, [2], {}]}}}),
    ("call:my-tool_2{<|\"|>odd key<|\"|>:<|\"|><|\"|>}", "my-tool_2", {"odd key": ""}),
    ("call:f{ a : 1 , b : [ 1 , 2 ] }", "f", {"a": 1, "b": [1, 2]}),
    ("call:f{text:<|\"|>line one\nline \"two\" \\ {braces} [x] <tool_call|> inside<|\"|>}", "f",
     {"text": "line one\nline \"two\" \\ {braces} [x] <tool_call|> inside"}),
])
def test_parse_calls_in_gemma4_format(body, name, args):
    assert parse_call(body) == (name, args)


@pytest.mark.parametrize("body,message", [
    ("get_weather{city:<|\"|>Paris<|\"|>}", "call:"),
    ("call:get weather{}", "function name"),
    ("call:{a:1}", "function name"),
    ("call:f", "'{'"),
    ("call:f{city:<|\"|>Paris}", "unterminated string"),
    ("call:f{city:Paris}", "expected a value"),
    ("call:f{a:1", "expected ','"),
    ("call:f{a:1}}", "after the arguments"),
    ("call:f{a:1,a:2}", "duplicate key"),
    ("call:f{a:1.}", "expected"),
    ("call:f{a:truex}", "expected a value"),
    ("call:f{:1}", "expected a key"),
    ("call:f{a:[1,2}", "expected"),
])
def test_malformed_calls_say_where(body, message):
    with pytest.raises(ToolCallError, match=re.escape(message)):
        parse_call(body)


@pytest.fixture(scope="module")
def bundled_tokenizer():
    return Tokenizer.from_directory(resolve_model(None))


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
              st.floats(allow_nan=False, allow_infinity=False, width=32).filter(lambda f: f == f),
              st.text(st.characters(blacklist_categories=("Cs",)), max_size=8).filter(lambda s: Q not in s)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True), inner,
                                            max_size=3)),
    max_leaves=10)


@settings(max_examples=150, deadline=None)
@given(args=st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True), JSON_VALUES, max_size=4))
def test_the_template_writes_what_the_parser_reads(bundled_tokenizer, args):
    """Any JSON arguments, written by the bundled template (Gemma 4's format), parse back to themselves."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": args}}]}]
    text = bundled_tokenizer.render_chat(messages, add_generation_prompt=False, tools=[WEATHER])
    body = text[text.index("<|tool_call>") + len("<|tool_call>"):text.index("<tool_call|>")]
    name, parsed = parse_call(body)
    assert name == "f"
    assert json.loads(json.dumps(parsed)) == json.loads(json.dumps(args))


def test_tool_definitions_are_checked_by_name():
    ToolSet.from_request([WEATHER, TIME])
    bad = [
        ([{"type": "function"}], "tools[0]"),
        ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0]"),
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
        ([WEATHER, WEATHER], "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}],
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "required": "x"}}}],
         "tools[0].function.parameters"),
        ([{"type": "function", "function": {"name": "f", "extra": 1}}], "tools[0].function"),
    ]
    for tools, param in bad:
        with pytest.raises(ToolDefinitionError) as err:
            ToolSet.from_request(tools)
        assert err.value.param == param, (tools, err.value.param)


def test_calls_are_checked_against_the_tools():
    tools = ToolSet.from_request([WEATHER])
    tools.check_call("get_weather", {"city": "Paris", "days": 2})
    for name, args, message in [("get_time", {"city": "Paris"}, "not one of"),
                                ("get_weather", {"days": 2}, "'city' is a required property"),
                                ("get_weather", {"city": "Rome"}, "is not one of"),
                                ("get_weather", {"city": "Paris", "days": 9}, "days")]:
        with pytest.raises(ToolCallError, match=re.escape(message)):
            tools.check_call(name, args)


REPLIES = [
    '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>',
    '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_call>call:get_time{city:<|"|>Oslo<|"|>,'
    'utc:true}<tool_call|>',
    'Let me check. <|tool_call>call:get_weather{city:<|"|>Lima<|"|>,days:2}<tool_call|>',
    '<|channel>thought\nThe user wants weather.<channel|><|tool_call>call:get_weather{city:<|"|>Cairo<|"|>}'
    '<tool_call|>',
    '<|channel>thought\nNo tool needed<channel|>It is < 3 and <|tool or not.',
    '<|tool_call>call:get_weather{city:<|"|>Rome<|"|>}<tool_call|>',  # not in the enum: content
    '<|tool_call>call:get_weather{city:Paris}<tool_call|> then text',  # malformed: content
    '<|tool_call>call:get_weather{city:<|"|>Paris',  # never closed: content at the end
    '  \n<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>\n',  # whitespace around: dropped
    '<|channel>thought\nstill thinking when cut',
    "  plain answer  ",
    "",
]


@pytest.mark.parametrize("reply", REPLIES)
def test_reply_reading_is_the_same_streamed_at_any_split(reply):
    tools = ToolSet.from_request([WEATHER, TIME])
    whole = ReplyParser(tools)
    d = whole.feed(reply, final=True)
    assert (d.reasoning, d.content) == (whole.reasoning or "", whole.content)
    for step in (1, 2, 3, 7):
        parts = [reply[:i] for i in range(step, len(reply), step)] + [reply]
        p = ReplyParser(tools)
        deltas = [p.feed(t, final=(t is parts[-1] and i == len(parts) - 1)) for i, t in enumerate(parts)]
        assert "".join(x.reasoning for x in deltas) == (whole.reasoning or "")
        assert "".join(x.content for x in deltas) == whole.content
        calls = [(c.name, c.arguments) for x in deltas for c in x.tool_calls]
        assert calls == [(c.name, c.arguments) for c in whole.calls]
        assert p.content_or_none() == whole.content_or_none()


def test_reply_reading_results():
    tools = ToolSet.from_request([WEATHER, TIME])
    read = lambda text: (lambda p: (p.feed(text, final=True), p))(ReplyParser(tools))[1]
    p = read(REPLIES[1])
    assert [(c.name, json.loads(c.arguments)) for c in p.calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Oslo", "utc": True})]
    assert p.content_or_none() is None and not p.errors
    p = read(REPLIES[3])
    assert p.reasoning == "The user wants weather." and p.calls[0].name == "get_weather"
    p = read(REPLIES[4])
    assert p.reasoning == "No tool needed" and p.content == "It is < 3 and <|tool or not." and not p.calls
    for i in (5, 6, 7):
        p = read(REPLIES[i])
        assert not p.calls and p.content.startswith("<|tool_call>call:get_weather") and p.errors
    assert read(REPLIES[8]).content_or_none() is None
    assert read(REPLIES[9]).reasoning == "still thinking when cut"
    assert ReplyParser(None).feed(REPLIES[0], final=True).content == REPLIES[0]  # tool_choice none: plain text


def test_split_reasoning():
    assert split_reasoning("<|channel>thought\nabc<channel|>answer") == ("abc", "answer")
    assert split_reasoning("  <|channel>abc") == ("abc", "")
    assert split_reasoning("answer <|channel>x<channel|>") == (None, "answer <|channel>x<channel|>")


@pytest.mark.parametrize("word", ['<|"|>', "<channel|>", "ab"])
def test_avoiding_is_exactly_the_strings_without_the_word(word):
    pattern = re.compile(avoiding(word), re.DOTALL)
    alphabet = sorted(set(word)) + ["x", "\n"]
    import itertools

    for n in range(0, 7 if len(word) > 2 else 8):
        for chars in itertools.product(alphabet, repeat=n):
            s = "".join(chars)
            assert bool(pattern.fullmatch(s)) == (word not in s), (word, s)
    for s in (word[:-1] * 3, word[0] + word, "x" + word[:-1] + word[0]):
        assert bool(pattern.fullmatch(s)) == (word not in s)


def _rendered_call(tok, name, args):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": name, "arguments": args}}]}]
    text = tok.render_chat(messages, add_generation_prompt=False, tools=[WEATHER, TIME])
    return text[text.index("<|tool_call>"):text.rindex("<|tool_response>")]  # the template ends the turn with it


def _accepts(tok, backend, grammar, text):
    ids = tok.encode(text, add_special_tokens=False)
    m = llg.LLMatcher(backend.tokenizer, llg.LLMatcher.grammar_from_lark(grammar))
    return m.validate_tokens(ids) == len(ids) and (m.consume_tokens(ids) or True) and m.is_accepting()


@pytest.fixture(scope="module")
def special_tokenizer(hf_checkpoint, tmp_path_factory):
    return Tokenizer.from_directory(gemma4_checkpoint(hf_checkpoint, tmp_path_factory, "grammar_tok"))


@pytest.mark.parametrize("which", ["text markers", "special tokens"])
def test_tool_grammar_accepts_valid_calls_and_nothing_else(bundled_tokenizer, special_tokenizer, which):
    tok = bundled_tokenizer if which == "text markers" else special_tokenizer
    markers = Markers(tok.special_ids(list(TOOL_MARKERS)))
    assert bool(markers.ids) == (which == "special tokens")
    end = (1, 6) if which == "text markers" else (1, 5, markers.ids["<|tool_response>"])
    backend = LLGuidanceBackend.for_tokenizer(tok, 4096 if which == "text markers" else 384, end)
    tools = ToolSet.from_request([WEATHER, TIME])
    both = tool_call_grammar(list(tools.functions.values()), markers, parallel=True, thinking=False)
    one = tool_call_grammar([tools.functions["get_time"]], markers, parallel=False, thinking=False)
    tail = "<|tool_response>" if which == "text markers" else ""
    good = [("get_weather", {"city": c, "days": d}) for c in CITIES[:3] for d in (1, 7)]
    good += [("get_weather", {"city": "Oslo"}), ("get_time", {"city": "any {text}, really", "utc": False})]
    for name, args in good:
        text = _rendered_call(tok, name, args)
        assert _accepts(tok, backend, both, text + tail), text
        assert _accepts(tok, backend, one, text + tail) == (name == "get_time")
    two = _rendered_call(tok, "get_weather", {"city": "Lima"}) + _rendered_call(tok, "get_time", {"city": "x",
                                                                                              "utc": True})
    assert _accepts(tok, backend, both, two + tail) and not _accepts(tok, backend, one, two + tail)
    bad = [("get_weather", {"city": "Rome"}), ("get_weather", {"days": 3}), ("get_weather", {"city": "Paris",
                                                                                              "days": 8}),
           ("get_time", {"city": "x"}), ("get_time", {"city": "x", "utc": "yes"}), ("nope", {})]
    for name, args in bad:
        assert not _accepts(tok, backend, both, _rendered_call(tok, name, args) + tail), (name, args)


def test_guaranteed_calls_refuse_unsupported_schema_keywords_by_name():
    fn = ToolSet.from_request([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}}}}]).functions["f"]
    with pytest.raises(ConstraintError, match=r"tools\.f\.parameters\.s: pattern on a string is not supported"):
        tool_call_grammar([fn], Markers({}), parallel=False, thinking=False)


def test_constraints_after_thinking(bundled_tokenizer):
    markers = Markers({})
    backend = LLGuidanceBackend.for_tokenizer(bundled_tokenizer, 4096, (1, 6))
    spec = after_thinking(ConstraintSpec("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}},
                                                         "required": ["a"]}), markers)
    for text, ok in [('{"a":1}', True), ('<|channel>thought\nhmm, {a}<channel|>{"a":12}', True),
                     ('<|channel>thought\nno close {"a":1}', False), ('{"a":"x"}', False), ("hi", False)]:
        assert _accepts(bundled_tokenizer, backend, spec.value, text) == ok, text
    with pytest.raises(ConstraintError, match="Lark grammar"):
        after_thinking(ConstraintSpec("grammar", "start: /a/"), markers)
    with pytest.raises(ConstraintError, match="exact"):
        after_thinking(ConstraintSpec("regex", "a+", mode="exact"), markers)


MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "developer"]),
    "content": st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)}), min_size=1, max_size=5)


@settings(max_examples=200, deadline=None)
@given(messages=MESSAGES, generation_prompt=st.booleans())
def test_conversations_without_tools_render_as_before(bundled_tokenizer, messages, generation_prompt):
    """The bundled template is additive: without tools, tool messages or thinking it writes what it always wrote."""
    from dgemma.train.data import PLAIN_TEMPLATE

    before = Tokenizer(bundled_tokenizer._tok, bundled_tokenizer.config, PLAIN_TEMPLATE)
    assert bundled_tokenizer.render_chat(messages, generation_prompt) == before.render_chat(messages, generation_prompt)


SCHEMAS = st.recursive(
    st.fixed_dictionaries({}, optional={
        "type": st.one_of(st.sampled_from(["string", "integer", "number", "boolean", "null", "array", "object"]),
                          st.lists(st.sampled_from(["string", "integer", "null"]), min_size=1, max_size=2)),
        "enum": st.lists(st.one_of(st.text(max_size=4), st.integers(-3, 3), st.booleans(), st.none()), min_size=1,
                         max_size=3),
        "minimum": st.integers(-5, 5), "maximum": st.integers(-5, 5), "exclusiveMinimum": st.integers(-5, 5),
        "minItems": st.integers(0, 2), "maxItems": st.integers(0, 3), "description": st.text(max_size=5),
        "pattern": st.just("^a"), "const": st.one_of(st.text(max_size=3), st.integers())}),
    lambda inner: st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": st.dictionaries(st.sampled_from(["city", "Days", "x", "a-b"]), inner, max_size=3),
        "required": st.lists(st.sampled_from(["city", "Days", "x"]), max_size=2, unique=True),
        "items": inner, "anyOf": st.lists(inner, min_size=1, max_size=2)}),
    max_leaves=8)


@settings(max_examples=120, deadline=None)
@given(schema=SCHEMAS)
def test_any_schema_gives_a_valid_grammar_or_a_named_refusal(bundled_tokenizer, schema):
    """The argument grammar builder on random schemas: a grammar llguidance accepts, or ConstraintError; never
    another error (the server would answer 500)."""
    from dgemma.constrain.canvas import canvas_constraint

    params = {"type": "object", "properties": {"arg": schema}}
    try:
        fn = ToolSet.from_request([{"type": "function", "function": {"name": "f", "parameters": params}}])
    except ToolDefinitionError:
        return
    try:
        grammar = tool_call_grammar(list(fn.functions.values()), Markers({}), parallel=True, thinking=True)
        canvas_constraint(ConstraintSpec("grammar", grammar), bundled_tokenizer, 4096, (1, 6), 32)
    except ConstraintError:
        pass
