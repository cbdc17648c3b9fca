"""Every new field of the OpenAI-compatible API, exercised with the official `openai` client against the real server
(uvicorn on loopback): n, logprobs / top_logprobs, top_p / top_k / min_p, penalties, tools and tool_choice (auto,
none, required, named, parallel), tool history, thinking, stream_options.include_usage in every case, stream_mode
prefix, /tokenize and /detokenize, /metrics histograms, and the 400s that name their field."""

import json

import httpx
import openai
import pytest
from openai_fixtures import CITIES, TIME, WEATHER, LiveServer, gemma4_checkpoint, make_app

from dgemma.bundled import resolve_model
from dgemma.tokenizer import Tokenizer

USER = [{"role": "user", "content": "what is the weather in Paris?"}]


@pytest.fixture(scope="module")
def gemma4_path(hf_checkpoint, tmp_path_factory):
    return gemma4_checkpoint(hf_checkpoint, tmp_path_factory)


@pytest.fixture(scope="module")
def server(gemma4_path):
    with LiveServer(make_app(gemma4_path)) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _stream(client, endpoint="chat", **kw):
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    return list(create(stream=True, **kw))


def _gather_chat(chunks):
    """Per choice index: content, reasoning, tool calls, finish reason, logprob entries, from streamed chunks."""
    out = {}
    for ch in chunks:
        for c in ch.choices:
            o = out.setdefault(c.index, {"content": "", "reasoning": "", "calls": {}, "finish": None, "logprobs": []})
            o["content"] += c.delta.content or ""
            o["reasoning"] += (c.delta.model_extra or {}).get("reasoning_content") or ""
            for t in c.delta.tool_calls or []:
                call = o["calls"].setdefault(t.index, {"name": "", "arguments": ""})
                call["name"] += t.function.name or ""
                call["arguments"] += t.function.arguments or ""
            if c.logprobs is not None:
                o["logprobs"] += c.logprobs.content
            o["finish"] = c.finish_reason or o["finish"]
    return out


def test_n_choices_each_seeded_and_streamed_equal(client):
    kw = dict(model="tiny", messages=USER, max_tokens=24, seed=5)
    many = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    one = client.chat.completions.create(**kw)
    assert many.choices[0].message.content == one.choices[0].message.content  # choice 0 keeps the seed
    assert many.usage.completion_tokens == sum(len(c.model_extra["dgemma"]["token_ids"]) for c in many.choices)
    assert len({c.model_extra["dgemma"]["token_ids"].__repr__() for c in many.choices}) == 3
    streamed = _gather_chat(_stream(client, n=3, **kw))
    assert [streamed[i]["content"] for i in range(3)] == [c.message.content for c in many.choices]
    assert [streamed[i]["finish"] for i in range(3)] == [c.finish_reason for c in many.choices]
    comp = client.completions.create(model="tiny", prompt="the king", max_tokens=20, seed=3, n=2)
    assert [c.index for c in comp.choices] == [0, 1] and comp.choices[0].text != comp.choices[1].text


def test_chat_logprobs_cover_the_answer_and_stream_the_same(client):
    kw = dict(model="tiny", messages=USER, max_tokens=20, seed=7, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    entries = r.choices[0].logprobs.content
    ids = r.choices[0].model_extra["dgemma"]["token_ids"]
    assert len(entries) == len(ids) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True) and abs(values[0] - e.logprob) < 1e-4
        assert bytes(e.bytes).decode("utf-8") == e.token
    streamed = _gather_chat(_stream(client, **kw))[0]["logprobs"]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in entries]
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20, seed=7, logprobs=True)
    assert [round(e.logprob, 4) for e in plain.choices[0].logprobs.content] == \
        [round(e.logprob, 4) for e in entries] and plain.choices[0].logprobs.content[0].top_logprobs == []
    assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=5).choices[0].logprobs is None


