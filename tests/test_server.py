"""The OpenAI-compatible server, exercised with the official `openai` client against real uvicorn on loopback."""

import asyncio
import time

import httpx
import openai
import pytest
from openai_fixtures import LiveServer, make_app


def _app(path, **kw):
    return make_app(path, **{"max_context": 256, **kw})


@pytest.fixture(scope="module")
def server(checkpoint_with_tokenizer):
    with LiveServer(_app(checkpoint_with_tokenizer)) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_and_completion(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the king"}],
                                          max_tokens=20, seed=1)
    choice = chat.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 20
    comp = client.completions.create(model="tiny", prompt="the night was", max_tokens=30, seed=2)
    assert comp.choices[0].finish_reason in ("stop", "length")
    if comp.choices[0].finish_reason == "length":
        assert comp.usage.completion_tokens == 30  # exactly max_tokens, never a whole extra canvas


def test_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "why is the sky"}], max_tokens=40, seed=5)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].text for c in client.completions.create(model="tiny", prompt=[2, 40, 41],
                                                                        max_tokens=25, seed=3, stream=True))
    assert text == client.completions.create(model="tiny", prompt=[2, 40, 41], max_tokens=25, seed=3).choices[0].text


def test_seed_reproducible_and_stop_strings(client):
    kw = dict(model="tiny", prompt=[2, 50, 60, 70], max_tokens=60, seed=11)
    a = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == a
    candidates = [a[i:i + 3] for i in range(len(a) // 3, len(a) - 3) if a[i:i + 3].strip()]
    if not candidates:
        pytest.skip("generated text too short for a stop-string check")
    stop = candidates[0]
    cut = client.completions.create(stop=[stop], **kw)
    assert cut.choices[0].text == a[: a.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
    assert streamed == a[: a.index(stop)]  # never any text past the stop string


@pytest.mark.parametrize("extra,param", [
    (dict(n=9), "n"), (dict(top_logprobs=2), "top_logprobs"), (dict(response_format={"type": "xml"}),
                                                                "response_format"),
    (dict(presence_penalty=0.5), "presence_penalty"), (dict(temperature=3.0), "temperature"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_bad_requests_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], **extra)
    assert err.value.status_code == 400
    assert param in str(err.value)


def test_other_client_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=10)
    r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "frobnicate": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (2 << 20))
    assert r.status_code == 413


def test_auth(checkpoint_with_tokenizer):
    with LiveServer(_app(checkpoint_with_tokenizer, api_key="sekrit")) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model="tiny", prompt=[2, 3], max_tokens=5).choices[0].finish_reason


def test_draft_events_and_metrics(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": [2, 9], "max_tokens": 20, "stream": True, "draft": True}) as r:
        body = "".join(r.iter_text())
    assert "event: draft" in body and body.rstrip().endswith("data: [DONE]")
    metrics = httpx.get(server.url + "/metrics").text
    assert "dgemma_generated_tokens_total" in metrics and "dgemma_queue_depth" in metrics


def test_disconnect_frees_the_slot(checkpoint_with_tokenizer):
    with LiveServer(_app(checkpoint_with_tokenizer, gen_overrides={"eos_token_ids": ()})) as server:
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": [2, 9], "max_tokens": 200, "stream": True,
                                "max_denoising_steps": 200, "confidence_threshold": 0}) as r:
            assert r.status_code == 200
            deadline = time.time() + 10
            while httpx.get(server.url + "/health").json()["active"] != 1:  # running (no EOS possible)
                assert time.time() < deadline, "the request never started"
                time.sleep(0.02)
        deadline = time.time() + 10
        while httpx.get(server.url + "/health").json()["active"] != 0:
            assert time.time() < deadline, "the cancelled request still holds its row"
            time.sleep(0.05)


def test_load_50_concurrent_streams(checkpoint_with_tokenizer):
    """Bounded load: 50 concurrent streams, a small queue: every request completes or gets a clean 429."""
    with LiveServer(_app(checkpoint_with_tokenizer, max_queue=20, max_batch=8)) as s:
        async def one(i, client):
            try:
                stream = await client.completions.create(model="tiny", prompt=[2, 10 + i], max_tokens=24, seed=i,
                                                         stream=True)
                text = "".join([c.choices[0].text async for c in stream])
                return "ok", text
            except openai.RateLimitError:
                return "429", None

        async def main():
            client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)
            return await asyncio.wait_for(asyncio.gather(*(one(i, client) for i in range(50))), timeout=240)

        results = asyncio.run(main())
        assert len(results) == 50
        assert {r for r, _ in results} <= {"ok", "429"}
        assert sum(r == "ok" for r, _ in results) >= 20
        health = httpx.get(s.url + "/health").json()
        assert health["status"] == "ok" and health["active"] == 0 and health["queued"] == 0


