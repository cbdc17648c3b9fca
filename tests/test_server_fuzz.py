"""Fuzzing the HTTP API with generated malformed requests (hypothesis) while good streams run.

Asserts: no response with a 5xx status and no SSE error event; every error has OpenAI's error body; every
good stream sent meanwhile is token-identical to the same request run alone; the server is healthy and idle
afterwards. `pytest tests/test_server_fuzz.py --fuzz-requests 2000` is the longer run (docs/reliability.md).
"""

import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai_fixtures import LiveServer, gemma4_checkpoint
from test_server import _app

SURROGATES = st.sampled_from(["\ud800", "a\udfffb", "\udc80\ud800"])
TEXT = st.one_of(st.text(max_size=12), SURROGATES)
INTS = st.one_of(st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
                 st.integers(-10, 40), st.booleans(), st.text(max_size=3), st.floats(allow_nan=False, width=32),
                 st.none())
NUMBERS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-3, 3), st.booleans(),
                    st.sampled_from([0, 1e-40, 1e-300, 1e39, 1e308, -1e308, 2, 2.0000001]), st.text(max_size=3),
                    st.none())
BOOLS = st.one_of(st.booleans(), st.sampled_from(["yes", "true", 1, 0, None]))
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), TEXT),
                       lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                       max_leaves=8)
TOOL_CALL = st.fixed_dictionaries({}, optional={
    "id": st.one_of(TEXT, st.integers()), "type": st.sampled_from(["function", "bogus"]),
    "function": st.one_of(st.fixed_dictionaries({}, optional={
        "name": st.one_of(st.sampled_from(["get_weather", "f", "bad name"]), TEXT),
        "arguments": st.one_of(st.sampled_from(['{"city": "Paris"}', "{", "[]", "null"]), TEXT, JSONISH)}), JSONISH)})
MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["user", "system", "assistant", "developer", "tool", "bogus", 3]),
    "content": st.one_of(TEXT, st.integers(), st.none(), st.lists(TEXT, max_size=2),
                         st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]),
                                                         "text": TEXT}), max_size=2)),
    "name": TEXT, "tool_calls": st.one_of(st.lists(TOOL_CALL, max_size=2), JSONISH), "tool_call_id": TEXT,
    "reasoning_content": TEXT})
SCHEMA = st.recursive(
    st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["string", "integer", "number", "boolean", "null", "array", "object", "bogus"]),
        "enum": st.lists(st.one_of(TEXT, st.integers(), st.booleans()), max_size=3), "minimum": INTS,
        "maximum": INTS, "pattern": TEXT, "minItems": INTS}),
    lambda inner: st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": st.dictionaries(st.sampled_from(["city", "days", "x", ""]), inner, max_size=3),
        "required": st.one_of(st.lists(st.sampled_from(["city", "days", "zz"]), max_size=2), TEXT),
        "items": inner, "anyOf": st.lists(inner, max_size=2), "additionalProperties": BOOLS}),
    max_leaves=6)
TOOL = st.one_of(
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.one_of(st.sampled_from(["get_weather", "f", "bad name", "x" * 65]), TEXT)},
        optional={"description": st.one_of(TEXT, st.integers()), "parameters": st.one_of(SCHEMA, JSONISH),
                  "strict": BOOLS})}),
    JSONISH)
TOOL_CHOICE = st.one_of(st.sampled_from(["auto", "none", "required", "sometimes", None]), JSONISH,
                        st.fixed_dictionaries({"type": st.just("function"),
                                               "function": st.fixed_dictionaries({"name": st.sampled_from(
                                                   ["get_weather", "f", "nope"])})}))
FIELDS = {
    "model": st.sampled_from(["tiny", "tiny", "tiny", "other", "", 5, None]),
    "prompt": st.one_of(TEXT, st.lists(st.integers(-5, 400), max_size=8), st.lists(st.booleans(), max_size=2),
                        st.just([]), st.integers(), st.none()),
    "messages": st.one_of(st.lists(MESSAGE, max_size=3), TEXT, st.just([])),
    "max_tokens": INTS, "max_completion_tokens": INTS, "seed": INTS, "best_of": INTS,
    "n": st.one_of(st.sampled_from([1, 2, 3, 8, 9]), INTS),
    "max_denoising_steps": st.one_of(st.sampled_from([0, 1, 2, 1025, -5, 2**70]), INTS),
    "temperature": NUMBERS, "top_p": NUMBERS, "entropy_bound": NUMBERS, "confidence_threshold": NUMBERS,
    "stream": BOOLS, "draft": BOOLS, "echo": BOOLS, "logprobs": st.one_of(BOOLS, INTS),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=6), st.integers(), st.none()),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": BOOLS}), JSONISH),
    "response_format": JSONISH, "tools": st.one_of(st.lists(TOOL, max_size=3), JSONISH), "tool_choice": TOOL_CHOICE,
    "user": st.one_of(TEXT, st.integers()), "suffix": TEXT,
    "top_k": st.one_of(st.sampled_from([-2, -1, 0, 1, 5, 2**40]), INTS), "min_p": NUMBERS,
    "top_logprobs": st.one_of(st.sampled_from([0, 1, 5, 20, 21]), INTS), "presence_penalty": NUMBERS,
    "frequency_penalty": NUMBERS, "parallel_tool_calls": BOOLS, "stream_mode": st.sampled_from(
        ["canvas", "prefix", "bogus", 1, None]),
    "chat_template_kwargs": st.one_of(st.fixed_dictionaries({"enable_thinking": BOOLS}), JSONISH),
}
BODY = st.fixed_dictionaries({}, optional=FIELDS).flatmap(
    lambda body: st.dictionaries(TEXT, JSONISH, max_size=2).map(lambda extra: {**extra, **body}))
