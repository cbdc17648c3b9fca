"""The fast engine vs its reference twins: forward passes, fused sampler, whole generations."""

import pytest
import torch
from model_fixtures import perturbed_model

from dgemma.config import EngineConfig, GenerationConfig
from dgemma.engine import rng
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.engine.forward import denoise_rows, encode_row
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.engine.sampler import fused_sample
from dgemma.engine.weights import Linear
from dgemma.model.init import preset_config, random_model
from dgemma.model.loading import load_model
from dgemma.sampler.entropy_bound import accept_mask, token_entropy
from dgemma.sampler.reference import generate


@pytest.mark.parametrize("prompt_lens,commits", [([5], 0), ([40], 2), ([3, 30, 17], 1)])
def test_runner_matches_reference_forward(prompt_lens, commits):
    model = perturbed_model(sliding_window=12, canvas_length=8)
    c, v = 8, model.config.vocab_size
    cache = StaticKVCache(model.config, len(prompt_lens), 256, "cpu", torch.float32)
    refs, canvases, scs = [], [], []
    g = torch.Generator().manual_seed(0)
    for row, n in enumerate(prompt_lens):
        ref_cache = model.new_cache()
        prompt = torch.randint(3, v, (1, n), generator=g)
        model.encode(prompt, ref_cache)
        encode_row(model, cache, row, prompt)
        for _ in range(commits):
            block = torch.randint(0, v, (1, c), generator=g)
            model.encode(block, ref_cache)
            encode_row(model, cache, row, block)
        canvas = torch.randint(0, v, (1, c), generator=g)
        sc = torch.randn(1, c, v, generator=g) * 3
        refs.append(model.denoise(canvas, ref_cache, sc))
        canvases.append(canvas)
        scs.append(sc)
    soft = model.soft_embed(torch.cat(scs))
    hidden = denoise_rows(model, cache, torch.cat(canvases), soft)
    torch.testing.assert_close(model.logits(hidden), torch.cat(refs), atol=2e-5, rtol=2e-5)


def test_fused_sampler_matches_reference_pieces():
    model = perturbed_model()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 32, 64, generator=g) * 2
    temps = torch.tensor([0.8, 0.45])
    embed = model.stack.embed_tokens.weight
    out = fused_sample(hidden, Linear(embed), Linear(embed.T), model.config.embed_scale, 30.0, temps,
                       torch.rand(2, 32, generator=g), chunk=24)
    processed = model.logits(hidden) / temps[:, None, None]
    assert torch.equal(out.argmax_canvas, processed.argmax(-1))
    torch.testing.assert_close(out.entropy, token_entropy(processed), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.soft_embeds, model.soft_embed(processed), atol=1e-5, rtol=1e-5)
    assert torch.equal(accept_mask(out.entropy, 0.1), accept_mask(token_entropy(processed), 0.1))


def test_fused_sampler_frequencies_match_distribution():
    vocab, h = 12, 4
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(vocab, h, generator=g)
    hidden = torch.randn(1, 1, h, generator=g).expand(1, 20000, h).contiguous()
    u = rng.uniform(torch.tensor([7]), torch.tensor([0]), torch.tensor([1]), 20000, 1)
    out = fused_sample(hidden, Linear(weight), Linear(weight.T), 1.0, None, torch.tensor([0.7]), u, chunk=4096)
    probs = torch.softmax((hidden[0, 0] @ weight.T) / 0.7, -1)
    freq = torch.bincount(out.sampled.flatten(), minlength=vocab).float() / 20000
    assert (freq - probs).abs().max() < 0.015
    chi2 = ((freq - probs) ** 2 / probs).sum() * 20000
    assert chi2 < 40  # 11 degrees of freedom: p < 1e-4 under the null


def test_rng_streams_are_uniform_and_independent():
    seeds = torch.tensor([1, 2])
    a = rng.uniform(seeds, torch.tensor([0, 0]), torch.tensor([5, 5]), 50000, 1)
    assert abs(a.mean().item() - 0.5) < 0.01 and a.min() >= 0 and a.max() < 1
    assert not torch.equal(a[0], a[1])
    b = rng.randint(seeds, torch.tensor([0, 0]), torch.tensor([5, 5]), 50000, 2, 10)
    counts = torch.bincount(b.flatten(), minlength=10).float()
    assert counts.min() > 9000 and counts.max() < 11000


def test_batch_invariance_and_exact_lengths():
    model = perturbed_model(seed=3)
    gen = GenerationConfig(max_new_tokens=45, max_denoising_steps=5, eos_token_ids=())
    prompts = [[2, 5, 6], list(range(3, 40)), [2, 9]]
    alone = [Engine(model, EngineConfig(max_batch=1, max_context=512)).generate([p], gen, [11 + i])[0]
             for i, p in enumerate(prompts)]
    batched = Engine(model, EngineConfig(max_batch=3, max_context=512)).generate(prompts, gen, [11, 12, 13])
    for a, b in zip(alone, batched, strict=True):
        assert a.output == b.output and a.steps == b.steps
        assert len(b.output) == 45 and b.finish_reason == "length"
    # a smaller batch than requests: continuous batching, rows join as others leave
    queued = Engine(model, EngineConfig(max_batch=2, max_context=512)).generate(prompts, gen, [11, 12, 13])
    assert [q.output for q in queued] == [a.output for a in alone]


