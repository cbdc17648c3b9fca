"""Whole generations: token-identical to transformers `generate()` for the same seed (CPU, fp32)."""

import pytest
import torch

from dgemma.config import GenerationConfig
from dgemma.model.loading import load_model, read_generation_config
from dgemma.sampler.entropy_bound import trim_generated
from dgemma.sampler.reference import generate


def _both(hf, ours, prompt, seed, gen: GenerationConfig, hf_wrap=None):
    kwargs = dict(max_new_tokens=gen.max_new_tokens, max_denoising_steps=gen.max_denoising_steps,
                  t_min=gen.t_min, t_max=gen.t_max, stability_threshold=gen.stability_threshold,
                  confidence_threshold=gen.confidence_threshold, eos_token_id=list(gen.eos_token_ids),
                  pad_token_id=gen.pad_token_id)
    torch.manual_seed(seed)
    ref = hf.generate(prompt, **kwargs)
    torch.manual_seed(seed)
    out = generate(ours, prompt, gen)
    return ref, out


@pytest.mark.parametrize("name", ["base", "wide_window", "deep"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokens_identical_to_transformers(hf_checkpoint, name, seed):
    hf, path = hf_checkpoint(name)
    ours, _ = load_model(path)
    gen = read_generation_config(path, ours.config).replace(max_new_tokens=40)
    prompt = torch.randint(3, ours.config.vocab_size, (1, 7 + 9 * seed), generator=torch.Generator().manual_seed(seed))
    ref, out = _both(hf, ours, prompt, seed, gen)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.tokens_per_forward == pytest.approx(ref.tokens_per_forward.tolist())
    assert all(n <= gen.max_denoising_steps for n in out.steps[0])
    assert torch.equal(out.sequences[:, : prompt.shape[1]], prompt)  # the prompt never changes


def test_batch_and_eos_padding_identical(hf_checkpoint):
    """Several rows, a frequent EOS (so rows finish at different canvases and get padded)."""
    hf, path = hf_checkpoint("base")
    ours, _ = load_model(path)
    gen = GenerationConfig(max_new_tokens=64, max_denoising_steps=6, eos_token_ids=(5, 9, 11), pad_token_id=0)
    prompt = torch.randint(3, ours.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(4))
    hits = 0
    for seed in range(4):
        ref, out = _both(hf, ours, prompt, seed, gen)
        assert torch.equal(out.sequences, ref.sequences)
        hits += out.finish_reasons.count("stop")
    assert hits > 0, "the test should exercise EOS handling"


class _Confident:
    """Wraps a denoiser so that it is sure of a fixed answer: the sampler stops after 2 steps."""

    def __init__(self, fn, target):
        self.fn, self.target = fn, target

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        boosted = logits + 40.0 * torch.nn.functional.one_hot(self.target, logits.shape[-1]).to(logits.dtype)
        if hasattr(out, "logits"):
            out.logits = boosted
            return out
        return boosted


def test_early_stop_identical(hf_checkpoint):
    hf, path = hf_checkpoint("base")
    ours, _ = load_model(path)
    length = ours.config.canvas_length
    target = (torch.arange(length) * 7 + 20)[None]
    gen = GenerationConfig(max_new_tokens=3 * length, max_denoising_steps=10, eos_token_ids=(1,), pad_token_id=0)
    prompt = torch.tensor([[2, 40, 41, 42]])
    original_hf = hf.forward
    try:
        hf.forward = _Confident(original_hf, target)
        ours.denoise = _Confident(ours.denoise, target)
        ref, out = _both(hf, ours, prompt, 3, gen)
    finally:
        hf.forward = original_hf
        del ours.denoise
    assert torch.equal(out.sequences, ref.sequences)
    assert out.steps == [[2, 2, 2]]  # stability needs two equal argmax canvases
    assert out.token_ids[0] == target[0].tolist() * 3


def test_public_answer_is_exact_length_and_stops_at_eos(hf_checkpoint):
    _, path = hf_checkpoint("base")
    ours, _ = load_model(path)
    gen = GenerationConfig(max_new_tokens=21, max_denoising_steps=4, eos_token_ids=(), pad_token_id=0)
    torch.manual_seed(0)
    out = generate(ours, torch.tensor([[2, 7, 8]]), gen)
    assert len(out.token_ids[0]) == 21 and out.finish_reasons == ["length"]
    assert out.sequences.shape[1] == 3 + 2 * ours.config.canvas_length  # whole canvases internally
    assert out.token_ids[0] == out.sequences[0, 3:24].tolist()  # the tokens before are unchanged
    assert trim_generated([4, 5, 1, 6], 10, (1,)) == ([4, 5], "stop")
    assert trim_generated([4, 5, 1, 6], 2, (1,)) == ([4, 5], "length")


def test_same_seed_same_tokens_and_bad_input(hf_checkpoint):
    _, path = hf_checkpoint("base")
    ours, _ = load_model(path)
    gen = GenerationConfig(max_new_tokens=16, max_denoising_steps=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(generate(ours, torch.tensor([[2, 3]]), gen).token_ids)
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="token ids must lie"):
        generate(ours, torch.tensor([[2, ours.config.vocab_size]]), gen)
    with pytest.raises(ValueError, match="non-empty"):
        generate(ours, torch.zeros(1, 0, dtype=torch.long), gen)
