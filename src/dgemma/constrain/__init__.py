"""Structured outputs for the canvas sampler: specs, grammar matchers, masks, projection, exact mode.

Default mode (any spec): `LLGuidanceBackend.matcher(spec)` -> a `Matcher`; per denoising step
`canvas_masks` / `canvas_bitmask` along the previous argmax canvas, `apply_masks` on the processed
logits, `project` when the step budget runs out, `Matcher.consume` after each commit.
Exact mode (regex, choice, JSON Schema subset): `backend.automaton(spec)` -> `TokenAutomaton`;
`CanvasDP(automaton, processed_logits, matcher.state, remaining)` gives exact constrained marginals,
a Viterbi canvas and jointly valid samples. docs/structured.md says what each mode guarantees and costs.
"""

from dgemma.constrain.automaton import AutomatonMatcher, TokenAutomaton
from dgemma.constrain.backend import GrammarBackend, LLGuidanceBackend, LLGuidanceMatcher, Matcher
from dgemma.constrain.exact import CanvasDP, marginal_logits, sample_canvas, viterbi_canvas
from dgemma.constrain.processor import apply_bitmask, apply_masks, canvas_bitmask, canvas_masks
from dgemma.constrain.project import project
from dgemma.constrain.spec import ConstraintError, ConstraintSpec

__all__ = [
    "AutomatonMatcher", "CanvasDP", "ConstraintError", "ConstraintSpec", "GrammarBackend", "LLGuidanceBackend",
    "LLGuidanceMatcher", "Matcher", "TokenAutomaton", "apply_bitmask", "apply_masks", "canvas_bitmask",
    "canvas_masks", "marginal_logits", "project", "sample_canvas", "viterbi_canvas",
]
