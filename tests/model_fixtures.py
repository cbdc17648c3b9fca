"""Random models for the engine and sampler tests, the same whatever ran before them."""

import torch

from dgemma.model.init import preset_config, random_model


def perturbed_model(seed: int = 0, scale: float = 0.05, **config_kw):
    """The tiny preset's random init plus seeded noise on every weight (the init's norm weights and equal layer
    scalars make many weights interchangeable; the noise makes each one matter). The noise has its own generator:
    drawing it from torch's global one made the weights depend on the tests that ran earlier, and the
    exact-token tests then met a different near-tie in each order."""
    model = random_model(preset_config("tiny", **config_kw), seed=seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model
