"""Fused head + sampler: from final hidden states to the next canvas in a few passes per chunk of positions.

For each chunk of (row, position) pairs: logits = cap * tanh((h @ E^T) / cap) / temperature, then one max
(which is also the argmax), one exp, one sum, the entropy from the same tensors, an inverse-CDF sample, and
the self-conditioning soft embedding softmax @ E for the next step. The argmax's log-probability comes free:
log p(argmax) = -log sum exp(x - max) (what `logprobs` report and prefix locking reads as confidence). Only one
chunk of vocabulary-sized
tensors exists at a time (`chunk` positions x V), so transient memory stays small even at V = 262,144.

It draws from the same distribution as the reference (softmax of the processed logits) but with the
engine's counter-based uniforms instead of `torch.multinomial`; acceptance and stopping are the reference
functions. A `LogitsProcessor` (the per-position hook shared with the reference sampler: grammar masks,
top-k/top-p) edits the processed logits of each chunk before anything is drawn from them. tests/test_engine.py
checks argmax/entropy/acceptance against the reference (with and without a processor) and the sample
frequencies against the distribution. Shapes: B rows, C canvas_length, V vocab, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dgemma.engine.ops import tanh_
from dgemma.engine.weights import Linear
from dgemma.sampler.entropy_bound import LogitsProcessor


@dataclass
class StepOutput:
    sampled: torch.Tensor  # (B, C) long
    argmax_canvas: torch.Tensor  # (B, C) long
    entropy: torch.Tensor  # (B, C) fp32, of the processed distribution
    argmax_logprob: torch.Tensor  # (B, C) fp32: log p of the argmax under the processed distribution (-log sum e)
    soft_embeds: torch.Tensor  # (B, C, H) model dtype: softmax(processed) @ E * embed_scale


@torch.no_grad()
def fused_sample(hidden: torch.Tensor, head: Linear, soft: Linear, embed_scale: float, softcap: float | None,
                 temperature: torch.Tensor, uniforms: torch.Tensor, chunk: int = 1024,
                 processor: LogitsProcessor | None = None) -> StepOutput:
    """hidden (B, C, H) final-normed; `head` the logits product h @ E^T and `soft` the product probs @ E of the tied
    embedding E (`ModelWeights.head` / `.soft`); `embed_scale` as a number of the weight dtype
    (`TextStack.embed_scale` cast to it); temperature (B,) fp32; uniforms (B, C) in [0, 1); `processor` edits the
    processed logits of flat positions [start, start + n) of (B, C) in row-major order."""
    b, c, h = hidden.shape
    n = b * c
    flat = hidden.reshape(n, h)
    temps = temperature.to(torch.float32).repeat_interleave(c)
    u = uniforms.reshape(-1).to(torch.float32)
    if n <= chunk:  # one pass, no slicing (and no Python loop for torch.compile to unroll)
        parts = _sample_chunk(flat, head, soft, embed_scale, softcap, temps, u, processor, 0)
        return StepOutput(*(p.view(b, c, *p.shape[1:]) for p in parts))
    pieces = [_sample_chunk(flat[i:i + chunk], head, soft, embed_scale, softcap, temps[i:i + chunk], u[i:i + chunk],
                            processor, i) for i in range(0, n, chunk)]
    return StepOutput(*(torch.cat(p).view(b, c, *p[0].shape[1:]) for p in zip(*pieces, strict=True)))


def _sample_chunk(hidden: torch.Tensor, head: Linear, soft: Linear, scale: float, softcap: float | None,
                  temps: torch.Tensor, u: torch.Tensor, processor: LogitsProcessor | None, start: int):
    """hidden (n, H) -> sampled, argmax, entropy, argmax log-probability (n,) and soft embeddings (n, H)."""
    if softcap:  # cap * tanh((h @ E^T) / cap) / T; in fp32 the 1 / cap is folded into the (n x H) input
        if hidden.dtype == torch.float32:
            x = tanh_(head(hidden * (1.0 / softcap)))
        else:
            x = tanh_(head(hidden).float().mul_(1.0 / softcap))
        x.mul_((softcap / temps)[:, None])
    else:
        x = head(hidden).float().mul_((1.0 / temps)[:, None])
    if processor is not None:
        x = processor(x, start)
    m, am = _max_argmax(x)
    y = x.sub_(m[:, None])  # processed logits - max (<= 0)
    e = torch.exp(y)
    s = e.sum(dim=-1)
    # H = -sum p log p = log s - sum(e * y) / s, with p = e / s and log p = y - log s; a position the processor
    # ruled out has e = 0 and contributes 0 (e * y is 0 * -inf there: taken as 0)
    ey = e * y if processor is None else torch.where(e > 0, e * y, 0.0)
    log_s = torch.log(s)
    entropy = log_s - ey.sum(dim=-1) / s
    sampled = _inverse_cdf(e, u * s)
    # self-conditioning input: softmax @ E, normalised after the (much smaller) matmul
    weight_dtype = soft.weight.dtype
    product = soft(e.to(weight_dtype))
    emb = (product.float() * (scale / s)[:, None]).to(weight_dtype)
    return sampled, am, entropy, -log_s, emb


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


def accept_by_rank(entropy: torch.Tensor, entropy_bound: torch.Tensor) -> torch.Tensor:
    """`accept_mask` without a sort, for compiled graphs (a sort is a separate library call there, ~35 us
    on CPU): position i is accepted when the entropies ranked before it in a stable ascending sort
    (smaller, or equal at a lower index) sum to at most the bound. (B, C) -> (B, C) bool, from C x C
    comparisons per row. The sum runs in another order than the reference's cumsum - H, so a position
    within a rounding error of the bound may go the other way."""
    c = entropy.shape[-1]
    idx = torch.arange(c, device=entropy.device)
    h_i, h_j = entropy[..., :, None], entropy[..., None, :]
    before = (h_j < h_i) | ((h_j == h_i) & (idx[None, :] < idx[:, None]))
    return torch.where(before, h_j, 0.0).sum(-1) <= entropy_bound
