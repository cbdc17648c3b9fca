"""Per-position logits processing for the entropy-bounded sampler (Tier 1, "draft-path masking").

At each denoising step the masks are computed along the previous step's `argmax_canvas`, starting
from the matcher state after everything committed, and applied to that step's processed logits
before sampling, argmax and entropy. A canvas that stops because its argmax is stable is then valid:
if argmax(t) == argmax(t-1) = a, every a[k] was allowed by row k of the masks built along a
(tests/test_constrain_stable.py runs the real entropy-bound loop with a fake denoiser to check it).

First step of a canvas (no previous argmax): the masks follow the tokens the grammar forces from
the committed state (`Matcher.forced_tokens`, e.g. `{"name":"` for an object schema), so row 0 and
every forced position are constrained exactly; the rows after them are free (unknown state). The
model's own first-step argmax is unknown before the forward, and masks must be ready when it ends.

Shapes: C canvas_length, V vocabulary, W = ceil(V / 32).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dgemma.constrain import bitmask
from dgemma.constrain.backend import Matcher


def apply_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Set disallowed entries to -inf, in place: logits (..., C, V) float, masks (C, V) bool. Returns logits."""
    return logits.masked_fill_(~masks, float("-inf"))


def apply_bitmask(logits: torch.Tensor, packed: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`apply_masks` with packed (C, W) int32 masks, unpacked on the logits' device."""
    return apply_masks(logits, bitmask.unpack(packed, logits.shape[-1], logits.device))


def canvas_bitmask(matcher: Matcher, prev_argmax: Sequence[int] | torch.Tensor | None,
                   canvas_length: int) -> np.ndarray:
    """Packed (C, W) masks for the next step: along `prev_argmax`, or along the forced tokens when
    this is the canvas's first step (prev_argmax None)."""
    draft = matcher.forced_tokens()[:canvas_length] if prev_argmax is None else prev_argmax
    return matcher.draft_bitmask(draft, canvas_length)


def canvas_masks(matcher: Matcher, prev_argmax: Sequence[int] | torch.Tensor | None, canvas_length: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """`canvas_bitmask` unpacked to (C, V) bool on `device`."""
    return bitmask.unpack(canvas_bitmask(matcher, prev_argmax, canvas_length), matcher.vocab_size, device)
