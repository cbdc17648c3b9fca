"""Exact mode against brute force over every canvas of a toy (6 tokens, C = 4): forward-backward
marginals, Viterbi, FFBS sample frequencies (chi-square), the budget; token lifting and the
automaton matcher on real tokenizers."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from test_constrain_support import BUNDLED_END_IDS, bundled_backend, encode, tiny_backend

from dgemma.constrain import ConstraintError, ConstraintSpec
from dgemma.constrain.automaton import AutomatonMatcher, TokenAutomaton
from dgemma.constrain.exact import CanvasDP
from dgemma.constrain.regex_dfa import compile_regex

TOY_BYTES = [None, b"a", b"b", b"ab", b"c", b"ba"]  # id 0 is the end id
TOY_REGEX = r"(ab|c)+"
C = 4


def language_prefixes(max_len=12):
    words = {"".join(w) for n in range(max_len + 1) for w in itertools.product("abc", repeat=n)
             if re.fullmatch(TOY_REGEX, "".join(w))}
    return words, {w[:k] for w in words for k in range(len(w) + 1)}


WORDS, PREFIXES = language_prefixes()


def brute_valid(canvas, remaining=None):
    """Validity from the regex itself: text before the first end id is in the language (or a viable
    prefix if there is no end id), only end ids after it; with a budget, the output ends in time."""
    if 0 in canvas:
        e = canvas.index(0)
        text = b"".join(TOY_BYTES[t] for t in canvas[:e]).decode()
        ok = text in WORDS and all(t == 0 for t in canvas[e:])
        return ok and (remaining is None or e <= remaining)
    text = b"".join(TOY_BYTES[t] for t in canvas).decode()
    if remaining is not None and remaining <= len(canvas):
        return remaining == len(canvas) and text in WORDS
    return text in PREFIXES


def brute_law(logits, remaining=None):
    canvases, weights = [], []
    for canvas in itertools.product(range(len(TOY_BYTES)), repeat=C):
        if brute_valid(list(canvas), remaining):
            canvases.append(canvas)
            weights.append(float(sum(logits[i, t] for i, t in enumerate(canvas))))
    w = np.exp(np.array(weights) - max(weights))
    return canvases, w / w.sum()


@pytest.fixture(scope="module")
def toy():
    return TokenAutomaton.build(compile_regex(TOY_REGEX), TOY_BYTES, [0])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("remaining", [None, 4, 3, 1])
def test_marginals_and_viterbi_equal_brute_force(toy, seed, remaining):
    logits = torch.randn(C, len(TOY_BYTES), generator=torch.Generator().manual_seed(seed)) * 2
    canvases, probs = brute_law(logits.double(), remaining)
    dp = CanvasDP(toy, logits, toy.start, remaining)
    expected = np.zeros((C, len(TOY_BYTES)))
    for canvas, p in zip(canvases, probs, strict=True):
        expected[np.arange(C), canvas] += p
    np.testing.assert_allclose(torch.exp(dp.marginal_logits()).numpy(), expected, atol=1e-5)
    best = canvases[int(np.argmax(probs))]
    assert dp.viterbi().tolist() == list(best)
    if remaining is not None and remaining < C:
        assert dp.viterbi()[remaining:].eq(0).all()  # the canvas ends the output in time


def _closes_within(canvas, k):
    """Brute force: the canvas's text can still become a word with at most k more content tokens."""
    if 0 in canvas:
        return brute_valid(canvas)
    text = b"".join(TOY_BYTES[t] for t in canvas).decode()
    tails = [""] + ["".join(TOY_BYTES[t].decode() for t in w) for n in range(1, k + 1)
                    for w in itertools.product(range(1, len(TOY_BYTES)), repeat=n)]
    return text in PREFIXES and any(text + tail in WORDS for tail in tails)


@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_a_budget_beyond_the_canvas_leaves_room_to_close(toy, k):
    """With C + k content tokens left, the canvas must end where the output can still close within k more
    (brute force over continuations); a budget that leaves every state room is no budget."""
    logits = torch.randn(C, len(TOY_BYTES), generator=torch.Generator().manual_seed(3 + k)) * 2
    dp = CanvasDP(toy, logits, toy.start, remaining=C + k)
    canvases, weights = [], []
    for canvas in itertools.product(range(len(TOY_BYTES)), repeat=C):
        if brute_valid(list(canvas)) and _closes_within(list(canvas), k):
            canvases.append(canvas)
            weights.append(float(sum(logits[i, t] for i, t in enumerate(canvas))))
    assert dp.viterbi().tolist() == list(canvases[int(np.argmax(weights))])
    if k >= 5:
        assert torch.allclose(dp.marginal_logits(), CanvasDP(toy, logits, toy.start).marginal_logits())
    with pytest.raises(ValueError, match="not a state"):
        CanvasDP(toy, logits, toy.num_states)


def test_ffbs_frequencies_match_brute_force(toy):
    logits = torch.randn(C, len(TOY_BYTES), generator=torch.Generator().manual_seed(11))
    canvases, probs = brute_law(logits.double())
    dp = CanvasDP(toy, logits, toy.start)
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = {}
    for _ in range(n):
        canvas = tuple(dp.sample(g).tolist())
        assert canvas in set(canvases)  # every sample is valid
        counts[canvas] = counts.get(canvas, 0) + 1
    expected = probs * n
    observed = np.array([counts.get(c, 0) for c in canvases])
    # pool the rare canvases so every cell expects at least 5
    order = np.argsort(expected)
    small = order[np.cumsum(expected[order]) < 5 * 3]
    keep = np.setdiff1d(np.arange(len(canvases)), small)
    exp_cells = np.r_[expected[keep], expected[small].sum()]
    obs_cells = np.r_[observed[keep], observed[small].sum()]
    chi2 = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    dof = len(exp_cells) - 1
    # p < 1e-4 under the null: Wilson-Hilferty approximation of the chi-square quantile
    z = 3.719
    threshold = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < threshold, (chi2, threshold, dof)


