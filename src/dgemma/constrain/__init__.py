"""Structured outputs for the canvas sampler: specs, grammar matchers, masks, projection, exact mode.

See docs/structured.md for what each mode guarantees and costs.
"""

from dgemma.constrain.backend import GrammarBackend, LLGuidanceBackend, LLGuidanceMatcher, Matcher
from dgemma.constrain.processor import apply_bitmask, apply_masks, canvas_bitmask, canvas_masks
from dgemma.constrain.project import project
from dgemma.constrain.spec import ConstraintError, ConstraintSpec

__all__ = [
    "ConstraintError", "ConstraintSpec", "GrammarBackend", "LLGuidanceBackend", "LLGuidanceMatcher", "Matcher",
    "apply_bitmask", "apply_masks", "canvas_bitmask", "canvas_masks", "project",
]