def test_same_logits_same_tokens_steps_and_eos(hf_checkpoint, monkeypatch):
    """With a denoiser that is sure of a target (both paths see the same logits), the engine and the
    reference accept, stop, commit and end at EOS identically."""
    import dgemma.engine.step as step_module

    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    c, prompt = model.config.canvas_length, [2, 30, 31, 32, 33]
    weight = model.stack.embed_tokens.weight
    g = torch.Generator().manual_seed(9)
    targets = torch.randint(3, model.config.vocab_size, (3, c), generator=g)
    targets[2, 5] = 1  # EOS in the third canvas

    def hidden_for(length):
        t = targets[(length - len(prompt)) // c]
        return 100.0 * weight[t] / weight[t].norm(dim=-1, keepdim=True)  # (C, H)

    monkeypatch.setattr(model, "denoise", lambda canvas, cache, sc=None: model.logits(hidden_for(cache.length)[None]))
    monkeypatch.setattr(step_module, "denoise", lambda m, w, cache, canvas, soft, inputs: torch.stack(
        [hidden_for(n) for n in cache.lengths[:len(canvas)]]))
    gen = GenerationConfig(max_new_tokens=3 * c, max_denoising_steps=12, eos_token_ids=(1,), pad_token_id=0)
    torch.manual_seed(0)
    ref = generate(model, torch.tensor([prompt]), gen)
    fast = Engine(model, EngineConfig(max_batch=2, max_context=256)).generate([prompt], gen, [5])[0]
    assert fast.output == ref.token_ids[0] == targets.flatten()[: 2 * c + 5].tolist()
    assert fast.steps == ref.steps[0] == [2, 2, 2]
    assert fast.finish_reason == ref.finish_reasons[0] == "stop"


def test_engine_eos_cancel_and_validation():
    model = perturbed_model(seed=4)
    engine = Engine(model, EngineConfig(max_batch=2, max_context=128))
    gen = GenerationConfig(max_new_tokens=64, max_denoising_steps=3, eos_token_ids=tuple(range(3, 400)))
    req = engine.generate([[2, 7]], gen, [0])[0]
    assert req.finish_reason == "stop" and len(req.output) < 64  # EOS ends the request
    seen = []
    long_gen = gen.replace(eos_token_ids=(), max_new_tokens=96)
    r1 = engine.submit(GenerationRequest(prompt=[2, 3], gen=long_gen, on_tokens=lambda r, t: seen.append(len(t))))
    engine.step()
    r1.cancelled = True
    engine.step()
    assert r1.finish_reason == "cancelled" and not engine.has_work()
    with pytest.raises(ValueError, match="must lie in"):
        engine.submit(GenerationRequest(prompt=[2, 10**6], gen=gen))
    with pytest.raises(ValueError, match="context slots"):
        engine.submit(GenerationRequest(prompt=[2] * 100, gen=gen.replace(max_new_tokens=200)))


@pytest.mark.parametrize("stability", [0, 1, 3])
def test_stopping_rule_matches_reference(hf_checkpoint, monkeypatch, stability):
    """The argmax changes for the first 3 calls of every canvas, then settles: both paths stop at the same step."""
    import dgemma.engine.step as step_module

    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    c, weight = model.config.canvas_length, model.stack.embed_tokens.weight
    calls = {"ref": 0, "fast": 0}

    def hidden(kind):
        calls[kind] += 1
        t = (torch.arange(c) * 11 + 3 + 17 * min(calls[kind] % 1000, 3)) % model.config.vocab_size
        return 100.0 * weight[t] / weight[t].norm(dim=-1, keepdim=True)

    def ref_denoise(canvas, cache, sc=None):
        return model.logits(hidden("ref")[None])

    monkeypatch.setattr(model, "denoise", ref_denoise)
    monkeypatch.setattr(step_module, "denoise", lambda m, w, cache, canvas, soft, inputs: hidden("fast")[None])
    gen = GenerationConfig(max_new_tokens=c, max_denoising_steps=12, stability_threshold=stability)
    torch.manual_seed(0)
    ref = generate(model, torch.tensor([[2, 9]]), gen)
    fast = Engine(model, EngineConfig(max_batch=1, max_context=64)).generate([[2, 9]], gen, [1])[0]
    assert fast.steps == ref.steps[0]
    if stability:  # argmax settles at call 3; k more equal calls are needed
        assert ref.steps[0] == [3 + stability]
    assert fast.output == ref.token_ids[0]


def test_grouped_experts_match_reference():
    from dgemma.engine.weights import GroupedExperts

    config = preset_config("tiny", num_experts=32, top_k_experts=4, moe_intermediate_size=32)
    model = random_model(config, seed=6)
    experts, router = model.stack.layers[0].experts, model.stack.layers[0].router
    x = torch.randn(40, config.hidden_size)
    weights, ids = router(x)
    grouped = GroupedExperts(experts)
    assert grouped._grouped_ok(x)
    torch.testing.assert_close(grouped(x, ids, weights), experts(x, ids, weights), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    """The torch.compile'd step (EngineConfig.compile) against the eager twin; then a second model of the
    same shapes but other constants (its graphs must not be the first engine's: they skip guards on the
    model's modules), and that model again after one of its parameters was replaced (re-pack, recompile)."""
    gen = GenerationConfig(max_new_tokens=40, max_denoising_steps=3, eos_token_ids=())
    prompts = [[2, 5], [2, 6, 7]]

    def check(model, compiled_engine):
        eager = Engine(model, EngineConfig(max_batch=2, max_context=256)).generate(prompts, gen, [1, 2])
        compiled = compiled_engine.generate(prompts, gen, [1, 2])
        for a, b in zip(eager, compiled, strict=True):
            assert a.steps == b.steps
            # fp32, fused kernels: equal up to rare near-ties
            assert sum(x == y for x, y in zip(a.output, b.output, strict=True)) >= 0.95 * len(a.output)

    check(model := perturbed_model(seed=8), Engine(model, EngineConfig(max_batch=2, max_context=256, compile=True)))
    other = perturbed_model(seed=9)
    for layer in other.stack.layers:  # a constant held only by modules (their guards are skipped)
        layer.post_feedforward_layernorm.eps = 100.0
    engine = Engine(other, EngineConfig(max_batch=2, max_context=256, compile=True))
    check(other, engine)
    mlp = other.stack.layers[1].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.detach() * -2.0)
    check(other, engine)


def test_fewer_host_syncs_same_tokens(hf_checkpoint, monkeypatch):
    """sync_every > 1: rows that stop between syncs are frozen on the device, then committed: same output."""
    import dgemma.engine.step as step_module

    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    c, weight = model.config.canvas_length, model.stack.embed_tokens.weight
    calls = {}

    def hidden(m, w, cache, canvas, soft, inputs):  # each row's argmax settles after a row-specific number of calls
        out = []
        for n in cache.lengths[: len(canvas)]:  # the context length identifies request and canvas here
            calls[n] = calls.get(n, 0) + 1
            t = (torch.arange(c) * 7 + n + 13 * min(calls[n], 2 + n % 4)) % model.config.vocab_size
            out.append(100.0 * weight[t] / weight[t].norm(dim=-1, keepdim=True))
        return torch.stack(out)

    monkeypatch.setattr(step_module, "denoise", hidden)
    gen = GenerationConfig(max_new_tokens=3 * c, max_denoising_steps=12, eos_token_ids=())
    prompts = [[2, 5], [2, 6, 7], [2, 8, 9, 10]]
    results = []
    for sync_every in (1, 4):
        calls.clear()
        engine = Engine(model, EngineConfig(max_batch=3, max_context=256, sync_every=sync_every))
        results.append([(r.output, r.steps) for r in engine.generate(prompts, gen, [1, 2, 3])])
    assert results[0] == results[1]
    assert any(s != [12, 12, 12] for _, s in results[0])  # rows stopped early, at different steps


def test_static_shape_forward_matches_dynamic():
    """The forward inside the CUDA graphs (every context slot, always masked) equals the exact-context one,
    padding rows included."""
    from dgemma.engine.forward import denoise, masked_inputs
    from dgemma.engine.weights import pack_weights

    model = perturbed_model(seed=9, sliding_window=12, canvas_length=8)
    cache = StaticKVCache(model.config, 4, 128, "cpu", torch.float32)
    g = torch.Generator().manual_seed(3)
    for row, n in enumerate([5, 30, 11]):
        encode_row(model, cache, row, torch.randint(3, model.config.vocab_size, (1, n), generator=g))
    canvas = torch.randint(0, model.config.vocab_size, (3, 8), generator=g)
    soft = model.soft_embed(torch.randn(3, 8, model.config.vocab_size, generator=g))
    dynamic = denoise_rows(model, cache, canvas, soft)
    padded_canvas = torch.cat([canvas, torch.zeros(1, 8, dtype=torch.long)])
    padded_soft = torch.cat([soft, torch.zeros(1, 8, soft.shape[-1])])
    inputs = masked_inputs(cache, torch.tensor([5, 30, 11, 0]), torch.arange(8 + cache.max_context))
    static = denoise(model, pack_weights(model), cache, padded_canvas, padded_soft, inputs)
    torch.testing.assert_close(static[:3], dynamic, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, EngineConfig(max_batch=2, max_context=64, cuda_graphs=True))


def test_whole_step_graph_body_generates_as_the_eager_engine():
    """`StepGraphs` with capture=False runs the body the CUDA graphs record (forward over every context slot,
    sampler, state update, per batch bucket with padding rows): same steps and tokens as the eager engine,
    with requests of different lengths joining and leaving (batch 3 -> bucket 4, then 2, then 1)."""
    from dgemma.engine.graphs import GraphRunner

    model = perturbed_model(seed=12, sliding_window=12, canvas_length=8)
    prompts = [[2, 5, 6], [2, 9], [2, 7, 7, 7, 3], [2, 4]]
    lengths = [30, 9, 17, 12]

    def run(graphs: bool):
        engine = Engine(model, EngineConfig(max_batch=4, max_context=128))
        if graphs:
            engine.runner = GraphRunner(engine, capture=False)
        requests = [engine.submit(GenerationRequest(prompt=p, seed=i, gen=GenerationConfig(
            max_new_tokens=n, max_denoising_steps=3, eos_token_ids=()))) for i, (p, n) in enumerate(zip(
                prompts[:3], lengths, strict=False))]
        engine.step()
        requests.append(engine.submit(GenerationRequest(prompt=prompts[3], gen=GenerationConfig(
            max_new_tokens=lengths[3], max_denoising_steps=3, eos_token_ids=()), seed=3)))
        while engine.has_work():
            engine.step()
        return requests

    for eager, graph in zip(run(False), run(True), strict=True):
        assert eager.steps == graph.steps and len(eager.output) == len(graph.output)
        # every context slot masked instead of the exact context: equal up to rare near-ties
        assert sum(x == y for x, y in zip(eager.output, graph.output, strict=True)) >= 0.95 * len(eager.output)


def test_packed_weights_leave_the_model_as_it_is_and_follow_its_changes(tmp_path):
    """The engine's packed weights (CPU: input-major copies, MKL packs, the folded FFN input) never touch the
    model's parameters (same objects, same storage, same checkpoint); they notice in-place updates (every folded
    vector included), replaced parameters and dtype changes, and an engine re-packs before admitting requests."""
    from dgemma.engine.forward import encode_canvas  # noqa: F401 - the packed products are used by both passes
    from dgemma.engine.weights import pack_weights
    from dgemma.model.loading import save_model

    model = perturbed_model(seed=11)
    params = {k: (p, p.data_ptr(), p.is_contiguous()) for k, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    w = pack_weights(model)
    attn = model.stack.layers[0].self_attn
    assert w.packed and w.layers[0].qkv.weight.data_ptr() != attn.q_proj.weight.data_ptr()
    assert not w.layers[0].qkv.weight.is_contiguous()  # input-major on CPU
    assert all(p is params[k][0] and p.data_ptr() == params[k][1] and p.is_contiguous() == params[k][2]
               for k, p in model.named_parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    save_model(model, tmp_path / "ckpt")
    reloaded, _ = load_model(tmp_path / "ckpt")
    assert all(torch.equal(before[k], v) for k, v in reloaded.state_dict().items())
    assert w.valid(model) and w.layers[0].qkv.mkl is not None  # fp32 CPU (MKL): packed copies too
    with torch.no_grad():
        model.stack.layers[1].mlp.up_proj.weight.mul_(2.0)
    assert not w.valid(model)
    w = pack_weights(model)
    assert all(lw.ffn_in is not None for lw in w.layers)  # the FFN input products in one GEMM
    for vector in ("pre_feedforward_layernorm.weight", "pre_feedforward_layernorm_2.weight", "router.scale"):
        with torch.no_grad():
            model.stack.layers[0].get_parameter(vector).mul_(1.5)
        assert not w.valid(model)
        w = pack_weights(model)
    engine = Engine(model, EngineConfig(max_batch=1, max_context=64))
    mlp = model.stack.layers[0].mlp
    mlp.gate_proj.weight = torch.nn.Parameter(mlp.gate_proj.weight.detach() * -1.0)  # replaced
    engine.submit(GenerationRequest(prompt=[2, 7], gen=GenerationConfig(max_new_tokens=4, max_denoising_steps=1)))
    engine.step()
    assert engine.weights.valid(model)  # re-packed on admission
    w = pack_weights(model)
    fast_cache = StaticKVCache(model.config, 1, 64, "cpu", torch.float32)  # the fast forward sees the updates
    encode_row(model, fast_cache, 0, torch.tensor([[2, 7, 9, 4]]), w)
    ref_cache = model.new_cache()
    model.encode(torch.tensor([[2, 7, 9, 4]]), ref_cache)
    canvas = torch.randint(0, model.config.vocab_size, (1, model.config.canvas_length))
    no_signal = torch.zeros(1, canvas.shape[1], model.config.hidden_size)  # a canvas's first step
    fast = model.logits(denoise_rows(model, fast_cache, canvas, no_signal, w))
    torch.testing.assert_close(fast, model.denoise(canvas, ref_cache), atol=1e-5, rtol=1e-5)
    model.double()
    assert not w.valid(model) and pack_weights(model).layers[0].qkv.weight.dtype == torch.float64
    model.float()
    with torch.inference_mode():  # packed inside an engine step: ordinary tensors, parameters untouched
        w = pack_weights(model)
    assert not w.layers[0].qkv.weight.is_inference()
    assert not model.stack.layers[0].self_attn.q_proj.weight.is_inference()


@pytest.mark.parametrize("window,canvas,prompt", [(12, 8, 5), (6, 8, 3), (12, 8, 30), (200, 16, 40)])
def test_canvas_commit_pass_matches_encode_row(window, canvas, prompt):
    """`encode_canvas` (the compiled engine's commit pass: new K/V in the canvas slots, a causal mask over
    them, then copied into context slots / the ring) writes the cache `encode_row` writes; windows both
    wider and narrower than the canvas, rings filled and wrapping."""
    from dgemma.engine.forward import encode_canvas
    from dgemma.engine.weights import pack_weights

    model = perturbed_model(sliding_window=window, canvas_length=canvas)
    fw = pack_weights(model)
    caches = [StaticKVCache(model.config, 2, 256, "cpu", torch.float32) for _ in range(2)]
    g = torch.Generator().manual_seed(window)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=g)
    for cache in caches:
        encode_row(model, cache, 1, ids)
    for _ in range(3):
        ids = torch.randint(3, model.config.vocab_size, (1, canvas), generator=g)
        encode_row(model, caches[0], 1, ids)
        b = caches[1]
        n = b.lengths[1]
        encode_canvas(model, fw, [k[1:2] for k in b.keys], [v[1:2] for v in b.values], b.ring_pos[1:2], ids,
                      torch.arange(canvas + n))
        b.lengths[1] = n + canvas
    a, b = caches
    assert a.lengths == b.lengths and torch.equal(a.ring_pos, b.ring_pos)
    for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True):  # context slots (after the canvas's)
        torch.testing.assert_close(x[:, :, canvas:], y[:, :, canvas:], atol=2e-5, rtol=2e-5)


def test_rng_hash_matches_plain_integer_arithmetic():
    """The int64 tensor hash equals the same 32-bit mixer in Python integers: no step overflows (compiled
    code would be free to miscompute an overflow)."""
    def mix(x):
        x ^= x >> 16
        x = (x * 0x21F0AAAD) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x735A2D97) & 0xFFFFFFFF
        return x ^ (x >> 15)

    g = torch.Generator().manual_seed(0)
    xs = torch.cat([torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64),
                    torch.tensor([0, 1, 2**31, 2**32 - 1])])
    assert rng.hash32(xs).tolist() == [mix(x) for x in xs.tolist()]
    u = rng.uniform(torch.tensor([-5, 2**40]), torch.tensor([3, 0]), torch.tensor([7, 1]), 64, 1)
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    args = (torch.tensor([3, 9]), torch.tensor([1, 4]), torch.tensor([2, 2]), 32)
    both = rng.uniform_and_randint(*args, 1, 2, 1000)
    assert torch.equal(both[0], rng.uniform(*args, 1)) and torch.equal(both[1], rng.randint(*args, 2, 1000))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_runner_bf16_error_is_the_reference_own_bf16_error(seed):
    """bf16 weights: the fast forward (packed GEMMs, dense experts) loses no more against the fp32 computation
    of the same (bf16-rounded) weights than the reference loop itself loses in bf16. Portable: GEMM rounding
    differs between instruction sets (AVX2, AVX-512, AMX), but it moves both errors alike.

    k = 1.5 on the RMS error (2 on the max): both paths round weights and activations to bf16 at comparable
    places and differ in accumulation order and fusion; a real fault (a norm, scale or weight layout wrong) is
    an error of the order of the logits themselves, tens of times the bf16 error."""
    cfg = preset_config("tiny", canvas_length=16)
    model = random_model(cfg, seed=seed, dtype=torch.bfloat16)
    exact = random_model(cfg, seed=seed, dtype=torch.float32)
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, cfg.vocab_size, (1, 40), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, 16), generator=g)
    sc = torch.randn(1, 16, cfg.vocab_size, generator=g)
    refs = {}
    for name, m in (("fp32", exact), ("bf16", model)):
        ref_cache = m.new_cache()
        m.encode(prompt, ref_cache)
        refs[name] = m.denoise(canvas, ref_cache, sc.to(m.dtype))
    cache = StaticKVCache(cfg, 1, 256, "cpu", torch.bfloat16)
    encode_row(model, cache, 0, prompt)
    fast = model.logits(denoise_rows(model, cache, canvas, model.soft_embed(sc.bfloat16())))
    ref_err, fast_err = refs["bf16"] - refs["fp32"], fast - refs["fp32"]
    assert fast_err.pow(2).mean().sqrt() <= 1.5 * ref_err.pow(2).mean().sqrt()
    assert fast_err.abs().max() <= 2 * ref_err.abs().max()
    top = refs["fp32"].argmax(-1)
    agree_ref, agree_fast = (refs["bf16"].argmax(-1) == top).sum(), (fast.argmax(-1) == top).sum()
    assert agree_fast >= agree_ref - 2  # of 16 positions


