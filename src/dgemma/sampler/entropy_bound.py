"""The rules of the entropy-bounded sampler (reference notes section 2.2), one home for each, used by the
reference sampler (the oracle) and by the engine alike.

Each function does what transformers 5.24 does, with the same ops, so that given the same logits and the same
random draws the results are bit-identical (tests/test_sampler.py injects logits):
- `temperature`: the schedule t_min + (t_max - t_min) * (step / N), with `step` the steps remaining (N at a
  canvas's first step, 1 at its last), in fp32 from an int32 step as transformers does;
- `token_entropy`: entropy of softmax(processed logits) per position;
- `accept_mask`: keep the k lowest-entropy positions with sum(H_1..H_k) - max(H_1..H_k) <= bound
  (at least one position is always accepted);
- `stable_and_confident`: argmax unchanged for `stability_threshold` steps and mean entropy below the
  confidence threshold; with `stop_at_end` (dgemma's option, off for transformers' rule) over the answer
  positions only (`answer_positions`: through the first end id), so a short answer need not wait for its
  padding to settle;
- `trim_generated`: the public answer, at most `max_new_tokens` ids ending before the first end id.
`LogitsProcessor` is the per-position hook both samplers apply to the processed logits before anything is
drawn from them (identity when absent): where grammar masks and top-k/top-p go.

Shapes: B batch, C canvas_length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# processor(logits (n, V) fp32, start) -> logits: the processed logits of flat (row-major over (B, C)) positions
# start..start+n-1, edited in place or replaced; every position must keep at least one finite logit
LogitsProcessor = Callable[[torch.Tensor, int], torch.Tensor]


def temperature(step, max_steps, t_min, t_max, device: torch.device | None = None):
    """The temperature at `step` remaining steps of `max_steps`. Numbers give a number; with `device`, an int
    `step` is made an int32 tensor there (the reference sampler's 0-dim fp32 temperature, as transformers); the
    engine passes per-row tensors (B,) for all four."""
    if device is not None:
        step = torch.tensor(step, device=device, dtype=torch.int32)
    return t_min + ((t_max - t_min) * (step / max_steps))


def token_entropy(processed_logits: torch.Tensor) -> torch.Tensor:
    """(B, C, V) -> (B, C) entropy of softmax(processed_logits)."""
    return torch.distributions.Categorical(logits=processed_logits).entropy()


def accept_mask(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """(B, C) entropies -> (B, C) bool: the accepted positions."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound
    return torch.scatter(torch.zeros_like(keep_sorted), dim=-1, index=order, src=keep_sorted)


def stable_and_confident(history: torch.Tensor | None, argmax_canvas: torch.Tensor, entropy: torch.Tensor,
                         stability_threshold: int, confidence_threshold: float,
                         answer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stopping test for one step. `history` (stability_threshold, B, C) holds the last argmax
    canvases (starts at -1); returns (stop (B,) bool, updated history). `answer` (B, C) bool: the positions
    the test looks at (`answer_positions`; default all, transformers' rule)."""
    if stability_threshold == 0:
        stable = torch.ones(argmax_canvas.shape[0], device=argmax_canvas.device, dtype=torch.bool)
    else:
        if history is None:
            history = torch.full((stability_threshold, *argmax_canvas.shape), -1, dtype=argmax_canvas.dtype,
                                 device=argmax_canvas.device)
        same = history == argmax_canvas[None]
        if answer is not None:
            same = same | ~answer[None]
        stable = same.all(dim=-1).all(dim=0)
        history = torch.roll(history, shifts=-1, dims=0)
        history[-1] = argmax_canvas
    if answer is None:
        confident = entropy.mean(dim=-1) < confidence_threshold
    else:
        confident = (entropy * answer).sum(-1) / answer.sum(-1) < confidence_threshold
    return stable & confident, history


def answer_positions(argmax_canvas: torch.Tensor, end_ids: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: the positions up to and including the first end id of each argmax canvas (every position
    when it has none): what `stop_at_end` looks at. `end_ids` (B, K) per row, -1 for none."""
    is_end = (argmax_canvas[..., None] == end_ids[:, None, :]).any(-1)
    c = argmax_canvas.shape[-1]
    first = torch.where(is_end.any(-1), is_end.to(torch.int8).argmax(-1), c - 1)
    return torch.arange(c, device=argmax_canvas.device)[None] <= first[:, None]


def trim_generated(ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...]) -> tuple[list[int], str]:
    """The public answer: at most `max_new_tokens` ids, ending before the first end id; with the finish reason
    ("stop" at an end id, else "length")."""
    eos = set(eos_ids)
    for i, tok in enumerate(ids[:max_new_tokens]):
        if tok in eos:
            return ids[:i], "stop"
    return ids[:max_new_tokens], "length"


def apply_processor(processed: torch.Tensor, processor: LogitsProcessor | None) -> torch.Tensor:
    """`processor` applied to processed logits (B, C, V) as the fused sampler applies it (flat positions)."""
    if processor is None:
        return processed
    b, c, v = processed.shape
    return processor(processed.reshape(b * c, v), 0).view(b, c, v)
