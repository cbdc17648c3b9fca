"""Sampler pieces vs transformers' classes on injected logits (bit-identical)."""

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma.config import GenerationConfig
from dgemma.sampler.entropy_bound import accept_mask, stable_and_confident, temperature, token_entropy


@pytest.mark.parametrize("bound", [0.01, 0.1, 2.0, 1e9])
def test_accept_mask_matches_transformers(bound):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 24, 50, generator=gen) * torch.rand(3, 24, 1, generator=gen) * 8
    hf = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 24, 50, 10)
    canvas, sampled = torch.randint(0, 50, (3, 24)), torch.randint(0, 50, (3, 24))
    hf.accept_canvas(canvas, sampled, logits, 5)
    ours = accept_mask(token_entropy(logits), bound)
    assert torch.equal(ours, hf.accepted_token_mask)
    assert ours.any(-1).all()  # at least one position is always accepted
    if bound > 1e6:
        assert ours.all()


def test_temperature_matches_transformers():
    logits = torch.randn(2, 4, 9)
    for steps in (1, 7, 48):
        proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=steps)
        for step in range(steps, 0, -1):
            ref = proc(None, logits, torch.tensor(step, dtype=torch.int32))
            assert torch.equal(logits / temperature(step, steps, 0.4, 0.8, logits.device), ref)
    gen = GenerationConfig()
    assert temperature(48, 48, gen.t_min, gen.t_max) == pytest.approx(0.8)


@pytest.mark.parametrize("stability", [0, 1, 3])
def test_stopping_matches_transformers(stability):
    hf = StableAndConfidentStoppingCriteria(stability_threshold=stability, confidence_threshold=0.05)
    history = None
    gen = torch.Generator().manual_seed(stability)
    fixed = torch.randint(0, 30, (2, 6), generator=gen)
    for step in range(8):
        # row 0 becomes confident and stable after a few steps, row 1 never settles
        sharp = 50.0 if step > 2 else 1.0
        logits = torch.randn(2, 6, 30, generator=gen)
        logits[0] += sharp * torch.nn.functional.one_hot(fixed[0], 30)
        argmax = logits.argmax(-1)
        ref = hf(argmax, logits)
        ours, history = stable_and_confident(history, argmax, token_entropy(logits), stability, 0.05)
        assert torch.equal(ours, ref), step
    assert ours[0] and not ours[1]


def test_generation_config_validation():
    with pytest.raises(ValueError, match="t_max must be greater"):
        GenerationConfig(t_min=0.9, t_max=0.8)
    with pytest.raises(ValueError, match="max_denoising_steps"):
        GenerationConfig(max_denoising_steps=0)
    with pytest.raises(ValueError, match="entropy_bound"):
        GenerationConfig(entropy_bound=-1.0)
    with pytest.raises(ValueError, match="unknown generation settings"):
        GenerationConfig().replace(repetition_penalty=1.1)
    assert GenerationConfig().replace(t_min=None, max_new_tokens=7).max_new_tokens == 7