@pytest.mark.parametrize("compile_forms", [False, True])
def test_masked_forward_and_advance_match_the_eager_step(monkeypatch, compile_forms):
    """The body that --compile captures (always-masked forward + state update) equals the eager step's pieces,
    for rows with different contexts and unfilled sliding windows; `compile_forms`: with the exp-based tanh
    and GELU the body uses when traced for a CPU."""
    from dgemma.engine.forward import masked_inputs
    from dgemma.engine.step import masked_step, update_state

    model = perturbed_model(seed=12, sliding_window=12, canvas_length=8)
    gen = GenerationConfig(max_new_tokens=16, max_denoising_steps=4, eos_token_ids=())
    engine = Engine(model, EngineConfig(max_batch=3, max_context=128))
    for i, n in enumerate([3, 20, 9]):
        engine.submit(GenerationRequest(prompt=list(range(2, 2 + n)), gen=gen, seed=i))
    engine.step()  # admit, prefill, one step: a non-zero soft embedding and history
    b = len(engine.rows)
    state, settings = engine.views(b)
    w = engine.weights
    lengths = engine.cache.lengths[:b]
    hidden = denoise_rows(model, engine.cache, state.canvas, state.soft, w)
    eager = update_state(model, w, hidden, state, settings, 1024).tensors()
    body_state = state.clone()
    if compile_forms:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    masked_step(model, w, engine.cache, body_state, settings, torch.tensor(lengths), torch.arange(8 + max(lengths)),
                1024)
    monkeypatch.undo()
    assert masked_inputs(engine.cache, torch.tensor(lengths), torch.arange(8 + max(lengths))).full_mask is not None
    for key, value in body_state.tensors().items():
        if key in ("soft", "argmax_logprob"):  # floats: the traced forms round differently
            torch.testing.assert_close(value, eager[key], atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(value, eager[key]), key


def test_warm_up_leaves_an_idle_engine_that_generates_as_a_fresh_one():
    model = perturbed_model(seed=13)
    gen = GenerationConfig(max_new_tokens=20, max_denoising_steps=4, eos_token_ids=())
    warmed = Engine(model, EngineConfig(max_batch=2, max_context=128))
    warmed.warm_up()
    assert not warmed.has_work() and warmed.nfe == 0
    fresh = Engine(model, EngineConfig(max_batch=2, max_context=128))
    prompts = [[2, 5, 6], [2, 9]]
    assert ([r.output for r in warmed.generate(prompts, gen, [3, 4])]
            == [r.output for r in fresh.generate(prompts, gen, [3, 4])])


def test_compiled_tanh_and_gelu_forms_match_aten(monkeypatch):
    """The exp-based tanh (logit soft cap) and GELU that a CPU graph uses, against ATen's."""
    from dgemma.engine.ops import gelu_tanh
    from dgemma.engine.ops import tanh_ as _tanh

    x = torch.cat([torch.linspace(-60, 60, 24001), torch.tensor([0.0, -0.0, 1e-30, -1e-8, 3e-4, -88.0, 90.0])])
    want_tanh = torch.tanh(x)
    want_gelu = torch.nn.functional.gelu(x, approximate="tanh")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got_tanh = _tanh(x.clone())
    torch.testing.assert_close(got_tanh, want_tanh, atol=3e-7, rtol=0)
    assert torch.equal(_tanh(torch.tensor([float("inf"), float("-inf")])), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(gelu_tanh(x), want_gelu, atol=1e-6, rtol=1e-6)


def test_rank_based_acceptance_and_top_k_match_the_sorting_versions(monkeypatch):
    """The compiled step's sort-free acceptance and max-based expert choice against accept_mask (with a
    stable sort) and torch.topk: random entropies, zeros, ties across the bound, bounds 0 and large."""
    from dgemma.engine.ops import top_k as _top_k
    from dgemma.engine.sampler import accept_by_rank

    g = torch.Generator().manual_seed(3)
    h = torch.rand(64, 32, generator=g) * 0.05
    h[:8] = 0.0
    h[8:16, :6] = 0.02  # ties that straddle the bound
    h[16:24] = torch.round(h[16:24] * 100) / 100
    for bound in (0.0, 0.03, 0.1, 10.0):
        bounds = torch.full((64, 1), bound)
        sorted_h, order = torch.sort(h, dim=-1, stable=True)
        keep = torch.cumsum(sorted_h, -1) - sorted_h <= bounds
        want = torch.zeros_like(keep).scatter(-1, order, keep)
        assert torch.equal(accept_by_rank(h, bounds), want)
        assert torch.equal(accept_mask(h[:8], bound), want[:8])
    probs = torch.softmax(torch.randn(50, 6, generator=g), -1)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for k in (1, 2):
        w, i = _top_k(probs, k)
        tw, ti = torch.topk(probs, k, dim=-1)
        assert torch.equal(i, ti) and torch.equal(w, tw)


def test_mkl_packed_linear_matches_plain_linear():
    """`linear` through MKL's packed copy equals F.linear for any row count (it is packed for 32)."""
    from dgemma.engine.weights import linear
    from dgemma.engine.weights import mkl_pack as _mkl_pack

    if not torch.backends.mkl.is_available():
        pytest.skip("this torch build has no MKL")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 40, generator=g).T.contiguous().T  # input-major storage, as FastWeights keeps it
    packed = _mkl_pack(w)
    for shape in [(1, 40), (7, 40), (32, 40), (65, 40), (2, 32, 40)]:
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(linear(x, w, packed), torch.nn.functional.linear(x, w), atol=1e-5, rtol=1e-5)


def _poison(monkeypatch, seed):
    """A fault injected into the step of any batch that holds the request with this seed."""
    original = Engine._step_rows

    def step_rows(self, rows, *args, **kwargs):
        if any(r.request.seed == seed for r in rows):
            raise RuntimeError("injected fault")
        return original(self, rows, *args, **kwargs)

    monkeypatch.setattr(Engine, "_step_rows", step_rows)


def test_a_failing_row_fails_alone_and_the_others_are_unchanged(monkeypatch):
    model = perturbed_model(seed=21)
    gen = GenerationConfig(max_new_tokens=40, max_denoising_steps=4, eos_token_ids=())
    prompts, seeds = [[2, 5, 6], list(range(3, 30)), [2, 9], [4, 4, 4]], [11, 666, 13, 14]
    alone = {s: Engine(model, EngineConfig(max_batch=1, max_context=256)).generate([p], gen, [s])[0].output
             for p, s in zip(prompts, seeds, strict=True) if s != 666}
    _poison(monkeypatch, 666)
    told = []
    engine = Engine(model, EngineConfig(max_batch=3, max_context=256))
    reqs = [engine.submit(GenerationRequest(prompt=p, gen=gen, seed=s,
                                            on_tokens=lambda r, t: told.append((r.seed, r.done))))
            for p, s in zip(prompts, seeds, strict=True)]
    while engine.has_work():
        engine.step()
    for r in reqs:
        if r.seed == 666:
            assert r.finish_reason == "error" and "injected fault" in r.error and r.output == []
            assert (666, True) in told
        else:
            assert r.finish_reason == "length" and r.output == alone[r.seed]
    assert engine.rows == [] and not engine.waiting


def test_callback_and_prefill_failures_fail_their_request_only(monkeypatch):
    import dgemma.engine.engine as engine_module

    model = perturbed_model(seed=22)
    gen = GenerationConfig(max_new_tokens=40, max_denoising_steps=3, eos_token_ids=())
    ref = Engine(model, EngineConfig(max_batch=1, max_context=256)).generate([[2, 3]], gen, [5])[0].output

    def bad_callback(req, tokens):
        raise ValueError("client went away")

    original = engine_module.encode_row

    def encode_row(model, cache, row, ids, weights=None):
        if ids.shape[1] == 7:
            raise RuntimeError("prefill fault")
        return original(model, cache, row, ids, weights)

    monkeypatch.setattr(engine_module, "encode_row", encode_row)
    engine = Engine(model, EngineConfig(max_batch=3, max_context=256))
    good = engine.submit(GenerationRequest(prompt=[2, 3], gen=gen, seed=5))
    cb = engine.submit(GenerationRequest(prompt=[2, 4], gen=gen, seed=6, on_tokens=bad_callback))
    pre = engine.submit(GenerationRequest(prompt=[2] * 7, gen=gen, seed=7))
    while engine.has_work():
        engine.step()
    assert good.output == ref and good.finish_reason == "length"
    assert cb.finish_reason == "error" and "client went away" in cb.error
    assert pre.finish_reason == "error" and "prefill fault" in pre.error


@pytest.mark.parametrize("change,message", [
    (dict(seed=2**63), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(seed=True), "seed"),
    (dict(prompt=[]), "empty"), (dict(prompt=[1, 10**6]), "must lie in"), (dict(prompt=[1.5]), "integers"),
    (dict(prompt=list(range(3, 300))), "context slots"),
    (dict(gen=GenerationConfig(max_new_tokens=10**6, eos_token_ids=())), "positions"),
])
def test_bad_requests_are_refused_at_submit(change, message):
    from dgemma.config import ConfigError

    model = perturbed_model(seed=23)
    engine = Engine(model, EngineConfig(max_batch=2, max_context=256))
    kw = dict(prompt=[2, 3], gen=GenerationConfig(max_new_tokens=8, eos_token_ids=()), seed=1) | change
    with pytest.raises(ConfigError, match=message):
        engine.submit(GenerationRequest(**kw))
    assert not engine.waiting


def test_generation_settings_out_of_range_are_refused():
    from dgemma.config import ConfigError

    gen = GenerationConfig()
    for bad in (dict(entropy_bound=1e39), dict(entropy_bound=float("inf")), dict(confidence_threshold=1e308),
                dict(t_min=1e-40, t_max=2e-40), dict(t_max=1e39), dict(max_denoising_steps=0),
                dict(max_new_tokens=True), dict(stability_threshold=-1)):
        with pytest.raises(ConfigError):
            gen.replace(**bad)


def _forbid(ids):
    """A logits processor that rules out `ids` at every position."""
    def processor(x, start):
        x[:, ids] = float("-inf")
        return x
    return processor


def test_logits_processor_hook_is_the_same_in_both_samplers():
    """The per-position hook: the fused sampler with a processor equals the reference pieces with it (argmax,
    entropy, acceptance, soft embeddings, sampled tokens never ruled out), in one chunk or several; identity
    changes nothing."""
    from dgemma.sampler.entropy_bound import apply_processor

    model = perturbed_model()
    embed = model.stack.embed_tokens.weight
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 32, 64, generator=g) * 2
    temps, u = torch.tensor([0.8, 0.45]), torch.rand(2, 32, generator=g)
    processed = model.logits(hidden) / temps[:, None, None]
    banned = processed.argmax(-1).flatten().unique()[:5].tolist()  # the likeliest tokens: a real change
    for processor in (None, lambda x, start: x, _forbid(banned)):
        for chunk in (24, 4096):
            out = fused_sample(hidden, Linear(embed), Linear(embed.T), model.config.embed_scale, 30.0, temps, u,
                               chunk, processor)
            ref = apply_processor(processed.clone(), processor)
            assert torch.equal(out.argmax_canvas, ref.argmax(-1))
            torch.testing.assert_close(out.entropy, token_entropy(ref), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.soft_embeds, model.soft_embed(ref), atol=1e-5, rtol=1e-5)
            assert torch.equal(accept_mask(out.entropy, 0.1), accept_mask(token_entropy(ref), 0.1))
            if processor is not None and processor(torch.zeros(1, 512), 0).isinf().any():
                assert not torch.isin(out.sampled, torch.tensor(banned)).any()
    assert not torch.equal(fused_sample(hidden, Linear(embed), Linear(embed.T), model.config.embed_scale, 30.0,
                                        temps, u, 4096, _forbid(banned)).argmax_canvas, processed.argmax(-1))


