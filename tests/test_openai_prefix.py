"""The settled-prefix rule (sampler/prefix.py): on hand-made step sequences, measured through the engine without
changing anything, and enforced (prefix locking) with an early finish at a locked end token."""

import math

import torch

from dgemma.config import EngineConfig, GenerationConfig
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.model.loading import load_model
from dgemma.sampler.prefix import PrefixRule, PrefixStats, PrefixTracker

SURE, UNSURE = math.log(0.95), math.log(0.5)


def test_positions_settle_in_order_when_stable_and_confident():
    t = PrefixTracker(PrefixRule(confidence=0.9, steps=2), canvas_length=4)
    assert t.update([5, 6, 7, 8], [SURE] * 4) == 0  # one step is not yet "stable over two"
    assert t.update([5, 6, 7, 9], [SURE, SURE, UNSURE, SURE]) == 2  # position 2 is unsure, so 3 waits too
    assert t.update([5, 6, 7, 9], [SURE] * 4) == 4
    assert t.tokens == [5, 6, 7, 9] and t.lock_steps == [2, 2, 3, 3]
    # settled positions never leave, whatever later steps say
    assert t.update([1, 1, 1, 1], [UNSURE] * 4) == 4 and t.tokens == [5, 6, 7, 9]


def test_a_changed_argmax_resets_only_from_there():
    t = PrefixTracker(PrefixRule(confidence=0.9, steps=3), canvas_length=3)
    t.update([1, 2, 3], [SURE] * 3)
    t.update([1, 2, 4], [SURE] * 3)
    assert t.update([1, 2, 4], [SURE] * 3) == 2  # position 2 has been 4 for two steps only
    assert t.update([1, 2, 4], [SURE] * 3) == 3


def test_settle_counts_false_locks_and_lead_within_the_answer():
    t = PrefixTracker(PrefixRule(steps=2), canvas_length=5)
    t.update([1, 2, 3, 4, 5], [SURE] * 5)
    t.update([1, 2, 3, 4, 5], [SURE] * 5)  # all five settle at step 2
    for _ in range(3):
        t.update([1, 9, 3, 4, 5], [SURE] * 5)  # the canvas ends at step 5 with position 1 changed
    stats = t.settle([1, 9, 3, 4, 5], answer_length=4)  # an end id at position 3: position 4 is padding
    assert (stats.answer_tokens, stats.locked_tokens, stats.false_locks) == (4, 4, 1)
    assert stats.lead_steps == 3 * 3  # positions 0, 2 and 3 were right 3 steps before the end
    assert stats.first_lock_fraction == [2 / 5]
    total = PrefixStats()
    total.add(stats)
    total.add(stats)
    assert total.false_locks == 2 and total.canvases == 2 and len(total.first_lock_fraction) == 2


def _settling_denoiser(model, monkeypatch, answer_settles=2, padding_settles=8, end_at=5):
    """The answer (end_at tokens, then EOS) settles at call `answer_settles`, the padding after it at call
    `padding_settles`; sure logits (scale 100)."""
    import dgemma.engine.step as step_module

    c, weight = model.config.canvas_length, model.stack.embed_tokens.weight
    calls = {"n": 0}

    def hidden(canvas, *rest):
        calls["n"] += 1
        n = calls["n"]
        t = (torch.arange(c) * 5 + 9 + 13 * min(n, padding_settles)) % 300 + 20
        t[:end_at] = torch.arange(end_at) + 40 + 11 * min(n, answer_settles)
        t[end_at] = 1
        return (100.0 * weight[t] / weight[t].norm(dim=-1, keepdim=True))[None].expand(len(canvas), -1, -1)

    monkeypatch.setattr(step_module, "denoise", lambda m, w, cache, canvas, soft, inputs: hidden(canvas))
    return calls