def test_completion_logprobs_and_a_stop_string(client):
    kw = dict(model="tiny", prompt="the night was", max_tokens=24, seed=11)
    text = client.completions.create(**kw).choices[0].text
    r = client.completions.create(logprobs=2, **kw)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(len(top) <= 2 for top in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)
    cut = [text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip()]
    if cut:
        stopped = client.completions.create(logprobs=0, stop=[cut[0]], **kw).choices[0]
        assert stopped.text == text[:text.index(cut[0])]
        assert len("".join(stopped.logprobs.tokens)) >= len(stopped.text)  # the token across the cut is listed
        streamed = _stream(client, "completions", logprobs=0, stop=[cut[0]], **kw)
        tokens = [t for ch in streamed for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
        assert tokens == stopped.logprobs.tokens


def test_sampling_filters_are_applied(client):
    kw = dict(model="tiny", messages=USER, max_tokens=16, seed=2, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(extra_body={"top_k": 1}, **kw)
    for e in r.choices[0].logprobs.content:  # one token kept per position: the others are ruled out
        assert e.logprob == 0.0 and [t.logprob for t in e.top_logprobs[1:]] == [-9999.0, -9999.0]
    r = client.chat.completions.create(top_p=0.3, extra_body={"min_p": 0.2}, **kw)
    for e in r.choices[0].logprobs.content:
        kept = [t for t in e.top_logprobs if t.logprob > -9999.0]
        assert kept and sum(2.718281828 ** t.logprob for t in kept) <= 1 + 1e-4
    client.completions.create(model="tiny", prompt=[2, 40], max_tokens=8, top_p=0.9, extra_body={"top_k": 5})


def test_tool_choice_required_gives_valid_calls_on_a_random_model(client):
    for parallel in (False, True):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=parallel, max_tokens=64, seed=4)
        choice = r.choices[0]
        assert choice.finish_reason in ("tool_calls", "length")
        calls = choice.message.tool_calls or []
        if not parallel:
            assert choice.finish_reason == "tool_calls" and len(calls) == 1 and choice.message.content is None
        for call in calls:
            args = json.loads(call.function.arguments)
            assert call.function.name == "get_weather" and args["city"] in CITIES and call.id.startswith("call_")
            assert 1 <= args.get("days", 1) <= 7
    named = client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER, TIME], max_tokens=64, seed=9,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["get_weather"]


def test_streamed_tool_calls_equal_the_whole_answer(client):
    kw = dict(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
              max_tokens=64, seed=12)
    whole = client.chat.completions.create(**kw).choices[0]
    got = _gather_chat(_stream(client, **kw))[0]
    assert got["finish"] == whole.finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in got["calls"].values()] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_tool_choice_auto_and_none_on_a_random_model(client):
    """A random model writes no well-formed call: auto returns its text as content (finish stop/length), none does
    not offer the tools at all."""
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=24, seed=1)
        assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)


def test_tool_history_renders_in_gemma4_format(server, client, gemma4_path):
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=8, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    tok = Tokenizer.from_directory(gemma4_path)
    rendered = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": history, "tools": [WEATHER]})
    ids = rendered.json()["tokens"]
    text = tok.decode(ids, keep=frozenset(tok.special_ids(["<|tool_call>", "<tool_call|>", '<|"|>',
                                                           "<|tool_response>", "<tool_response|>"]).values()))
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>' in text
    assert '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>' in text
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("extra,param", [
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                               "properties": 3}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "format": "email"}}}}}], tool_choice="required"),
     "tool_choice"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages.0.tool_call_id"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]),
     "messages.0.tool_calls.0.function.arguments"),
    (dict(messages=[{"role": "user", "content": None}]), "messages.0.content"),
    (dict(frequency_penalty=0.5), "frequency_penalty"),
    (dict(n=9), "n"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(stream_mode="prefix", constraint_mode="exact", response_format={"type": "json_object"}), "stream_mode"),
    (dict(chat_template_kwargs={"enable_thinking": True}, structured_outputs={"grammar": "start: /a/"}),
     "structured_outputs"),
    (dict(chat_template_kwargs={"thinking_budget": 3}), "chat_template_kwargs.thinking_budget"),
    (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(top_p=0), "top_p"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
])
def test_unsupported_combinations_are_400_naming_the_field(server, extra, param):
    body = {"model": "tiny", "messages": USER, "max_tokens": 4, **extra}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err


