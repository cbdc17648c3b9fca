"""Gemma 4's thinking channel: where it is in a reply, and structured output that starts after it.

With thinking switched on (`chat_template_kwargs: {"enable_thinking": true}`, which the template turns into
`<|think|>` in the system turn), the model may open its reply with
    <|channel>thought\\n ...reasoning... <channel|>
and answer after it. `split_reasoning` cuts a reply into (reasoning, the rest), dropping the `thought\\n` label, as
vLLM's `reasoning_content` convention has it; a channel that never closes (the reply was cut by max_tokens) is all
reasoning. A reply that does not open with the channel (leading whitespace allowed) has no reasoning.

Structured output applies after the reasoning ends: `after_thinking` wraps a response format's constraint in a
grammar `start: thinking? body`, the thinking block as `tool_grammar.thinking_block` writes it, the body the
schema (`%json`), the regex or the choice. Lark grammars and exact mode cannot be wrapped (400).
tests/test_openai_tools.py checks the split, streamed and whole, and a wrapped constraint through the server.
"""

from __future__ import annotations

import json

import llguidance as llg

from dgemma.constrain.spec import ConstraintError, ConstraintSpec
from dgemma.server.tools import CHANNEL_CLOSE, CHANNEL_OPEN, THOUGHT_LABEL

THINK = "<|think|>"
REASONING_MARKERS = (CHANNEL_OPEN, CHANNEL_CLOSE, THINK)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning or None, the rest of the reply)."""
    head = text.lstrip()
    if not head.startswith(CHANNEL_OPEN):
        return None, text
    body = head[len(CHANNEL_OPEN):]
    end = body.find(CHANNEL_CLOSE)
    reasoning, rest = (body, "") if end < 0 else (body[:end], body[end + len(CHANNEL_CLOSE):])
    return strip_label(reasoning), rest


def strip_label(reasoning: str) -> str:
    return reasoning[len(THOUGHT_LABEL):] if reasoning.startswith(THOUGHT_LABEL) else reasoning


def after_thinking(spec: ConstraintSpec, markers) -> ConstraintSpec:
    """`spec` allowed to start after an optional thinking block (a Lark grammar spec); ConstraintError when the spec
    cannot be wrapped."""
    from dgemma.server.tool_grammar import lark_literal, thinking_block

    if spec.mode == "exact":
        raise ConstraintError("exact constraint mode cannot follow a thinking block; use constraint_mode 'default' "
                              "or switch thinking off")
    if spec.kind in ("json_schema", "json_object"):
        schema = dict(spec.schema())
        guidance = {"whitespace_flexible": spec.whitespace == "flexible", "lenient": False}
        schema["x-guidance"] = {**schema.get("x-guidance", {}), **guidance}
        body = f"%json {json.dumps(schema, ensure_ascii=False)}"
    elif spec.kind == "regex":
        body = f"/{llg.regex_to_lark(spec.value, 'dws')}/"
    elif spec.kind == "choice":
        body = " | ".join(lark_literal(c) for c in spec.value)
    else:
        raise ConstraintError("a Lark grammar cannot follow a thinking block; switch thinking off or use a JSON "
                              "schema, regex or choice")
    grammar = f"start: thinking? answer\nanswer: {body}\nthinking: {thinking_block(markers)}"
    return ConstraintSpec("grammar", grammar)