def test_measuring_changes_nothing(hf_checkpoint, monkeypatch):
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    gen = GenerationConfig(max_new_tokens=60, max_denoising_steps=12, eos_token_ids=(1,))
    runs = []
    for prefix in (None, "measure"):
        _settling_denoiser(model, monkeypatch)
        engine = Engine(model, EngineConfig(max_batch=2, max_context=256))
        runs.append(engine.submit(GenerationRequest(prompt=[2, 9], gen=gen, seed=3, prefix=prefix)))
        while engine.has_work():
            engine.step()
    plain, measured = runs
    assert measured.output == plain.output and measured.steps == plain.steps == [9]
    stats = measured.prefix_stats
    assert stats.canvases == 1 and stats.answer_tokens == 6 and stats.locked_tokens == 6 and stats.false_locks == 0
    assert stats.first_lock_fraction == [3 / 9]  # settled at call 3 (stable over calls 2 and 3) of 9


def test_locking_streams_early_and_a_locked_end_token_finishes_at_once(hf_checkpoint, monkeypatch):
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    calls = _settling_denoiser(model, monkeypatch)
    gen = GenerationConfig(max_new_tokens=60, max_denoising_steps=12, eos_token_ids=(1,))
    seen = []
    engine = Engine(model, EngineConfig(max_batch=2, max_context=256))
    req = engine.submit(GenerationRequest(prompt=[2, 9], gen=gen, seed=3, prefix="lock",
                                          on_tokens=lambda r, toks: seen.append((calls["n"], list(toks), r.done))))
    while engine.has_work():
        engine.step()
    assert req.output == [40 + 22 + i for i in range(5)] and req.finish_reason == "stop"
    assert req.steps == [3] and calls["n"] == 3  # instead of 9 steps waiting for the padding
    assert seen == [(3, req.output, True)]


def test_locked_tokens_reach_max_tokens_and_end_with_length(hf_checkpoint, monkeypatch):
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    calls = _settling_denoiser(model, monkeypatch, end_at=12)
    gen = GenerationConfig(max_new_tokens=7, max_denoising_steps=12, eos_token_ids=(1,))
    engine = Engine(model, EngineConfig(max_batch=1, max_context=256))
    req = engine.submit(GenerationRequest(prompt=[2, 9], gen=gen, seed=3, prefix="lock", logprobs=0))
    while engine.has_work():
        engine.step()
    assert len(req.output) == 7 and req.finish_reason == "length" and calls["n"] == 3
    assert len(req.token_logprobs) == 7 and all(-1e-3 < lp <= 0 for lp in req.token_logprobs)


def test_locked_prefix_is_forced_in_later_steps_and_leads_the_commit(hf_checkpoint, monkeypatch):
    """An answer that settles, then is contradicted by later logits: the locked tokens stay (forced one-hot) and the
    committed canvas begins with them; without locking the later logits win."""
    import dgemma.engine.step as step_module

    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    c, weight = model.config.canvas_length, model.stack.embed_tokens.weight
    calls = {"n": 0}

    def hidden(canvas):
        calls["n"] += 1
        t = (torch.arange(c) * 7 + 3 * calls["n"]) % 200 + 30  # everything moves every call ...
        t[:3] = torch.tensor([50, 51, 52]) if calls["n"] <= 4 else torch.tensor([60, 61, 62])  # ... but the head
        return (100.0 * weight[t] / weight[t].norm(dim=-1, keepdim=True))[None]

    monkeypatch.setattr(step_module, "denoise", lambda m, w, cache, canvas, soft, inputs: hidden(canvas))
    gen = GenerationConfig(max_new_tokens=c, max_denoising_steps=8, eos_token_ids=(1,))
    out = {}
    for prefix in ("lock", None):
        calls["n"] = 0
        engine = Engine(model, EngineConfig(max_batch=1, max_context=256))
        out[prefix] = engine.submit(GenerationRequest(prompt=[2, 9], gen=gen, seed=3, prefix=prefix))
        while engine.has_work():
            engine.step()
    assert out["lock"].output[:3] == [50, 51, 52]
    assert out[None].output[:3] == [60, 61, 62]
    assert out["lock"].output[3:] == out[None].output[3:]