def _is_openai_error(r, status):
    body = r.json()
    assert r.status_code == status, (r.status_code, r.text)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("raw,what", [
    (b"", "empty"), (b"   ", "empty"), (b"\xff\xfe{}", "UTF-8"), (b"[" * 5000 + b"]" * 5000, "nested"),
    (b'{"model": "tiny", "prompt": "x", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nested"),
    (b'{"model": "tiny", "prompt": "\\ud800"}', "surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfffb"}]}', "surrogate"),
    (b'{"model": "tiny", "prompt": "x", "temperature": NaN}', "JSON"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": true}', "max_tokens"),
    (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', "stream"),
    (b'{"model": "tiny", "prompt": "x", "seed": "1"}', "seed"),
    (b'{"model": "tiny", "prompt": "x", "seed": 18446744073709551616}', "seed"),
    (b'{"model": "tiny", "prompt": "x", "entropy_bound": 1e39}', "entropy_bound"),
    (b'{"model": "tiny", "prompt": "x", "confidence_threshold": 1e308}', "confidence_threshold"),
    (b'{"model": "tiny", "prompt": [1, true]}', "prompt"),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000}', "positions"),
    (b'[1, 2]', "object"),
])
def test_malformed_bodies_are_400_and_the_connection_stays_usable(server, raw, what):
    with httpx.Client(base_url=server.url, timeout=60) as http:  # one keep-alive connection
        r = http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        err = _is_openai_error(r, 400)
        assert what.lower() in err["message"].lower() or what == err["param"], err
        ok = http.post("/v1/completions", json={"model": "tiny", "prompt": [2, 3], "max_tokens": 4, "seed": 1})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_every_error_status_has_the_openai_shape(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        _is_openai_error(http.get("/v1/nowhere"), 404)
        _is_openai_error(http.get("/v1/completions"), 405)
        _is_openai_error(http.post("/v1/completions", content=b"x" * (2 << 20)), 413)
        _is_openai_error(http.post("/v1/completions", json={"model": "other", "prompt": "x"}), 404)


def test_tiny_temperature_is_clamped_not_garbage(client):
    """temperature 1e-40 (and 0) are the documented near-greedy floor: a real answer, the same as 0's."""
    kw = dict(model="tiny", prompt=[2, 40, 41], max_tokens=12, seed=4)
    tiny = client.completions.create(temperature=1e-40, **kw)
    zero = client.completions.create(temperature=0, **kw)
    assert tiny.choices[0].text == zero.choices[0].text
    assert tiny.model_extra["dgemma"]["token_ids"] == zero.model_extra["dgemma"]["token_ids"]
    assert any(t != 0 for t in tiny.model_extra["dgemma"]["token_ids"]) or tiny.choices[0].finish_reason == "stop"


def test_an_unexpected_error_is_a_json_500_and_the_server_goes_on(checkpoint_with_tokenizer, monkeypatch):
    from dgemma.server import worker as worker_module

    with LiveServer(_app(checkpoint_with_tokenizer)) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        monkeypatch.setattr(worker_module.Job, "final_body", lambda self: 1 / 0)
        body = {"model": "tiny", "prompt": [2, 3], "max_tokens": 4}
        _is_openai_error(http.post("/v1/completions", json=body), 500)
        monkeypatch.undo()
        assert http.post("/v1/completions", json=body).status_code == 200


def test_a_request_failing_in_the_engine_fails_alone(checkpoint_with_tokenizer, monkeypatch):
    from dgemma.engine.engine import Engine

    original = Engine._step_rows

    def step_rows(self, rows, *args, **kwargs):
        if any(r.request.seed == 666 for r in rows):
            raise RuntimeError("injected fault")
        return original(self, rows, *args, **kwargs)

    monkeypatch.setattr(Engine, "_step_rows", step_rows)
    with LiveServer(_app(checkpoint_with_tokenizer)) as s:
        good = dict(model="tiny", prompt=[2, 50, 51], max_tokens=40, seed=7)
        alone = httpx.post(s.url + "/v1/completions", json=good, timeout=60).json()["choices"][0]["text"]

        async def both():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                bad = http.post("/v1/completions", json={**good, "seed": 666})
                ok = http.post("/v1/completions", json={**good, "stream": True})
                return await asyncio.gather(bad, ok)

        bad, ok = asyncio.run(both())
        assert "injected fault" in _is_openai_error(bad, 500)["message"]
        chunks = [line[6:] for line in ok.text.splitlines() if line.startswith("data: {")]
        import json

        assert "".join(json.loads(c)["choices"][0]["text"] for c in chunks) == alone
        assert httpx.get(s.url + "/health").json() == {"status": "ok", "active": 0, "queued": 0}


def test_empty_api_key_is_refused():
    from dgemma.config import ServerConfig, UserError

    with pytest.raises(UserError, match="api_key"):
        ServerConfig(api_key="")
