"""Draft-path masks against a brute-force matcher, their invariants (S5, end ids), reuse across
steps, the processor helpers and the packed-mask utilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_constrain_support import bundled_backend, encode, tiny_backend

from dgemma.constrain import ConstraintSpec, apply_bitmask, apply_masks, canvas_masks
from dgemma.constrain import bitmask as bm

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}, "ok": {"type": "boolean"}},
    "required": ["name", "age"]}
SPECS = {
    "schema": (ConstraintSpec("json_schema", SCHEMA), ['{"name":"ann","age":31,"tags":["x"],"ok":true}',
                                                       '{"name":"bob","age":7}']),
    "regex": (ConstraintSpec("regex", r"[a-z]{1,3}-\d{2,4}"), ["abc-123", "x-9876"]),
    "choice": (ConstraintSpec("choice", ["red", "green", "blue"]), ["green"]),
    "grammar": (ConstraintSpec("grammar", 'start: "[" item ("," item)* "]"\nitem: /[0-9]+/'), ["[0,12,345]"]),
}


def brute_rows(backend, spec, draft):
    """Row k from scratch: a fresh matcher advanced by draft[:k] and asked for one mask (no draft API, no
    reuse). Its allowed ids must pass `validate_tokens`; llguidance may allow fewer (where bytes are
    forced it keeps only the canonical token, e.g. `{"` but not `{` then `"`)."""
    vocab, ends = backend.vocab_size, set(backend.end_ids)
    free = np.array([t in ends or not backend.tokenizer.is_special_token(t) for t in range(vocab)])
    rows, state = [], "path"
    for k in range(len(draft)):
        if state == "end":
            row = np.isin(np.arange(vocab), backend.end_ids)
        elif state == "free":
            row = free
        else:
            m = backend.matcher(spec)
            assert m.consume(draft[:k]) == k
            row = m.draft_masks([]  , 1)[0].numpy()
            for t in np.flatnonzero(row):
                assert m._m.validate_tokens([t]) == 1 or (t in ends and m.is_accepting())
            if row[draft[k]]:
                state = "end" if draft[k] in ends else "path"
            else:
                state = "free"
        rows.append(row)
    return np.stack(rows)


def random_drafts(backend, docs, rng, count):
    ends = list(backend.end_ids)
    for _ in range(count):
        toks = encode(backend, docs[rng.integers(len(docs))]) + [ends[rng.integers(len(ends))]]
        toks += list(rng.integers(0, backend.vocab_size, 3))
        kind = rng.integers(4)
        if kind == 1:  # one corrupted position
            toks[rng.integers(len(toks))] = int(rng.integers(0, backend.vocab_size))
        elif kind == 2:  # an end id too early
            toks[rng.integers(len(toks))] = ends[rng.integers(len(ends))]
        elif kind == 3:  # a truncated valid prefix followed by noise
            cut = int(rng.integers(1, len(toks)))
            toks = toks[:cut] + list(rng.integers(0, backend.vocab_size, 4))
        yield [int(t) for t in toks]


@pytest.mark.parametrize("name", list(SPECS))
def test_draft_masks_match_brute_force(name):
    backend, (spec, docs) = tiny_backend(), SPECS[name]
    rng = np.random.default_rng(len(name))
    matcher = backend.matcher(spec)  # one matcher for all drafts: exercises the row reuse too
    for draft in random_drafts(backend, docs, rng, 8):
        masks = matcher.draft_masks(draft).numpy()
        np.testing.assert_array_equal(masks, brute_rows(backend, spec, draft))


@pytest.mark.parametrize("name", list(SPECS))
def test_rows_never_empty_and_end_ids_only_where_accepting(name):
    backend, (spec, docs) = tiny_backend(), SPECS[name]
    rng = np.random.default_rng(7)
    matcher, ends = backend.matcher(spec), list(backend.end_ids)
    for draft in random_drafts(backend, docs, rng, 12):
        masks = matcher.draft_masks(draft).numpy()
        assert masks.any(axis=1).all()  # S5
        assert not masks[:, 300:].any()  # ids without a tokenizer entry (tokenizer < 300 < V = 384)
        stop = next((k for k, t in enumerate(draft) if t in ends or not masks[k, t]), len(draft))
        for k in range(len(draft)):
            if k > stop and draft[stop] in ends and masks[stop, draft[stop]]:
                assert set(np.flatnonzero(masks[k])) == set(ends)
                continue
            m = matcher.copy()
            valid = m._m.validate_tokens(draft[:k]) == k
            if valid:
                m.consume(draft[:k])
                assert masks[k, ends].all() == m.is_accepting()
                assert masks[k, ends].any() == m.is_accepting()


def test_reuse_across_steps_equals_fresh_matcher():
    backend = bundled_backend()
    spec, docs = SPECS["schema"]
    draft = encode(backend, docs[0]) + [1] * 4
    rng = np.random.default_rng(0)
    reused = backend.matcher(spec)
    for _ in range(30):  # drafts that change in a few places per step, as argmax canvases do
        for pos in rng.integers(0, len(draft), rng.integers(0, 3)):
            draft[pos] = int(rng.choice([rng.integers(0, backend.vocab_size), encode(backend, docs[1])[pos % 9]]))
        np.testing.assert_array_equal(reused.draft_bitmask(draft), backend.matcher(spec).draft_bitmask(draft))


def test_bundled_tokenizer_valid_document_is_allowed_everywhere():
    backend = bundled_backend()
    spec, docs = SPECS["schema"]
    draft = encode(backend, docs[0]) + [6, 0, 3]
    masks = backend.matcher(spec).draft_masks(draft)
    assert masks[torch.arange(len(draft) - 2), torch.tensor(draft[:-2])].all()
    assert set(torch.nonzero(masks[-1]).flatten().tolist()) == {1, 6}  # after the end id: end ids only
    assert not masks[:, 4096:].any()  # V = 4,100 > 4,096 tokenizer entries


def test_finished_or_stopped_matcher_allows_only_end_ids():
    backend = tiny_backend()
    spec, docs = SPECS["choice"]
    matcher = backend.matcher(spec)
    matcher.consume(encode(backend, "green"))
    assert matcher.is_stopped() and matcher.is_accepting() and not matcher.is_finished()
    rows = canvas_masks(matcher, None, 4)
    assert all(set(torch.nonzero(r).flatten().tolist()) == {1, 5} for r in rows)
    matcher.consume([5, 7, 7])  # cut after the end id
    assert matcher.is_finished()
    assert matcher.draft_masks([9, 9]).sum(1).tolist() == [2, 2]


def test_first_step_masks_follow_forced_tokens():
    backend = tiny_backend()
    spec = SPECS["schema"][0]
    matcher = backend.matcher(spec)
    forced = matcher.forced_tokens()
    assert len(forced) >= 2 and '{"name":"'.startswith(backend.tokenizer.decode_str(forced))
    masks = canvas_masks(matcher, None, 16)
    assert torch.nonzero(masks[0]).flatten().tolist() == [forced[0]]
    assert all(masks[k, t] and masks[k].sum() < 5 for k, t in enumerate(forced))
    assert 0 < masks[len(forced)].sum() < masks[len(forced) + 1].sum()  # constrained, then free


def test_apply_masks_and_bitmask_agree():
    torch.manual_seed(0)
    masks = torch.rand(5, 77) < 0.3
    masks[:, 0] = True
    logits = torch.randn(5, 77)
    a = apply_masks(logits.clone(), masks)
    b = apply_bitmask(logits.clone(), bm.pack(masks))
    assert torch.equal(a, b)
    assert torch.isinf(a[~masks]).all() and torch.equal(a[masks], logits[masks])


@pytest.mark.parametrize("vocab", [1, 31, 32, 33, 300, 4100])
def test_pack_unpack_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    mask = rng.random((3, vocab)) < 0.5
    packed = bm.pack(mask)
    assert packed.shape == (3, bm.words(vocab)) and packed.dtype == np.int32
    assert torch.equal(bm.unpack(packed, vocab), torch.from_numpy(mask))
    tokens = rng.integers(0, vocab, 3)
    np.testing.assert_array_equal(bm.has_bits(packed, tokens), mask[np.arange(3), tokens])
    assert set(np.flatnonzero(bm.unpack(bm.from_ids([0, vocab - 1], vocab)[None], vocab)[0])) == {0, vocab - 1}