def test_reference_sampler_hook_identity_keeps_parity_and_masks_hold(hf_checkpoint):
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    gen = GenerationConfig(max_new_tokens=32, max_denoising_steps=4, eos_token_ids=(1,))
    prompt = torch.tensor([[2, 30, 31]])
    torch.manual_seed(5)
    plain = generate(model, prompt, gen)
    torch.manual_seed(5)
    same = generate(model, prompt, gen, processor=lambda x, start: x)
    assert same.token_ids == plain.token_ids and same.steps == plain.steps
    banned = list(range(100, 300))
    torch.manual_seed(5)
    masked = generate(model, prompt, gen, processor=_forbid(banned))
    assert not set(masked.sequences[0, 3:].tolist()) & set(banned)


def test_encoder_takes_input_embeddings(hf_checkpoint):
    """The input-embeddings path (where image embeddings go): embeddings of ids give the ids' cache and hidden
    states, in the reference model and in the engine's prefill."""
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    a, b = model.new_cache(), model.new_cache()
    ha = model.encode(ids, a, return_hidden=True)
    hb = model.encode(None, b, return_hidden=True, inputs_embeds=model.stack.embed(ids))
    assert torch.equal(ha, hb) and a.length == b.length == 5
    assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True))
    caches = [StaticKVCache(model.config, 1, 64, "cpu", torch.float32) for _ in range(2)]
    encode_row(model, caches[0], 0, ids)
    encode_row(model, caches[1], 0, embeds=model.stack.embed(ids))
    assert caches[0].lengths == caches[1].lengths == [5, 0][:1]
    assert all(torch.equal(x, y) for x, y in zip(caches[0].keys, caches[1].keys, strict=True))


