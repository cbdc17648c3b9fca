"""Pure tensor functions of the entropy-bounded sampler (reference notes section 2.2).

Each function does what transformers 5.24 does, with the same ops, so that given the same logits and
the same random draws the results are bit-identical (tests/test_sampler.py injects logits):
- `temperature`: t_min + (t_max - t_min) * (step / N), evaluated in fp32 as a 0-dim tensor;
- `token_entropy`: entropy of softmax(processed logits) per position;
- `accept_mask`: keep the k lowest-entropy positions with sum(H_1..H_k) - max(H_1..H_k) <= bound
  (at least one position is always accepted);
- `stable_and_confident`: argmax unchanged for `stability_threshold` steps and mean entropy below the
  confidence threshold.

Shapes: B batch, C canvas_length, V vocab.
"""

from __future__ import annotations

import torch


def temperature(step: int, max_steps: int, t_min: float, t_max: float, device: torch.device) -> torch.Tensor:
    """Temperature at `step` remaining steps, as transformers computes it (int32 step / N in fp32)."""
    step_t = torch.tensor(step, device=device, dtype=torch.int32)
    return t_min + ((t_max - t_min) * (step_t / max_steps))


def token_entropy(processed_logits: torch.Tensor) -> torch.Tensor:
    """(B, C, V) -> (B, C) entropy of softmax(processed_logits)."""
    return torch.distributions.Categorical(logits=processed_logits).entropy()


def accept_mask(entropy: torch.Tensor, entropy_bound: float) -> torch.Tensor:
    """(B, C) entropies -> (B, C) bool: the accepted positions."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    keep_sorted = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= entropy_bound
    return torch.scatter(torch.zeros_like(keep_sorted), dim=-1, index=order, src=keep_sorted)


def stable_and_confident(history: torch.Tensor | None, argmax_canvas: torch.Tensor, entropy: torch.Tensor,
                         stability_threshold: int, confidence_threshold: float
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stopping test for one step. `history` (stability_threshold, B, C) holds the last argmax
    canvases (starts at -1); returns (stop (B,) bool, updated history)."""
    if stability_threshold == 0:
        stable = torch.ones(argmax_canvas.shape[0], device=argmax_canvas.device, dtype=torch.bool)
    else:
        if history is None:
            history = torch.full((stability_threshold, *argmax_canvas.shape), -1, dtype=argmax_canvas.dtype,
                                 device=argmax_canvas.device)
        stable = (history == argmax_canvas[None]).all(dim=-1).all(dim=0)
        history = torch.roll(history, shifts=-1, dims=0)
        history[-1] = argmax_canvas
    confident = entropy.mean(dim=-1) < confidence_threshold
    return stable & confident, history
