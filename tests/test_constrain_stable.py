"""Stable => valid: the real entropy-bound step functions with draft-path masks and a fake denoiser.

The fake denoiser's logits favour tokens that are invalid (specials, ids without a tokenizer entry,
random tokens) over the tokens of a valid document. Every canvas that stops because its argmax is
stable must be a valid continuation of what was committed, with an end id only where the grammar
accepts; canvases that run out of steps are projected. Grammar state carries across canvases."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_constrain_support import TINY_V, encode, tiny_backend

from dgemma.constrain import ConstraintError, ConstraintSpec, apply_masks, canvas_masks, project
from dgemma.sampler.entropy_bound import accept_mask, stable_and_confident, temperature, token_entropy

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "tags"],
          "additionalProperties": False}
CASES = {
    "schema": (ConstraintSpec("json_schema", SCHEMA), '{"name":"ann","age":31,"tags":["x","yz"]}'),
    "regex": (ConstraintSpec("regex", r"([a-z]{1,3}-\d{2,4} ){2,5}"), "abc-123 xyz-9876 ab-12 "),
}
CANVAS, STEPS = 12, 24


class FakeDenoiser:
    """Logits per position: a fixed random preference, strongest for invalid tokens, plus step noise."""

    def __init__(self, target: list[int], seed: int, bias: float) -> None:
        g = torch.Generator().manual_seed(seed)
        self.g = g
        length = len(target) + 8 * CANVAS
        self.base = torch.randn(length, TINY_V, generator=g)
        bad = torch.randint(0, TINY_V, (length, 4), generator=g)
        self.base.scatter_(1, bad, bias)  # random tokens: mostly invalid at structural positions
        self.base[:, [0, 2, 4, 310, 383]] += bias  # specials that are never allowed, ids past the tokenizer
        self.base[torch.arange(len(target)), torch.tensor(target)] += bias - 0.5  # the document, a bit less
        self.offset = 0

    def __call__(self, canvas: torch.Tensor) -> torch.Tensor:
        rows = self.base[self.offset:self.offset + CANVAS]
        return (rows + 0.05 * torch.randn(rows.shape, generator=self.g))[None] * 3.0  # (1, C, V)


def run_canvas(matcher, denoiser, stats):
    """One canvas of the entropy-bound loop with masks along the previous argmax; returns the commit."""
    canvas, prev, history, processed = torch.randint(0, TINY_V, (1, CANVAS)), None, None, None
    for step in range(STEPS, 0, -1):
        processed = denoiser(canvas) / temperature(step, STEPS, 0.8, 1.0, torch.device("cpu"))
        apply_masks(processed[0], canvas_masks(matcher, prev, CANVAS))
        assert torch.isfinite(processed).any(-1).all()  # S5: no row is all -inf
        sampled = torch.multinomial(torch.softmax(processed, -1).view(CANVAS, -1), 1, generator=denoiser.g)
        argmax = processed.argmax(-1)
        entropy = token_entropy(processed)
        accepted = accept_mask(entropy, 1.0)
        canvas = torch.where(accepted, sampled.view(1, CANVAS), torch.randint(0, TINY_V, (1, CANVAS)))
        stop, history = stable_and_confident(history, argmax, entropy, 1, 1e9)
        prev = argmax[0]
        if bool(stop):
            stats["stable"] += 1
            check_valid(matcher, prev.tolist())
            return prev.tolist()
    stats["projected"] += 1
    return project(matcher, prev, processed[0]).tolist()


def check_valid(matcher, tokens):
    probe = matcher.copy()
    try:
        probe.consume(tokens)  # raises on a token the grammar does not allow, or an end id where not accepting
    except ConstraintError as exc:
        pytest.fail(f"a stable canvas is invalid: {exc}")


def generate(spec, doc, seed, bias, stats, canvases=6):
    backend = tiny_backend()
    matcher = backend.matcher(spec)
    denoiser = FakeDenoiser(encode(backend, doc) + [backend.end_ids[seed % 2]], seed, bias)
    committed = []
    for _ in range(canvases):
        commit = run_canvas(matcher, denoiser, stats)
        committed += commit[:matcher.consume(commit)]  # carries the grammar state to the next canvas
        denoiser.offset += CANVAS
        if matcher.is_finished():
            break
    return matcher, committed


@pytest.mark.parametrize("name", list(CASES))
def test_stable_canvases_are_valid(name):
    spec, doc = CASES[name]
    stats = {"stable": 0, "projected": 0}
    finished = 0
    for seed in range(4):
        matcher, committed = generate(spec, doc, seed, 4.0, stats)
        if matcher.is_finished():
            finished += 1
            text = tiny_backend().tokenizer.decode_str(committed[:-1])
            if name == "schema":
                assert set(json.loads(text)) == {"name", "age", "tags"}
    assert stats["stable"] >= 4  # the property was exercised
    assert finished >= 1


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), bias=st.floats(1.0, 8.0), name=st.sampled_from(sorted(CASES)))
def test_stable_implies_valid_property(seed, bias, name):
    spec, doc = CASES[name]
    generate(spec, doc, seed, bias, {"stable": 0, "projected": 0}, canvases=3)
