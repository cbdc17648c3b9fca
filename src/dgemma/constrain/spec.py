"""What a request asks the output to satisfy: `ConstraintSpec`, and `ConstraintError` for bad specs.

A spec is plain data (kind, value, whitespace, mode); it is checked for shape here (known kind,
value of the right type, non-empty choice list, exact mode only for kinds that can be a finite
automaton) and for meaning by the backend that compiles it (invalid regex, schema keyword the
compiler does not implement, ...). Every refusal is a `ConstraintError` (a ValueError) whose
message names what is wrong, so a server can answer 400 with it.
tests/test_constrain_spec.py checks the shape errors and the messages.

`whitespace="compact"` (default) allows no whitespace between JSON tokens (`,` and `:` without
spaces, no newlines): a small model offered flexible whitespace tends to fill its canvas with
newlines and never close the object. "flexible" allows JSON whitespace between tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dgemma.config import UserError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
WHITESPACE = ("compact", "flexible")
MODES = ("default", "exact")
# kinds whose language can be a finite automaton (exact mode); json_object and Lark grammars nest
# without bound, so they are context-free and only the default (llguidance) mode handles them
EXACT_KINDS = ("json_schema", "regex", "choice")


class ConstraintError(UserError):
    """A constraint that cannot be compiled or used; the message says what to change."""


@dataclass(frozen=True)
class ConstraintSpec:
    """A structured-output constraint.

    kind: "json_schema" (value: schema dict or its JSON text), "json_object" (any JSON object;
    value ignored, may be None), "regex" (value: pattern, matched in full), "choice" (value: list
    of strings, the output is exactly one of them), "grammar" (value: Lark grammar text as
    llguidance accepts it). whitespace: "compact" or "flexible" (JSON kinds only). mode: "default"
    (token masks from llguidance) or "exact" (canvas dynamic programming over a finite automaton).
    """

    kind: str
    value: Any = None
    whitespace: str = "compact"
    mode: str = "default"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConstraintError(f"unknown constraint kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.whitespace not in WHITESPACE:
            raise ConstraintError(f"whitespace must be 'compact' or 'flexible', got {self.whitespace!r}")
        if self.mode not in MODES:
            raise ConstraintError(f"mode must be 'default' or 'exact', got {self.mode!r}")
        if self.whitespace != "compact" and self.kind not in ("json_schema", "json_object"):
            raise ConstraintError(f"whitespace applies to json_schema and json_object only, not to {self.kind}")
        if self.mode == "exact" and self.kind not in EXACT_KINDS:
            raise ConstraintError(f"exact mode needs a finite automaton and supports {', '.join(EXACT_KINDS)}; "
                                  f"{self.kind} can nest without bound, use mode='default'")
        _check_value(self.kind, self.value)

    def schema(self) -> dict[str, Any]:
        """The JSON Schema as a dict (json_schema and json_object kinds)."""
        if self.kind == "json_object":
            return {"type": "object"}
        if self.kind != "json_schema":
            raise ConstraintError(f"a {self.kind} constraint has no JSON schema")
        return json.loads(self.value) if isinstance(self.value, str) else self.value

    def key(self) -> str:
        """A canonical text for caching compiled forms of this spec."""
        value = self.schema() if self.kind == "json_schema" else self.value
        return json.dumps([self.kind, value, self.whitespace, self.mode], sort_keys=True, ensure_ascii=False)


def _check_value(kind: str, value: Any) -> None:
    if kind == "json_schema":
        schema = value
        if isinstance(value, str):
            try:
                schema = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConstraintError(f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ConstraintError(f"json_schema must be a JSON object (a dict), got {type(schema).__name__}")
    elif kind == "regex":
        if not isinstance(value, str):
            raise ConstraintError(f"regex must be a string, got {type(value).__name__}")
    elif kind == "choice":
        if not isinstance(value, list | tuple) or not value:
            raise ConstraintError("choice needs a non-empty list of strings")
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ConstraintError(f"choice entries must be strings, got {bad[0]!r}")
    elif kind == "grammar":
        if not isinstance(value, str) or not value.strip():
            raise ConstraintError("grammar must be a non-empty Lark grammar text")
