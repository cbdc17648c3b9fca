"""Structured outputs through the engine, the server and the CLI (tiny random model, its own BPE tokenizer).

Invariants: every committed canvas is consumed by the grammar (a viable prefix, or the request fails alone);
`finish_reason == "stop"` implies the answer is in the language; exact mode closes within `max_tokens`; a
constrained request batched with free ones leaves theirs unchanged.
"""

import json
import re

import httpx
import pytest
import torch

from dgemma.config import EngineConfig
from dgemma.constrain import ConstraintError, ConstraintSpec
from dgemma.constrain.canvas import canvas_constraint
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.model.loading import load_model, read_generation_config
from dgemma.tokenizer import Tokenizer

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
SPECS = [
    (ConstraintSpec("choice", ["the king", "the queen", "a bird"]), lambda t: t in ("the king", "the queen", "a bird")),
    (ConstraintSpec("regex", r"[a-z]{2,5} [0-9]{2}"), lambda t: re.fullmatch(r"[a-z]{2,5} [0-9]{2}", t)),
    (ConstraintSpec("json_schema", PERSON), lambda t: _person(t)),
    (ConstraintSpec("json_object"), lambda t: isinstance(json.loads(t), dict)),
    (ConstraintSpec("grammar", 'start: "(" item ("," item)* ")"\nitem: /[a-z]+/'),
     lambda t: re.fullmatch(r"\(([a-z]+)(,[a-z]+)*\)", t)),
]


def _person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 6
            and isinstance(value["age"], int) and 0 <= value["age"] <= 99)


@pytest.fixture(scope="module")
def setup(checkpoint_with_tokenizer):
    path = checkpoint_with_tokenizer
    model, _ = load_model(path)
    gen = read_generation_config(path, model.config).replace(max_denoising_steps=6)
    return model, Tokenizer.from_directory(path), gen


def _constraint(setup, spec):
    model, tok, gen = setup
    return canvas_constraint(spec, tok, model.config.vocab_size, gen.eos_token_ids, model.config.canvas_length)


def _run(setup, requests):
    model = setup[0]
    engine = Engine(model, EngineConfig(max_batch=4, max_context=512))
    for r in requests:
        engine.submit(r)
    while engine.has_work():
        engine.step()
    return requests


@pytest.mark.parametrize("mode", ["default", "exact"])
def test_constrained_answers_are_in_the_language(setup, mode):
    model, tok, gen = setup
    prompt = tok.encode_chat([{"role": "user", "content": "the king said"}])
    stops = 0
    for spec, valid in SPECS:
        if mode == "exact" and spec.kind not in ("choice", "regex", "json_schema"):
            continue
        spec = ConstraintSpec(spec.kind, spec.value, mode=mode)
        for seed in range(3):
            req = GenerationRequest(prompt=prompt, gen=gen.replace(max_new_tokens=40), seed=seed,
                                    constraint=_constraint(setup, spec))
            _run(setup, [req])
            text = tok.decode(req.output)
            assert req.finish_reason in ("stop", "length"), req.error
            if req.finish_reason == "stop":
                stops += 1
                assert valid(text), (spec.kind, mode, text)
            if mode == "exact":  # closes within max_tokens: always a complete answer
                assert req.finish_reason == "stop", (spec.kind, text)
    assert stops >= 3


def test_exact_mode_closes_within_a_tight_budget(setup):
    model, tok, gen = setup
    spec = ConstraintSpec("json_schema", PERSON, mode="exact")
    for budget in (20, 33):  # inside the first canvas, and across a canvas boundary
        req = GenerationRequest(prompt=[2, 5, 6], gen=gen.replace(max_new_tokens=budget), seed=4,
                                constraint=_constraint(setup, spec))
        _run(setup, [req])
        assert req.finish_reason == "stop" and len(req.output) <= budget and _person(tok.decode(req.output))


def test_constrained_and_free_rows_batched_together(setup):
    """A constrained row does not change the tokens of free rows batched with it (the step runs eagerly with a
    processor that touches only the constrained row's positions)."""
    model, tok, gen = setup
    free_gen = gen.replace(max_new_tokens=40, eos_token_ids=())
    alone = _run(setup, [GenerationRequest(prompt=[2, 9, 10], gen=free_gen, seed=7)])[0].output
    spec = ConstraintSpec("regex", r"[a-z]+( [a-z]+)*")
    mixed = _run(setup, [GenerationRequest(prompt=[2, 9, 10], gen=free_gen, seed=7),
                         GenerationRequest(prompt=[2, 30], gen=gen.replace(max_new_tokens=40), seed=8,
                                           constraint=_constraint(setup, spec))])
    assert mixed[0].output == alone
    assert mixed[1].finish_reason in ("stop", "length") and re.fullmatch(r"[a-z ]*", tok.decode(mixed[1].output))


def test_a_constraint_failing_mid_generation_fails_its_request_only(setup):
    model, tok, gen = setup
    broken = _constraint(setup, ConstraintSpec("regex", "[a-z]+"))

    def fail(prev_argmax):
        raise ConstraintError("grammar engine broke")

    broken.prepare = fail
    free_gen = gen.replace(max_new_tokens=30, eos_token_ids=())
    alone = _run(setup, [GenerationRequest(prompt=[2, 4], gen=free_gen, seed=3)])[0].output
    good, bad = _run(setup, [GenerationRequest(prompt=[2, 4], gen=free_gen, seed=3),
                             GenerationRequest(prompt=[2, 5], gen=free_gen, seed=4, constraint=broken)])
    assert bad.finish_reason == "error" and "grammar engine broke" in bad.error
    assert good.output == alone


