"""The regex -> byte DFA compiler against Python's `re.fullmatch` (ASCII \\d \\w \\s), UTF-8 exactness,
`regex_escape`, refusals with the construct named, and DFA intersection."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dgemma.constrain import ConstraintError
from dgemma.constrain.regex_dfa import compile_regex, intersects
from dgemma.constrain.text import regex_escape

PATTERNS = [
    r"[a-z]{1,3}-\d{2,4}", r"(ab|c)*d?", r"[^a]é.", r"\w+@\w+\.(com|org)",
    r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", r"[\x00-\x7f]*ü+", r"(?:x|yz){2,}", r"[^\s\d]{0,3}",
    r"a.c", r"[α-ω]+[^α-ω]", r"\$\(\)\[\]\{\}\.\*\+\?\|\\", r"(a|)b", r"[\u00e0-\u00ff\u4e00-\u4e10]{1,2}",
    r"((a|b){2}c?)+", r"[-a-c]+", r"[a-]", r"\S\W\D", r"^abc$", r"(?P<x>a)(?:b)", r"x*?y+?", "😀{2}",
    r'"([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4}){0,5}"', r"[^\n]\n[\t ]", r"\u00e9|😀",
]
ALPHABET = list("abcdexyz-_.@0123456789 \t\n\"\\$()[]{}*+?|éüαωβ😀中") + ["\u00e0", "\u4e00", "\u4e11", "\x00"]


def random_walk(dfa, rng, max_len=14) -> bytes:
    """A random accepted byte string (walks only through states that can still accept)."""
    live = dfa.live()
    q, out = dfa.start, bytearray()
    for _ in range(4 * max_len):
        if dfa.accepting[q] and (len(out) >= max_len or rng.random() < 0.25):
            break
        choices = np.flatnonzero(live[dfa.table[q]])
        if not len(choices):
            break
        b = int(rng.choice(choices))
        out.append(b)
        q = int(dfa.table[q, b])
    return bytes(out) if dfa.accepting[q] else b""


@pytest.mark.parametrize("pattern", PATTERNS)
def test_dfa_agrees_with_python_re(pattern):
    dfa = compile_regex(pattern)
    rng = np.random.default_rng(len(pattern))
    accepted = [random_walk(dfa, rng) for _ in range(150)]
    for data in accepted:
        text = data.decode()  # every accepted byte string is valid UTF-8
        if dfa.matches(data):
            assert re.fullmatch(pattern, text, re.ASCII), (pattern, text)
    pieces = ALPHABET + [d.decode() for d in accepted if d]
    for _ in range(600):
        text = "".join(rng.choice(pieces) for _ in range(rng.integers(0, 5)))
        assert dfa.matches(text) == bool(re.fullmatch(pattern, text, re.ASCII)), (pattern, text)


@pytest.mark.parametrize("data", [b"\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                  b"\xc0\xaf"])
def test_invalid_utf8_never_matches(data):
    for pattern in [r".*", r"[^a]*", r"\W*", r"[\x00-\x{10FFFF}]*"]:
        assert not compile_regex(pattern).matches(data)


def test_utf8_boundaries_are_exact():
    dfa = compile_regex(r"[\x7f-\x{800}]")
    for cp in [0x7E, 0x7F, 0x80, 0x7FF, 0x800, 0x801, 0xFFFF]:
        assert dfa.matches(chr(cp)) == (0x7F <= cp <= 0x800)
    assert compile_regex(r"\x{1F600}").matches("😀")
    dfa = compile_regex(r"[\x{FFFF}-\x{10000}\x{10FFFF}]")
    assert [dfa.matches(chr(cp)) for cp in (0xFFFE, 0xFFFF, 0x10000, 0x10001, 0x10FFFF)] == [0, 1, 1, 0, 1]


def test_regex_escape_matches_exactly_itself():
    rng = np.random.default_rng(0)
    for _ in range(40):
        text = "".join(rng.choice(ALPHABET + list("^$/~&#\x7f\x01")) for _ in range(rng.integers(0, 8)))
        dfa = compile_regex(regex_escape(text))
        assert dfa.matches(text)
        assert re.fullmatch(regex_escape(text), text)
        assert not dfa.matches(text + "a") and not dfa.matches(text[:-1] if text else "a")


def test_minimal_and_canonical():
    assert compile_regex(r"(a|b)*").num_states == 2  # one looping state plus the dead state
    assert compile_regex(r"a{3}").num_states == 5
    a, b = compile_regex(r"(x|y)+z"), compile_regex(r"(y|x)(x|y)*z")
    assert np.array_equal(a.table, b.table) and np.array_equal(a.accepting, b.accepting)


def test_intersects():
    assert intersects(compile_regex(r"[a-c]+"), compile_regex(r"c[x-z]?"))
    assert not intersects(compile_regex(r"-?[0-9]+"), compile_regex(r'"[^"]*"'))
    assert not intersects(compile_regex(r"ab"), compile_regex(r"abc"))


@pytest.mark.parametrize("pattern, message", [
    ("a(b", "missing '\\)'"), ("a)", "unbalanced"), ("(?=a)", "look-around"), (r"\1", "back-references"),
    (r"\bx", "word boundaries"), ("a{2,1}", "max < min"), ("[z-a]", "invalid range"), ("*a", "nothing to repeat"),
    ("[abc", "missing '\\]'"), (r"\p{L}", "Unicode classes"), ("(?i)a", "flags"), ("a{x}", "repetition"),
    ("a^b", "anchor"), (r"[a&&b]", "set operations"), (r"\q", "unknown escape"),
])
def test_refusals_name_the_construct(pattern, message):
    with pytest.raises(ConstraintError, match=message):
        compile_regex(pattern)


def test_state_cap():
    assert compile_regex(r"[ab]{0,20}c[ab]{0,20}").num_states == 43
    with pytest.raises(ConstraintError, match="more than 30 DFA states"):
        compile_regex(r"[ab]{0,20}c[ab]{0,20}", max_states=30)
