"""Sampling options on the canvas: top-k / top-p / min-p (against a brute-force reading of their definition, and the
engine against the reference sampler on the same logits), log-probabilities, and n choices sharing one prefill."""

import math

import pytest
import torch
from model_fixtures import perturbed_model

from dgemma.config import EngineConfig, GenerationConfig
from dgemma.engine import engine as engine_module
from dgemma.engine.engine import Engine, GenerationRequest, derive_seed
from dgemma.engine.sampler import fused_sample
from dgemma.engine.weights import Linear
from dgemma.model.loading import load_model
from dgemma.sampler.entropy_bound import apply_processor, temperature, token_entropy
from dgemma.sampler.filters import filter_logits, filter_processor
from dgemma.sampler.reference import generate


def _brute_force_keep(x: list[float], top_k: int, top_p: float, min_p: float) -> list[bool]:
    """The three rules of sampler/filters.py read literally, one token at a time, in float64."""
    finite = [v for v in x if v != -math.inf]
    m = max(finite)
    z = sum(math.exp(v - m) for v in finite)
    p = [math.exp(v - m) / z if v != -math.inf else 0.0 for v in x]
    desc = sorted(x, reverse=True)
    t_k = desc[min(top_k, len(x)) - 1] if top_k > 0 else -math.inf
    in_k = [v >= t_k for v in x]
    mass_k = sum(pi for pi, k in zip(p, in_k, strict=True) if k)
    keep = []
    for v, pv, k in zip(x, p, in_k, strict=True):
        above = sum(pu for u, pu, ku in zip(x, p, in_k, strict=True) if ku and u > v)
        nucleus = top_p >= 1 or above < top_p * mass_k
        keep.append(k and nucleus and pv >= min_p * max(p))
    return keep


def test_filters_match_a_brute_force_reading_of_their_definition():
    g = torch.Generator().manual_seed(0)
    n, v = 60, 23
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64) * 4
    x[::7, 3:6] = x[::7, 2:3]  # ties, at and around the thresholds
    x[::5, :4] = -math.inf  # masked entries (a grammar's)
    x = x.float()
    top_k = torch.randint(0, 8, (n,), generator=g)
    top_p = torch.where(torch.rand(n, generator=g) < 0.3, 1.0, torch.rand(n, generator=g) * 0.98 + 0.01)
    min_p = torch.where(torch.rand(n, generator=g) < 0.4, 0.0, torch.rand(n, generator=g) * 0.5)
    out = filter_logits(x.clone(), top_k, top_p, min_p)
    checked = 0
    for i in range(n):
        row = x[i].tolist()
        want = _brute_force_keep(row, int(top_k[i]), float(top_p[i]), float(min_p[i]))
        got = (out[i] != -math.inf).tolist()
        # a token whose mass above it sits within float32 rounding of top_p could go either way: skip those rows
        p = torch.softmax(x[i].double(), -1)
        borderline = any(abs(float(p[x[i] > x[i, j]].sum()) - float(top_p[i])) < 1e-5 for j in range(v))
        if borderline:
            continue
        assert got == [w and row[j] != -math.inf for j, w in enumerate(want)], (i, top_k[i], top_p[i], min_p[i])
        assert out[i].argmax() == x[i].argmax()  # the argmax is always kept
        checked += 1
    assert checked >= 40
    kept = out != -math.inf
    torch.testing.assert_close(out[kept], x[kept])  # kept logits are untouched


def test_neutral_filters_change_nothing_and_the_processor_is_none():
    x = torch.randn(5, 40)
    n = x.shape[0]
    same = filter_logits(x.clone(), torch.zeros(n, dtype=torch.long), torch.ones(n), torch.zeros(n))
    assert torch.equal(same, x)
    assert filter_processor(0, 1.0, 0.0) is None
    assert not GenerationConfig().filters and GenerationConfig(min_p=0.1).filters


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1),
                                 dict(min_p=2.0), dict(top_k=True)])
def test_filter_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        GenerationConfig(**bad)


