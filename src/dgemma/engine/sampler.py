"""Fused head + sampler: from final hidden states to the next canvas in a few passes per chunk of positions.

For each chunk of (row, position) pairs: logits = cap * tanh((h @ E^T) / cap) / temperature, then one max
(which is also the argmax), one exp, one sum, the entropy from the same tensors, an inverse-CDF sample, and
the self-conditioning soft embedding softmax @ E for the next step. Only one chunk of vocabulary-sized
tensors exists at a time (`chunk` positions x V), so transient memory stays small even at V = 262,144.

It draws from the same distribution as the reference (softmax of the processed logits) but with the
engine's counter-based uniforms instead of `torch.multinomial`; acceptance and stopping are the reference
functions. tests/test_engine.py checks argmax/entropy/acceptance against the reference and the sample
frequencies against the distribution. Shapes: B rows, C canvas_length, V vocab, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    sampled: torch.Tensor  # (B, C) long
    argmax: torch.Tensor  # (B, C) long
    entropy: torch.Tensor  # (B, C) fp32, of the processed distribution
    soft_embeds: torch.Tensor  # (B, C, H) model dtype: softmax(processed) @ E * embed_scale


@torch.no_grad()
def fused_sample(hidden: torch.Tensor, weight: torch.Tensor, embed_scale: float, softcap: float | None,
                 temperature: torch.Tensor, uniforms: torch.Tensor, chunk: int = 1024) -> StepOutput:
    """hidden (B, C, H) final-normed; weight (V, H) the tied embedding; temperature (B,) fp32;
    uniforms (B, C) in [0, 1)."""
    b, c, h = hidden.shape
    flat = hidden.reshape(b * c, h)
    temps = temperature.to(torch.float32).repeat_interleave(c)
    u = uniforms.reshape(-1)
    n = b * c
    sampled = torch.empty(n, dtype=torch.long, device=hidden.device)
    argmax = torch.empty(n, dtype=torch.long, device=hidden.device)
    entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
    soft = torch.empty(n, h, dtype=weight.dtype, device=hidden.device)
    scale = torch.tensor(embed_scale, dtype=torch.float32).to(weight.dtype).item()
    inv_cap = 1.0 / softcap if softcap else None
    row_scale = (softcap / temps) if softcap else (1.0 / temps)  # cap * tanh(l / cap) / T in one multiply
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        x = (flat[start:end] @ weight.T).float()
        if softcap:
            torch.tanh_(x.mul_(inv_cap))
        x.mul_(row_scale[start:end, None])
        m, am = _max_argmax(x)
        y = x.sub_(m[:, None])  # processed logits - max (<= 0)
        e = torch.exp(y)
        s = e.sum(dim=-1)
        # H = -sum p log p = log s - sum(e * y) / s, with p = e / s and log p = y - log s
        entropy[start:end] = torch.log(s) - (e * y).sum(dim=-1) / s
        argmax[start:end] = am
        sampled[start:end] = _inverse_cdf(e, u[start:end].to(torch.float32) * s)
        # self-conditioning input: softmax @ E, normalised after the (much smaller) matmul
        soft[start:end] = ((e.to(weight.dtype) @ weight).float() * (scale / s)[:, None]).to(weight.dtype)
    return StepOutput(sampled.view(b, c), argmax.view(b, c), entropy.view(b, c), soft.view(b, c, h))


def _inverse_cdf(weights: torch.Tensor, targets: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Smallest index i with cumsum(weights)[i] > target, per row, for unnormalised weights (n, V) and
    targets (n,) in [0, row sum). Two levels (block sums, then one block) instead of a full cumsum."""
    n, v = weights.shape
    if v <= block or v % block:
        cdf = torch.cumsum(weights, dim=-1)
        return torch.searchsorted(cdf, targets[:, None], right=True).squeeze(-1).clamp_(max=v - 1)
    sums = weights.view(n, v // block, block).sum(-1)
    csum = torch.cumsum(sums, dim=-1)
    blk = torch.searchsorted(csum, targets[:, None], right=True).squeeze(-1).clamp_(max=v // block - 1)
    before = torch.where(blk > 0, csum.gather(1, (blk - 1).clamp(min=0)[:, None]).squeeze(-1),
                         torch.zeros_like(targets))
    inner = weights.view(n, v // block, block).gather(1, blk[:, None, None].expand(n, 1, block)).squeeze(1)
    idx = torch.searchsorted(torch.cumsum(inner, dim=-1), (targets - before)[:, None], right=True).squeeze(-1)
    return blk * block + idx.clamp_(max=block - 1)


def _max_argmax(x: torch.Tensor, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and first index of the max of (n, V), via block maxima (a vectorised reduction) and one
    block: same result as `x.max(-1)` (first index on ties), several times faster on CPU."""
    n, v = x.shape
    if v <= block or v % block:
        return x.max(dim=-1)
    blocks = x.view(n, v // block, block)
    block_max = torch.amax(blocks, dim=-1)  # (n, V / block)
    m, blk = block_max.max(dim=-1)
    inner = blocks.gather(1, blk[:, None, None].expand(n, 1, block)).squeeze(1)
    return m, blk * block + inner.argmax(dim=-1)