@pytest.mark.parametrize("stop_at_end", [False, True])
def test_stop_at_end_matches_reference_and_ignores_padding(hf_checkpoint, monkeypatch, stop_at_end):
    """The answer (5 tokens and EOS) settles at call 2 while the padding after it keeps changing until call 8: with
    stop_at_end both samplers stop as soon as the answer is stable; without, when the whole canvas is."""
    import dgemma.engine.step as step_module

    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    c, weight = model.config.canvas_length, model.stack.embed_tokens.weight
    calls = {"ref": 0, "fast": 0}

    def hidden(kind):
        calls[kind] += 1
        n = calls[kind]
        t = (torch.arange(c) * 5 + 9 + 13 * min(n, 8)) % 300 + 20  # padding: changes until call 8
        t[:5] = torch.arange(5) + 40 + 11 * min(n, 2)  # the answer: settles at call 2
        t[5] = 1  # EOS
        return 100.0 * weight[t] / weight[t].norm(dim=-1, keepdim=True)

    monkeypatch.setattr(model, "denoise", lambda canvas, cache, sc=None: model.logits(hidden("ref")[None]))
    monkeypatch.setattr(step_module, "denoise", lambda m, w, cache, canvas, soft, inputs: hidden("fast")[None])
    gen = GenerationConfig(max_new_tokens=c, max_denoising_steps=12, eos_token_ids=(1,), stop_at_end=stop_at_end)
    torch.manual_seed(0)
    ref = generate(model, torch.tensor([[2, 9]]), gen)
    fast = Engine(model, EngineConfig(max_batch=1, max_context=64)).generate([[2, 9]], gen, [1])[0]
    assert fast.steps == ref.steps[0] == ([3] if stop_at_end else [9])
    assert fast.output == ref.token_ids[0] and fast.finish_reason == "stop"
