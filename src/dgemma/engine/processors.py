"""The logits processor of an engine step whose rows ask for more than the plain sampler: a constraint, sampling
filters, a locked prefix, or top log-probabilities.

`StepProcessor` runs inside the fused sampler on each chunk of processed logits (chunks hold whole rows: the
engine aligns the sampler chunk to the canvas length). For each row that needs it, in this order:
1. its constraint (`CanvasConstraint.process`: grammar masks, or exact marginals), after waiting for the masks
   the engine started on its worker thread beside the forward;
2. its filters (`sampler.filters.filter_logits`: top-k, top-p, min-p);
3. its locked prefix (prefix streaming): each locked position becomes one-hot on its token (entropy 0, always
   accepted, the argmax fixed, self-conditioning on the token);
4. a record of the result for `logprobs`: the top-K log-probabilities and their ids, and for a constrained row the
   whole log-softmax (the committed token may then differ from the argmax: projection, exact mode's Viterbi). A row
   that already stopped (frozen on the device, between host syncs) keeps its record, as it keeps its state.
Rows without any of these are untouched. A step with a processor runs the eager step body (`Engine._step_rows`).
tests/test_openai_sampling.py and tests/test_openai_logprobs.py check rows with and without options in one batch.

Shapes: C canvas_length, V vocabulary, K top log-probabilities.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dgemma.sampler.filters import filter_logits

if TYPE_CHECKING:
    from dgemma.constrain.canvas import CanvasConstraint


@dataclass
class LogprobRecord:
    """A row's log-probabilities from the last live step of its canvas (on the device)."""

    top_ids: torch.Tensor | None = None  # (C, K) long
    top_logprobs: torch.Tensor | None = None  # (C, K) fp32
    full: torch.Tensor | None = None  # (C, V) fp32 log-softmax (constrained rows)

    def clear(self) -> None:
        self.top_ids = self.top_logprobs = self.full = None


@dataclass
class RowWork:
    """What the processor does to one row (index `row` of the step)."""

    row: int
    constraint: CanvasConstraint | None = None
    remaining: int = 0  # tokens the request may still return (exact mode's budget)
    filters: tuple[int, float, float] | None = None  # (top_k, top_p, min_p)
    locked: list[int] = field(default_factory=list)  # tokens of the locked prefix, from position 0
    top: int = 0  # top log-probabilities to record (0: none)
    record: LogprobRecord | None = None  # where to record (None: no record)


class StepProcessor:
    def __init__(self, work: list[RowWork], canvas_length: int, ready: list[Future],
                 stopped: torch.Tensor | None = None) -> None:
        self.work, self.c, self.ready, self.stopped = work, canvas_length, ready, stopped
        self.waited = 0.0  # seconds the step waited for masks (what the forward did not hide)

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.ready:
            t0 = time.perf_counter()
            for future in self.ready:
                future.result()  # a failure here fails the step; the row at fault then fails alone
            self.waited += time.perf_counter() - t0
            self.ready = []
        end = start + x.shape[0]
        for w in self.work:
            lo, hi = w.row * self.c, (w.row + 1) * self.c
            if lo >= start and hi <= end:
                x[lo - start:hi - start] = self._row(w, x[lo - start:hi - start])
        return x

    def _row(self, w: RowWork, x: torch.Tensor) -> torch.Tensor:
        """One row's processed logits (C, V), edited."""
        if w.constraint is not None:
            x = w.constraint.process(x, w.remaining)
        if w.filters is not None:
            top_k, top_p, min_p = w.filters
            n, dev = x.shape[0], x.device
            x = filter_logits(x, torch.full((n,), top_k, dtype=torch.long, device=dev),
                              torch.full((n,), top_p, device=dev), torch.full((n,), min_p, device=dev))
        if w.locked:
            k = len(w.locked)
            ids = torch.tensor(w.locked, device=x.device)[:, None]
            x[:k] = float("-inf")
            x[:k].scatter_(1, ids, 0.0)
        if w.record is not None:
            self._record(w, x)
        return x

    def _record(self, w: RowWork, x: torch.Tensor) -> None:
        rec = w.record
        logp = torch.log_softmax(x, dim=-1)
        live = None if self.stopped is None else ~self.stopped[w.row]
        keep = lambda new, old: new if old is None or live is None else torch.where(live, new, old)
        if w.top:
            values, ids = torch.topk(logp, min(w.top, x.shape[-1]), dim=-1)
            rec.top_logprobs, rec.top_ids = keep(values, rec.top_logprobs), keep(ids, rec.top_ids)
        if w.constraint is not None:
            rec.full = keep(logp, rec.full)