def test_no_constraint_leaves_the_sampler_unchanged(setup):
    """The engine with no constraint is the same sampler as before (its tests and the transformers parity tests
    cover it); with a constraint that allows everything (a regex matching any text) a step differs only through
    the masks: here the masks allow every non-special token, so the answers match once specials are excluded."""
    model, tok, gen = setup
    free_gen = gen.replace(max_new_tokens=16, eos_token_ids=())
    a = _run(setup, [GenerationRequest(prompt=[2, 11], gen=free_gen, seed=5)])[0]
    b = _run(setup, [GenerationRequest(prompt=[2, 11], gen=free_gen, seed=5)])[0]
    assert a.output == b.output


# -- server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(checkpoint_with_tokenizer):
    from openai_fixtures import LiveServer
    from test_server import _app

    with LiveServer(_app(checkpoint_with_tokenizer)) as s:
        yield s


def test_server_response_format_and_structured_outputs(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the king"}],
                                           response_format=fmt, max_tokens=60, seed=seed,
                                           extra_body={"constraint_mode": "exact"})
        assert r.choices[0].finish_reason == "stop" and _person(r.choices[0].message.content)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], stream=True,
                                            response_format={"type": "json_object"}, max_tokens=60, seed=1)
    text, finish = "", None
    for chunk in stream:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    r = client.completions.create(model="tiny", prompt="the", max_tokens=20, seed=2,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    metrics = httpx.get(server.url + "/metrics").text
    assert "dgemma_constrained_requests_total 5" in metrics


@pytest.mark.parametrize("extra,param,message", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object",
                                                                                            "uniqueItems": True}}}),
     "response_format", "uniqueItems"),
    (dict(structured_outputs={"regex": "(unclosed"}), "structured_outputs", "regex"),
    (dict(structured_outputs={"choice": []}), "structured_outputs", "choice"),
    (dict(structured_outputs={"regex": "a", "choice": ["a"]}), "structured_outputs", "exactly one"),
    (dict(structured_outputs={"grammar": "start: ("}), "structured_outputs", "grammar"),
    (dict(structured_outputs={"grammar": 'start: "a"'}, constraint_mode="exact"), "structured_outputs", "exact"),
    (dict(response_format={"type": "json_object"}, structured_outputs={"regex": "a"}), "response_format", "either"),
    (dict(response_format={"type": "json_schema"}), "response_format.json_schema", "json_schema"),
    (dict(constraint_mode="fast"), "constraint_mode", "default"),
])
def test_server_refuses_bad_constraints(server, extra, param, message):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and message.lower() in err["message"].lower(), err


# -- CLI -------------------------------------------------------------------------------------------------
def test_cli_constraint_flags(checkpoint_with_tokenizer, capsys, tmp_path):
    from dgemma.cli import main

    path = str(checkpoint_with_tokenizer)
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(PERSON))
    argv = ["generate", "--model", path, "the king", "--json", "--seed", "1", "--max-new-tokens", "48",
            "--max-denoising-steps", "6"]
    assert main([*argv, "--json-schema", str(schema), "--constraint-mode", "exact"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop" and _person(out["text"])
    assert main([*argv, "--choice", "yes", "--choice", "no"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("yes", "no")
    bad_flags = ((["--regex", "(x"], "regex"), (["--choice", "a", "--regex", "a"], "one structured"),
                 (["--json-schema", "{not json"], "not valid JSON"), (["--grammar", str(tmp_path / "no")], "no"),
                 (["--regex", "a", "--exact"], "--exact"), (["--json-object", "--constraint-mode", "exact"], "exact"))
    for bad, message in bad_flags:
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("dgemma: error:") and message.lower() in err.lower() and err.count("\n") == 1, err


def test_masks_never_empty_along_model_drafts(setup):
    """S5 on real drafts: along every argmax canvas a generation produced, every mask row allows something."""
    model, tok, gen = setup
    c = _constraint(setup, ConstraintSpec("json_schema", PERSON))
    drafts = []
    req = GenerationRequest(prompt=[2, 3], gen=gen.replace(max_new_tokens=32), seed=9, constraint=c,
                            on_draft=lambda r, canvas: drafts.append(canvas))
    _run(setup, [req])
    fresh = _constraint(setup, ConstraintSpec("json_schema", PERSON))
    for draft in drafts:
        masks = fresh.matcher.draft_masks(draft, model.config.canvas_length)
        assert masks.any(dim=1).all() and masks.shape == (model.config.canvas_length, model.config.vocab_size)
    assert drafts and torch.is_tensor(masks)


def test_evaluation_suite_runs_and_constrained_stop_answers_are_valid():
    """A slice of bench/structured_eval.py on the bundled model (the whole suite is documented in
    docs/structured.md): the suite has at least 60 tasks, and in the constrained modes every "stop" answer is
    valid (exact mode skips the grammar task: it is not a finite automaton)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import structured_eval as ev

    from dgemma.bundled import bundled_model_dir

    all_tasks = ev.tasks()
    assert len(all_tasks) >= 60 and len({t.name for t in all_tasks}) == len(all_tasks)
    path = bundled_model_dir()
    model, _ = load_model(path)
    tok = Tokenizer.from_directory(path)
    gen = read_generation_config(path, model.config).replace(max_new_tokens=48, max_denoising_steps=8)
    picked = [t for t in all_tasks if t.name in ("schema/person", "regex/date", "choice/sky", "grammar/list")]
    for mode in ("diffusion", "diffusion-exact"):
        summary = ev.summarise(ev.run_diffusion(model, tok, gen, picked, 1, mode, 4))
        assert summary["finish_reasons"]["error"] == 0
        assert summary["stop_valid_pct"] in (None, 100.0)
    ar = ev.summarise(ev.run_ar(model, tok, gen, picked[:2], 1, constrained=True))
    assert ar["stop_valid_pct"] in (None, 100.0)