def test_fused_sampler_with_filters_equals_the_reference_pieces():
    """The engine's sampler with the filters as its processor: argmax, entropy and soft input are those of the
    filtered reference logits, and every sample is a kept token."""
    model = perturbed_model()
    embed = model.stack.embed_tokens.weight
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 32, 64, generator=g) * 2
    temps, u = torch.tensor([0.8, 0.45]), torch.rand(2, 32, generator=g)
    processed = model.logits(hidden) / temps[:, None, None]
    for settings in ((5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.2), (7, 0.9, 0.05)):
        processor = filter_processor(*settings)
        out = fused_sample(hidden, Linear(embed), Linear(embed.T), model.config.embed_scale, 30.0, temps, u, 24,
                           processor)
        ref = apply_processor(processed.clone(), processor)
        assert torch.equal(out.argmax_canvas, processed.argmax(-1))  # the argmax survives every filter
        torch.testing.assert_close(out.entropy, token_entropy(ref), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.soft_embeds, model.soft_embed(ref), atol=1e-5, rtol=1e-5)
        assert (ref.gather(-1, out.sampled[..., None]) > -math.inf).all()
        assert (out.entropy < token_entropy(processed) + 1e-6).all()


def _fixed_logits(model, monkeypatch, scale, settle_at=3):
    """Both samplers see the same logits at their n-th denoiser call (the argmax changes until `settle_at`)."""
    import dgemma.engine.step as step_module

    c, weight = model.config.canvas_length, model.stack.embed_tokens.weight
    calls = {"ref": 0, "fast": 0, "check": 0}
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(c, weight.shape[1], generator=g)

    def hidden(kind):
        calls[kind] += 1
        t = (torch.arange(c) * 11 + 3 + 17 * min(calls[kind], settle_at)) % model.config.vocab_size
        h = weight[t] / weight[t].norm(dim=-1, keepdim=True) + 0.3 * noise / noise.norm(dim=-1, keepdim=True)
        return scale * h

    monkeypatch.setattr(model, "denoise", lambda canvas, cache, sc=None: model.logits(hidden("ref")[None]))
    monkeypatch.setattr(step_module, "denoise", lambda m, w, cache, canvas, soft, inputs: hidden("fast")[None])
    return hidden


@pytest.mark.parametrize("filters", [dict(), dict(top_k=1), dict(top_p=0.5, min_p=0.1)])
def test_engine_and_reference_agree_on_filters_steps_and_logprobs(hf_checkpoint, monkeypatch, filters):
    """Same logits in both samplers: the filters change the entropy, hence acceptance and the stopping test, the
    same way in both (top_k=1 makes every position's entropy 0, so a canvas stops as soon as its argmax settles);
    the committed tokens' log-probabilities are the reference's, read from each canvas's last processed
    distribution."""
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    _fixed_logits(model, monkeypatch, scale=6.0)
    gen = GenerationConfig(max_new_tokens=model.config.canvas_length, max_denoising_steps=8, eos_token_ids=(),
                           **filters)
    torch.manual_seed(0)
    ref = generate(model, torch.tensor([[2, 9]]), gen)
    engine = Engine(model, EngineConfig(max_batch=1, max_context=64))
    fast = engine.submit(GenerationRequest(prompt=[2, 9], gen=gen, seed=1, logprobs=3))
    while engine.has_work():
        engine.step()
    assert fast.steps == ref.steps[0]
    if filters.get("top_k") == 1:
        assert fast.steps == [4]  # the argmax settles at call 3, one more equal call, entropy 0
    else:
        assert fast.steps == [8]
    assert fast.output == ref.token_ids[0]
    torch.testing.assert_close(torch.tensor(fast.token_logprobs), torch.tensor(ref.logprobs[0]), atol=1e-4, rtol=0)
    assert len(fast.top_logprobs) == len(fast.output)
    for token, lp, top in zip(fast.output, fast.token_logprobs, fast.top_logprobs, strict=True):
        assert top[0][0] == token and abs(top[0][1] - lp) < 1e-4  # the committed token is the argmax here
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