def test_from_a_committed_state_and_infeasible_budget(toy):
    matcher = AutomatonMatcher(toy)
    matcher.consume([1])  # "a": must continue with "b"
    abc = TokenAutomaton.build(compile_regex("abc"), [None, b"a", b"b", b"c"], [0])
    assert AutomatonMatcher(abc).forced_tokens() == [1, 2, 3]
    logits = torch.zeros(C, len(TOY_BYTES))
    logits[:, 4] = 5.0  # "c" preferred everywhere
    dp = CanvasDP(toy, logits, matcher.state)
    canvas = dp.viterbi().tolist()
    assert canvas[0] == 2 and brute_valid([3] + canvas[1:])  # "b" first: "a"+"b" = "ab"
    with pytest.raises(ConstraintError, match="no valid canvas"):
        CanvasDP(toy, logits, matcher.state, remaining=0).viterbi()


def test_lifting_agrees_with_the_byte_dfa():
    backend = tiny_backend()
    spec = ConstraintSpec("regex", r"[a-z]{1,3}(-[0-9]{2,4}|\"é\")*", mode="exact")
    dfa = compile_regex(spec.value)
    automaton = backend.automaton(spec)
    token_bytes = backend.token_bytes()
    rng = np.random.default_rng(0)
    good = [t for t in range(backend.vocab_size) if token_bytes[t] and re.fullmatch(rb"[a-z0-9\-\"]+", token_bytes[t])]
    for _ in range(300):
        seq = [int(rng.choice(good)) for _ in range(rng.integers(1, 5))]
        state, q = automaton.start, dfa.start
        for t in seq:
            state, q = automaton.step(state, t), dfa.run(token_bytes[t], q)
            if state < 0:
                break
        live = q != dfa.dead
        assert (state >= 0) == live
        if live:
            assert bool(automaton.accepting[state]) == bool(dfa.accepting[q])


@pytest.mark.parametrize("kind, value, doc", [
    ("regex", r"[a-z]{1,3}-\d{2,4}", "abc-123"), ("choice", ["red", "green", "blue"], "green"),
    ("json_schema", {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string",
     "maxLength": 3}}, "required": ["n"]}, '{"n":12,"s":"ab"}'),
])
def test_automaton_matcher_masks_against_its_definition(kind, value, doc):
    backend = bundled_backend()
    matcher = backend.matcher(ConstraintSpec(kind, value, mode="exact"))
    tokens = encode(backend, doc) + [6, 1]
    draft = tokens[:3] + [50] + tokens[4:]
    for d in (tokens, draft):
        masks = matcher.draft_masks(d)
        assert masks.any(1).all() and not masks[:, 4096:].any()
        state = matcher.state
        for k, t in enumerate(d):
            if state < 0:
                break
            expected = torch.tensor([state >= 0 and matcher.automaton.step(state, u) >= 0 for u in range(4100)])
            assert torch.equal(masks[k], expected)
            state = matcher.automaton.step(state, t)
    assert matcher.copy().consume(tokens) == len(tokens) - 1


def test_automaton_matcher_consume_and_forced_tokens():
    backend = tiny_backend()
    matcher = backend.matcher(ConstraintSpec("json_schema", {"type": "object", "properties": {
        "name": {"type": "string"}}, "required": ["name"]}, mode="exact"))
    assert matcher.forced_tokens() == []  # "{" and '{"' are both allowed: no single token is forced
    with pytest.raises(ConstraintError, match="end id 1 at position 0"):
        matcher.consume([1])
    matcher.consume(encode(backend, '{"name":"x"}'))
    assert matcher.is_accepting() and matcher.is_stopped() and not matcher.is_finished()
    assert matcher.consume([5, 9]) == 1 and matcher.is_finished()


def test_exact_json_on_the_bundled_vocabulary_ends_within_budget():
    backend = bundled_backend()
    spec = ConstraintSpec("json_schema", {"type": "object", "properties": {"a": {"type": "integer"},
                          "b": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
                          "required": ["a", "b"]}, mode="exact")
    automaton = backend.automaton(spec)
    logits = torch.randn(24, backend.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    for remaining in (24, 15):  # '{"a":1,"b":[]}' is 14 tokens here
        canvas = CanvasDP(automaton, logits, automaton.start, remaining).viterbi().tolist()
        end = next((i for i, t in enumerate(canvas) if t in BUNDLED_END_IDS), len(canvas))
        assert end <= remaining  # the document is complete within the remaining tokens
        text = backend.tokenizer.decode_str(canvas[:end])
        assert set(__import__("json").loads(text)) == {"a", "b"}
    sample = CanvasDP(automaton, logits, automaton.start, 20).sample(torch.Generator().manual_seed(1)).tolist()
    AutomatonMatcher(automaton).consume(sample)  # a jointly valid canvas


def test_size_cap_is_reported():
    backend = tiny_backend()
    with pytest.raises(ConstraintError, match="token classes"):
        TokenAutomaton.from_spec(ConstraintSpec("regex", r"[a-z]{0,30}", mode="exact"), backend.token_bytes(),
                                 backend.end_ids, max_size=100)
