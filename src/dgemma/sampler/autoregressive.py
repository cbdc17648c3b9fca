"""Autoregressive decoding with the same weights: the encoder is a causal language model.

Used as the baseline for "how much faster is diffusion decoding than one token per forward" and for the
quality comparison in docs/quality.md. Prefill once, then one `encode` call per token (K/V appended to
the cache); the next token is the argmax (temperature 0) or a sample from softmax(logits / temperature).
A `processor` (the samplers' `LogitsProcessor`, called with position index = tokens so far) edits each step's
logits: where structured-output masks go for the autoregressive baseline (bench/structured_eval.py).
"""

from __future__ import annotations

import torch

from dgemma.model.modeling import DiffusionGemma
from dgemma.sampler.entropy_bound import LogitsProcessor


@torch.no_grad()
def generate_autoregressive(model: DiffusionGemma, input_ids: torch.Tensor, max_new_tokens: int,
                            temperature: float = 0.0, eos_token_ids: tuple[int, ...] = (),
                            generator: torch.Generator | None = None, processor: LogitsProcessor | None = None,
                            on_token=None) -> list[int]:
    """Decode up to `max_new_tokens` tokens for one prompt (1, S); stops before the first EOS."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError("autoregressive decoding takes one prompt of shape (1, length)")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    cache = model.new_cache()
    hidden = model.encode(input_ids.to(model.device), cache, return_hidden=True)
    out: list[int] = []
    eos = set(eos_token_ids)
    for i in range(max_new_tokens):
        logits = model.logits(hidden[:, -1])  # (1, V)
        if processor is not None:
            logits = processor(logits, i)
        if temperature == 0:
            token = int(logits.argmax(-1))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if on_token is not None:
            on_token(token)  # e.g. a grammar matcher consuming it
        if token in eos:
            break
        out.append(token)
        hidden = model.encode(torch.tensor([[token]], device=model.device), cache, return_hidden=True)
    return out