RAW = st.one_of(st.binary(max_size=40), st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                BODY.map(lambda b: json.dumps(b).encode()[: len(json.dumps(b)) // 2]),
                st.sampled_from([b"", b"null", b"[]", b'"x"', b"{", b'{"model": "tiny", "prompt": NaN}']))
VALID = {"/v1/completions": {"model": "tiny", "prompt": [2, 30, 31], "max_tokens": 12, "max_denoising_steps": 3},
         "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "the king"}],
                                  "max_tokens": 12, "max_denoising_steps": 3}}
NEAR_VALID = st.sampled_from(sorted(VALID)).flatmap(lambda path: st.tuples(
    st.just("POST"), st.just(path),
    st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), max_size=2).flatmap(
        lambda keys: st.fixed_dictionaries({k: FIELDS[k] for k in keys})).map(
        lambda change: json.dumps({**VALID[path], **change}))))
REQUEST = st.one_of(
    NEAR_VALID, NEAR_VALID,
    st.tuples(st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions"]), BODY.map(json.dumps)),
    st.tuples(st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions"]), RAW),
    st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "POST", "PATCH"]),
              st.sampled_from(["/v1/completions", "/v1/models", "/health", "/metrics", "/v1/nope", "/", "/v1"]),
              st.just(b"{}")),
)
GOOD = {"model": "tiny", "prompt": [2, 50, 51, 52], "max_tokens": 48, "seed": 99, "stream": True,
        "max_denoising_steps": 12, "confidence_threshold": 0}


def _stream_text(http: httpx.Client, body: dict) -> tuple[str, list[str]]:
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    data = [line[6:] for line in lines if line.startswith("data: {")]
    return "".join(json.loads(d)["choices"][0]["text"] for d in data if json.loads(d).get("choices")), lines


def _check(r: httpx.Response, stream_lines: list[str] | None, statuses: dict) -> None:
    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    elif stream_lines is not None:
        assert not any(line.startswith("event: error") for line in stream_lines), stream_lines[-3:]
        assert stream_lines[-1] == "data: [DONE]"


@pytest.fixture(scope="module")
def tools_checkpoint(hf_checkpoint, tmp_path_factory):
    """A checkpoint whose template renders tools (and whose tokenizer has Gemma 4's markers), so that tool
    definitions, tool choices and their grammars are fuzzed too."""
    return gemma4_checkpoint(hf_checkpoint, tmp_path_factory, "fuzz_tok")


def test_fuzzed_requests_never_5xx_and_never_disturb_good_streams(tools_checkpoint, request):
    n = request.config.getoption("--fuzz-requests")
    app = _app(tools_checkpoint, gen_overrides={"eos_token_ids": ()}, max_queue=256, max_context=512)
    with LiveServer(app) as server:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            expected, _ = _stream_text(http, GOOD)  # alone, before any other traffic
        done, good_runs, disturbed = threading.Event(), [], []

        def good_streams():
            with httpx.Client(base_url=server.url, timeout=120) as http:
                while not done.is_set():
                    text, _ = _stream_text(http, GOOD)
                    good_runs.append(text)
                    if text != expected:
                        disturbed.append(text)

        thread = threading.Thread(target=good_streams, daemon=True)
        thread.start()
        sent, statuses = [], {}
        with httpx.Client(base_url=server.url, timeout=120) as http:  # one keep-alive connection throughout

            @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(REQUEST)
            def fuzz(req):
                method, path, content = req
                raw = content.encode() if isinstance(content, str) else content
                headers = {"content-type": "application/json"}
                if method == "POST" and path.endswith("completions") and b'"stream": true' in raw:
                    with http.stream(method, path, content=raw, headers=headers) as r:
                        lines = None
                        if r.status_code == 200:
                            lines = [line for line in r.iter_lines() if line]
                        else:
                            r.read()
                    _check(r, lines, statuses)
                else:
                    _check(http.request(method, path, content=raw, headers=headers), None, statuses)
                sent.append(path)

            fuzz()
        done.set()
        thread.join(timeout=300)
        print(f"fuzzed {len(sent)} requests, statuses {dict(sorted(statuses.items()))}; "
              f"{len(good_runs)} good streams meanwhile")
        assert len(sent) >= n and good_runs, (len(sent), len(good_runs))
        assert not disturbed, f"{len(disturbed)} of {len(good_runs)} good streams differed from the lone run"
        health = httpx.get(server.url + "/health", timeout=30).json()
        assert health == {"status": "ok", "active": 0, "queued": 0}
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert "dgemma_failed_requests_total 0" in metrics


@pytest.fixture(autouse=True)
def _quiet_server_log(caplog):
    caplog.set_level("CRITICAL", logger="dgemma.server")
