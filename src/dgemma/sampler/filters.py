"""Top-k, top-p and min-p on the canvas: which tokens of each position's processed distribution are kept.

Applied to the processed logits (after the temperature and any grammar mask) before sampling, argmax, entropy and
the self-conditioning input, in the engine's fused sampler and in the reference sampler alike (both through the
`LogitsProcessor` hook), so the acceptance rule and the stopping test see the filtered distribution. Removed tokens
get -inf. With x the processed logits of one position and p = softmax(x), token v is kept when all three hold:
- top_k = k > 0: x_v >= t_k, the k-th largest logit (tokens tied with it are kept);
- top_p < 1: the mass of the tokens strictly more probable than v, among those top-k keeps, is below
  top_p times the mass top-k keeps;
- min_p > 0: p_v >= min_p * max(p).
Each keeps every token at least as probable as one it keeps, so the three are one threshold on x: applying them
in the order top-k, top-p on the renormalised remainder, min-p (transformers' warper order) gives the same set.
The most probable token is always kept, so the argmax never changes. Neutral values (0, 1, 0) change nothing.
tests/test_openai_sampling.py checks `filter_logits` against a brute-force reading of these three rules.

Shapes: n positions, V vocabulary; settings per position (n,).
"""

from __future__ import annotations

import torch

from dgemma.sampler.entropy_bound import LogitsProcessor

_ROWS = 64  # positions sorted at a time (a sort of n x V makes n x V values and indices)


def filter_logits(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """x (n, V) fp32 processed logits, edited in place (-inf where removed) and returned; top_k (n,) long (0: off),
    top_p (n,) fp32 in (0, 1] (1: off), min_p (n,) fp32 in [0, 1] (0: off)."""
    n, v = x.shape
    threshold = torch.full((n,), float("-inf"), dtype=x.dtype, device=x.device)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):  # sync: a host decision, outside the compiled step
        for lo in range(0, n, _ROWS):
            hi = min(n, lo + _ROWS)
            threshold[lo:hi] = _rank_threshold(x[lo:hi], top_k[lo:hi], top_p[lo:hi])
    best = x.amax(dim=-1)
    log_min_p = torch.where(min_p > 0, torch.log(min_p.clamp(min=1e-38)), float("-inf"))
    threshold = torch.maximum(threshold, best + log_min_p)
    return x.masked_fill_(x < threshold[:, None], float("-inf"))


def _rank_threshold(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(m, V) -> (m,): the smallest logit top-k and top-p keep at each position."""
    m, v = x.shape
    values, _ = torch.sort(x, dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=v), v)
    kth = values.gather(1, (k - 1)[:, None]).squeeze(1)
    kept = values >= kth[:, None]  # what top-k keeps, in sorted order
    probs = torch.softmax(values, dim=-1) * kept
    total = probs.sum(-1)
    # mass strictly above each sorted entry: the exclusive running sum at the first entry of its tie group
    above = torch.cumsum(probs, dim=-1) - probs
    index = torch.arange(v, device=x.device).expand(m, v)
    new_group = torch.ones_like(kept)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    first = torch.where(new_group, index, 0).cummax(dim=-1).values
    above = above.gather(1, first)
    nucleus = (above < top_p[:, None] * total[:, None]) | (top_p[:, None] >= 1)
    keep = kept & nucleus
    last = keep.sum(-1) - 1  # keep is a prefix of the sorted order (the first entry is always kept)
    return values.gather(1, last.clamp(min=0)[:, None]).squeeze(1)


def filter_processor(top_k: int, top_p: float, min_p: float) -> LogitsProcessor | None:
    """The filters with one setting for every position, as a `LogitsProcessor` (the reference sampler's); None when
    all three are neutral."""
    if top_k <= 0 and top_p >= 1.0 and min_p <= 0.0:
        return None

    def processor(x: torch.Tensor, start: int) -> torch.Tensor:
        n = x.shape[0]
        full = lambda value, dtype: torch.full((n,), value, dtype=dtype, device=x.device)
        return filter_logits(x, full(top_k, torch.long), full(top_p, torch.float32), full(min_p, torch.float32))

    return processor


def chain(*processors: LogitsProcessor | None) -> LogitsProcessor | None:
    """The processors applied in order (None ones skipped); None when there are none."""
    active = [p for p in processors if p is not None]
    if not active:
        return None
    if len(active) == 1:
        return active[0]

    def processor(x: torch.Tensor, start: int) -> torch.Tensor:
        for p in active:
            x = p(x, start)
        return x

    return processor