def test_logprobs_are_those_of_the_last_processed_distribution(hf_checkpoint, monkeypatch):
    """The top log-probabilities equal log_softmax of the canvas's last-step processed logits, recomputed here."""
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    hidden = _fixed_logits(model, monkeypatch, scale=6.0)
    n_steps = 5
    gen = GenerationConfig(max_new_tokens=model.config.canvas_length, max_denoising_steps=n_steps, eos_token_ids=(),
                           confidence_threshold=0.0)
    engine = Engine(model, EngineConfig(max_batch=1, max_context=64))
    req = engine.submit(GenerationRequest(prompt=[2, 9], gen=gen, seed=1, logprobs=4))
    while engine.has_work():
        engine.step()
    for _ in range(n_steps):
        last = model.logits(hidden("check")[None])[0]  # the 5th call's logits
    processed = last / temperature(1, n_steps, gen.t_min, gen.t_max)
    logp = torch.log_softmax(processed, -1)
    want = torch.topk(logp, 4, dim=-1)
    got_ids = torch.tensor([[t for t, _ in top] for top in req.top_logprobs])
    got_values = torch.tensor([[v for _, v in top] for top in req.top_logprobs])
    assert torch.equal(got_ids, want.indices)
    torch.testing.assert_close(got_values, want.values, atol=1e-4, rtol=0)


def test_rows_with_options_leave_the_others_unchanged_and_are_batch_invariant():
    """A batch mixing a plain row, a filtered row and a logprobs row: each row's tokens are its lone run's."""
    model = perturbed_model(seed=3)
    base = GenerationConfig(max_new_tokens=40, max_denoising_steps=4, eos_token_ids=())
    variants = [dict(gen=base), dict(gen=base.replace(top_p=0.7, top_k=20)), dict(gen=base, logprobs=2)]
    prompts = [[2, 5, 6], list(range(3, 20)), [2, 9]]

    def run(batch, items):
        engine = Engine(model, EngineConfig(max_batch=batch, max_context=256))
        reqs = [engine.submit(GenerationRequest(prompt=p, seed=10 + i, **kw)) for i, (p, kw) in items]
        while engine.has_work():
            engine.step()
        return reqs

    items = list(enumerate(zip(prompts, variants, strict=True)))
    alone = [run(1, [item])[0] for item in items]
    together = run(3, items)
    for a, b in zip(alone, together, strict=True):
        assert a.output == b.output and a.steps == b.steps
        torch.testing.assert_close(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs), atol=1e-4, rtol=0)
    assert together[2].token_logprobs and all(lp <= 0 for lp in together[2].token_logprobs)
    assert len(together[2].top_logprobs) == len(together[2].output)
    plain = Engine(model, EngineConfig(max_batch=1, max_context=256)).generate([prompts[0]], base, [10])[0]
    assert plain.output == together[0].output


def test_n_choices_share_one_prefill_and_each_is_its_lone_run(monkeypatch):
    model = perturbed_model(seed=5)
    gen = GenerationConfig(max_new_tokens=30, max_denoising_steps=3, eos_token_ids=())
    prompt = list(range(2, 30))
    prefills = []
    original = engine_module.encode_row

    def counting(model, cache, row, ids, weights=None):
        prefills.append(ids.shape[1])
        return original(model, cache, row, ids, weights)

    monkeypatch.setattr(engine_module, "encode_row", counting)
    engine = Engine(model, EngineConfig(max_batch=4, max_context=256))
    choices = GenerationRequest(prompt=prompt, gen=gen, seed=7).choices(3)
    for c in choices:
        engine.submit(c)
    while engine.has_work():
        engine.step()
    assert prefills.count(len(prompt)) == 1  # one prefill for three rows
    assert [c.seed for c in choices] == [7, derive_seed(7, 1), derive_seed(7, 2)]
    assert len({tuple(c.output) for c in choices}) == 3
    monkeypatch.undo()
    for c in choices:
        alone = Engine(model, EngineConfig(max_batch=1, max_context=256)).generate([prompt], gen, [c.seed])[0]
        assert alone.output == c.output


def test_derived_seeds_are_64_bit_and_distinct():
    seeds = {derive_seed(s, i) for s in (0, 1, -1, 2**63 - 1, -(2**63)) for i in range(1, 50)}
    assert len(seeds) == 5 * 49
    assert all(-(2**63) <= s < 2**63 for s in seeds)
    assert derive_seed(123, 0) == 123
