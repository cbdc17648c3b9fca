"""One request's constraint as the engine applies it, canvas by canvas (no text: ids, masks and logits only).

Default mode (any grammar, llguidance): before each step, `prepare` computes the masks along the previous
step's argmax canvas (the forced tokens at a canvas's first step) from the grammar state after everything
committed; the engine runs it on a worker thread beside the forward. `process` applies them to the row's
processed logits (-inf where not allowed) before sampling, argmax and entropy. `finish` gives the canvas to
commit: the argmax canvas when it is valid (always so when it stopped by stability: every token was allowed by
the masks built along it), else its left-to-right projection with the last step's masked logits (the step
budget ran out first, or stability_threshold is 0). The grammar state then
consumes it (up to and including the first end id). An end id is allowed only where the grammar accepts, so a
request that ends with "stop" is in the language.

Exact mode (regex, choice, JSON Schema subset; a finite automaton): `process` replaces the processed logits by
the exact constrained marginals of the canvas (forward-backward over position x state, `CanvasDP`), and keeps
the canvas's Viterbi path, which `finish` commits: jointly valid, and, when the tokens left fit in this canvas,
closed with an end id within them.

tests/test_structured.py checks both through the engine, the server and the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from dgemma.constrain import bitmask
from dgemma.constrain.automaton import AutomatonMatcher
from dgemma.constrain.backend import Matcher
from dgemma.constrain.exact import CanvasDP
from dgemma.constrain.processor import canvas_bitmask
from dgemma.constrain.project import project
from dgemma.constrain.spec import ConstraintError


class CanvasConstraint:
    """The engine-facing side of a constraint. `mask_seconds` sums the time spent computing masks (default mode)
    or dynamic programming (exact mode); `steps` counts the steps it constrained."""

    def __init__(self, matcher: Matcher, canvas_length: int) -> None:
        self.matcher = matcher
        self.exact = isinstance(matcher, AutomatonMatcher)
        self.canvas_length = canvas_length
        self.mask_seconds = 0.0
        self.steps = 0
        self._bits: np.ndarray | None = None
        self._last_logits: torch.Tensor | None = None
        self._viterbi: torch.Tensor | None = None

    @property
    def mode(self) -> str:
        return "exact" if self.exact else "default"

    def prepare(self, prev_argmax: Sequence[int] | None) -> None:
        """Masks for the coming step (default mode; nothing to do in exact mode). Thread-safe with respect to the
        engine: it touches only this request's matcher."""
        if self.exact:
            return
        t0 = time.perf_counter()
        self._bits = canvas_bitmask(self.matcher, prev_argmax, self.canvas_length)
        self.mask_seconds += time.perf_counter() - t0

    def process(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        """The row's processed logits (C, V), constrained (in place where possible). `remaining`: tokens the
        request may still return. Default mode keeps a copy for a projection at commit (C x V fp32)."""
        t0 = time.perf_counter()
        self.steps += 1
        if self.exact:
            logits = self._exact(logits, remaining)
        else:
            mask = bitmask.unpack(self._bits, logits.shape[-1], logits.device)
            logits = logits.masked_fill_(~mask, float("-inf"))
            self._last_logits = logits.clone()
        self.mask_seconds += time.perf_counter() - t0
        return logits

    def _exact(self, logits: torch.Tensor, remaining: int) -> torch.Tensor:
        automaton = self.matcher.automaton
        if automaton.class_next.device != logits.device:
            automaton = self.matcher.automaton = automaton.to(logits.device)
        try:  # the end id counts in the budget (as transformers counts it): it must come by position remaining-1
            dp = CanvasDP(automaton, logits, self.matcher.state, remaining - 1)
            marginals = dp.marginal_logits()
        except ConstraintError:  # the structure cannot close within the tokens left: go on, to be cut at length
            dp = CanvasDP(automaton, logits, self.matcher.state, None)
            marginals = dp.marginal_logits()
        self._viterbi = dp.viterbi()
        return logits.copy_(marginals)

    def finish(self, argmax_canvas: Sequence[int]) -> list[int]:
        """The canvas to commit, consumed by the grammar state (ConstraintError if that fails: the request
        fails alone)."""
        if self.exact:
            if self._viterbi is None:
                raise ConstraintError("exact mode has no canvas to commit (no step was constrained)")
            canvas = self._viterbi.tolist()
            self.matcher.consume(canvas)
        else:
            canvas = list(argmax_canvas)
            try:
                self.matcher.consume(canvas)  # leaves the state as it was when a token is not allowed
            except ConstraintError:
                if self._last_logits is None:
                    raise
                canvas = project(self.matcher, canvas, self._last_logits).tolist()
                self.matcher.consume(canvas)
        self._bits = self._last_logits = self._viterbi = None
        return canvas


def canvas_constraint(spec, tokenizer, vocab_size: int, end_ids: Sequence[int], canvas_length: int
                      ) -> CanvasConstraint:
    """A request's constraint for a model: its tokenizer (a dgemma `Tokenizer`, its `tokenizer.json` path or
    text), logits width, end ids and canvas length. Compiles the spec (ConstraintError when it cannot)."""
    from dgemma.constrain.backend import LLGuidanceBackend

    backend = LLGuidanceBackend.for_tokenizer(tokenizer, vocab_size, end_ids)
    return CanvasConstraint(backend.matcher(spec), canvas_length)
