"""Projection: always a viable prefix, an end id only where the grammar accepts, draft kept where allowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_constrain_support import bundled_backend, encode, tiny_backend

from dgemma.constrain import ConstraintSpec, project

SPECS = [
    (ConstraintSpec("json_schema", {"type": "object", "properties": {"n": {"type": "integer"}, "s": {
        "type": "string", "maxLength": 4}}, "required": ["n", "s"]}), '{"n":12,"s":"ab"}'),
    (ConstraintSpec("regex", r"[a-z]{2,4}(-[0-9]{1,3}){1,3}"), "abc-12-3"),
    (ConstraintSpec("choice", ["red", "green", "blue"]), "blue"),
    (ConstraintSpec("grammar", 'start: "(" start ")" | "x"'), "((x))"),
]


def assert_viable(matcher, tokens, backend):
    probe = matcher.copy()
    consumed = probe.consume(tokens)  # raises if any token is not allowed (end ids included)
    if probe.is_finished():
        assert all(t == tokens[consumed - 1] for t in tokens[consumed:])
    return probe


@pytest.mark.parametrize("index", range(len(SPECS)))
@pytest.mark.parametrize("noise", [0.0, 0.3, 1.0])
def test_projection_is_a_viable_prefix(index, noise):
    backend = tiny_backend()
    spec, doc = SPECS[index]
    target = encode(backend, doc) + [backend.end_ids[1]]
    rng = np.random.default_rng(index)
    for trial in range(6):
        n = int(rng.integers(3, 2 * len(target)))
        draft = (target * 3)[:n]
        draft = [int(rng.integers(0, backend.vocab_size)) if rng.random() < noise else t for t in draft]
        logits = torch.from_numpy(rng.normal(size=(n, backend.vocab_size))).float()
        logits[:, backend.end_ids[0]] += 2.0 * (trial % 2)  # end ids are often the best-scoring token
        matcher = backend.matcher(spec)
        out = project(matcher, draft, logits).tolist()
        assert len(out) == n
        assert_viable(matcher, out, backend)
        if noise == 0.0 and n >= len(target):
            assert out[:len(target)] == target  # a valid draft is kept as it is


def test_projection_picks_the_best_allowed_token_and_keeps_valid_tokens():
    backend = tiny_backend()
    spec = ConstraintSpec("regex", r"[0-9]{3}")
    digits = [encode(backend, str(d))[0] for d in range(10)]
    letter = encode(backend, "q")[0]
    logits = torch.zeros(4, backend.vocab_size)
    logits[1, letter], logits[1, digits[7]], logits[1, digits[2]] = 9.0, 5.0, 4.0
    logits[3, 1], logits[3, 5] = 1.0, 3.0  # among the end ids, <turn|> (5) scores higher
    out = project(backend.matcher(spec), [digits[1], letter, digits[3], letter], logits).tolist()
    assert out == [digits[1], digits[7], digits[3], 5]


def test_projection_continues_from_a_committed_state_and_does_not_change_the_matcher():
    backend = bundled_backend()
    spec, doc = SPECS[0]
    tokens = encode(backend, doc)
    matcher = backend.matcher(spec)
    matcher.consume(tokens[:5])
    logits = torch.randn(12, backend.vocab_size, generator=torch.Generator().manual_seed(0))
    out = project(matcher, torch.randint(0, backend.vocab_size, (12,)), logits).tolist()
    assert_viable(matcher, out, backend)
    assert matcher.consume(tokens[5:]) == len(tokens) - 5  # the matcher itself was not advanced
