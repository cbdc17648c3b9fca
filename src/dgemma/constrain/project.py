"""Left-to-right projection of a canvas onto the grammar, for a canvas that ran out of steps.

For each position keep the draft token if the grammar allows it there, else take the highest-scoring
allowed token under the given logits; stop at the first end id (later positions repeat it, the
engine discards them). The result is always a viable prefix, with an end id only where the grammar
accepts, because mask rows are never empty and allow end ids only in accepting states
(tests/test_constrain_project.py). Masks are computed along the draft in chunks that double while
the draft stays valid and restart small after a fix, so a mostly valid canvas costs a few calls.

Shapes: n positions (usually canvas_length), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dgemma.constrain import bitmask
from dgemma.constrain.backend import Matcher
from dgemma.constrain.bitmask import check_draft

_FIRST_CHUNK = 8


def project(matcher: Matcher, draft: Sequence[int] | torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(n,) draft tokens and (n, V) logits -> (n,) long tensor on the logits' device. `matcher` is not changed."""
    out = check_draft(draft, matcher.vocab_size).copy()
    n = len(out)
    if logits.shape != (n, matcher.vocab_size):
        raise ValueError(f"logits must be ({n}, {matcher.vocab_size}), got {tuple(logits.shape)}")
    m = matcher.copy()
    i, chunk = 0, _FIRST_CHUNK
    while i < n:
        size = min(chunk, n - i)
        rows = m.draft_bitmask(out[i:i + size], size)
        ok = bitmask.has_bits(rows, out[i:i + size])
        is_end = np.isin(out[i:i + size], matcher.end_ids) & ok
        stops = np.flatnonzero(~ok | is_end)
        if not len(stops):
            m.consume(out[i:i + size].tolist())
            i, chunk = i + size, chunk * 2
            continue
        s = int(stops[0])
        if not ok[s]:
            out[i + s] = _best_allowed(rows[s], logits[i + s], matcher.vocab_size)
        if out[i + s] in matcher.end_ids:
            out[i + s + 1:] = out[i + s]
            break
        m.consume(out[i:i + s + 1].tolist())
        i, chunk = i + s + 1, _FIRST_CHUNK
    return torch.from_numpy(out).to(logits.device)


def _best_allowed(row: np.ndarray, scores: torch.Tensor, vocab_size: int) -> int:
    allowed = bitmask.unpack(row[None], vocab_size, scores.device)[0]
    # clamp: an allowed token whose logit is -inf must still beat the disallowed ones
    finite = scores.float().clamp(min=torch.finfo(torch.float32).min)
    return int(torch.where(allowed, finite, float("-inf")).argmax())  # sync: one row, once per fix