def test_a_template_without_tools_refuses_them(checkpoint_with_tokenizer):
    with LiveServer(make_app(checkpoint_with_tokenizer)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": USER, "tools": [WEATHER]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def _usage_of(chunks):
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    return chunks[-1].usage


@pytest.mark.parametrize("case", ["chat", "completions", "n", "stop", "tools", "prefix", "logprobs", "thinking"])
def test_include_usage_in_every_case(client, case):
    chat = dict(model="tiny", messages=USER, max_tokens=20, seed=3)
    kw = {"chat": chat, "completions": dict(model="tiny", prompt="the king", max_tokens=20, seed=3),
          "n": {**chat, "n": 3}, "stop": {**chat, "stop": ["e"]},
          "tools": {**chat, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
                    "max_tokens": 64},
          "prefix": {**chat, "extra_body": {"stream_mode": "prefix"}}, "logprobs": {**chat, "logprobs": True},
          "thinking": {**chat, "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}}[case]
    endpoint = "completions" if case == "completions" else "chat"
    create = client.completions.create if endpoint == "completions" else client.chat.completions.create
    whole = create(**kw)
    chunks = _stream(client, endpoint, stream_options={"include_usage": True}, **kw)
    usage = _usage_of(chunks)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    if endpoint == "chat":
        streamed = _gather_chat(chunks)
        assert [streamed[i]["content"] for i in sorted(streamed)] == [c.message.content or "" for c in whole.choices]
        assert [streamed[i]["finish"] for i in sorted(streamed)] == [c.finish_reason for c in whole.choices]


def test_prefix_stream_mode_streams_early_and_the_same_text(server, client):
    kw = dict(model="tiny", messages=USER, max_tokens=40, seed=8, extra_body={"stream_mode": "prefix",
                                                                             "confidence_threshold": 0})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in _stream(client, **kw) if c.choices) == whole
    metrics = httpx.get(server.url + "/metrics").text
    assert "dgemma_prefix_canvases_total" in metrics and "dgemma_prefix_false_locks_total" in metrics


def test_thinking_switch_and_constraints_after_it(server, client):
    ids = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": USER,
                                                     "chat_template_kwargs": {"enable_thinking": True}}).json()
    plain = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": USER}).json()
    assert ids["count"] > plain["count"]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    kw = dict(model="tiny", messages=USER, max_tokens=64, seed=6,
              response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
              extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    r = client.chat.completions.create(**kw).choices[0]
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.message.content)["n"], int)
    streamed = _gather_chat(_stream(client, **kw))[0]
    assert streamed["content"] == (r.message.content or "")
    assert streamed["reasoning"] == (r.message.model_extra.get("reasoning_content") or "")


def test_tokenize_and_detokenize(server, gemma4_path):
    tok = Tokenizer.from_directory(gemma4_path)
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "the weather in Paris"}).json()
    assert r["tokens"] == tok.encode("the weather in Paris") and r["count"] == len(r["tokens"])
    assert httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json() == \
        {"prompt": "the weather in Paris"}
    chat = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": USER}).json()
    assert chat["tokens"] == tok.encode_chat(USER)
    for path, body, param in [("/tokenize", {"model": "tiny"}, "prompt"),
                              ("/detokenize", {"model": "tiny", "tokens": [10**6]}, "tokens"),
                              ("/tokenize", {"model": "other", "prompt": "x"}, "model")]:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param


def test_metrics_have_histograms_and_each_app_its_own_registry(gemma4_path):
    with LiveServer(make_app(gemma4_path)) as a, LiveServer(make_app(gemma4_path)) as b:
        c = openai.OpenAI(base_url=a.url + "/v1", api_key="x", max_retries=0, timeout=120)
        c.chat.completions.create(model="tiny", messages=USER, max_tokens=8, n=2)
        c.completions.create(model="tiny", prompt=[2, 3], max_tokens=4)
        text_a, text_b = httpx.get(a.url + "/metrics").text, httpx.get(b.url + "/metrics").text
    for name in ("dgemma_time_to_first_token_seconds_bucket", "dgemma_request_latency_seconds_count",
                 "dgemma_steps_per_canvas_bucket", "dgemma_tokens_per_forward_bucket",
                 "dgemma_queue_wait_seconds_bucket", "dgemma_prefix_first_lock_fraction_bucket",
                 "dgemma_constraint_mask_seconds_total", "dgemma_failed_requests_total 0.0"):
        assert name in text_a, name
    assert 'dgemma_requests_total{endpoint="chat",status="200"} 1.0' in text_a
    assert 'dgemma_request_latency_seconds_count 3.0' in text_a  # two choices and one completion
    assert "dgemma_request_latency_seconds_count 0.0" in text_b and 'endpoint="chat"' not in text_b


def test_tool_choice_required_on_the_bundled_model():
    """The bundled model's template writes the markers as text: the grammar holds them as text too. (An enum keeps
    the arguments finite: a free string is valid at any length, and an untrained model may run it to max_tokens.)"""
    with LiveServer(make_app(resolve_model(None), steps=8)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for seed in (1, 2):
            r = c.chat.completions.create(model="tiny", messages=USER, tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False, max_tokens=96, seed=seed)
            choice = r.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            args = json.loads(call.function.arguments)
            assert call.function.name == "get_weather" and args["city"] in CITIES
