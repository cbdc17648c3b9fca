"""Regex text -> syntax tree over Unicode code-point sets, and code-point ranges -> UTF-8 byte ranges.

The supported syntax is what JSON-schema translation and typical user regexes need: literals
(any Unicode), `.` (any character but newline), classes `[...]` with ranges, negation and escapes,
`\\d \\w \\s` and their negations as ASCII classes (JSON Schema's reading), `\\n \\t \\r \\f \\v \\0
\\xHH \\uHHHH \\x{H...}`, escaped punctuation, groups `(...)`, `(?:...)`, `(?P<n>...)`, `(?<n>...)`,
alternation, `? * + {m} {m,} {m,n}` (lazy forms mean the same language), and `^`/`$` at the very
start/end (matching is always whole-string). Anything else (look-around, back-references, `\\b`,
flags, nested class operations) raises ConstraintError naming the construct.
tests/test_constrain_regex.py compares the compiled automata with Python's `re.fullmatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dgemma.constrain.spec import ConstraintError

MAX_CODEPOINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)  # not encodable in UTF-8, never part of a set

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code-point ranges


@dataclass(frozen=True)
class Node:
    """op: "set" (ranges), "cat" (children), "alt" (children), "repeat" (child, lo, hi; hi None = unbounded)."""

    op: str
    ranges: Ranges = ()
    children: tuple[Node, ...] = ()
    lo: int = 0
    hi: int | None = 0


EMPTY = Node("cat")


def normalize(ranges: list[tuple[int, int]]) -> Ranges:
    """Sorted, merged, surrogates removed."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        for a, b in ((lo, min(hi, SURROGATES[0] - 1)), (max(lo, SURROGATES[1] + 1), hi)):
            if a > b:
                continue
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
    return tuple((a, b) for a, b in out)


def complement(ranges: Ranges) -> Ranges:
    out, nxt = [], 0
    for lo, hi in ranges:
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODEPOINT:
        out.append((nxt, MAX_CODEPOINT))
    return normalize(out)


DIGIT = normalize([(0x30, 0x39)])
WORD = normalize([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)])
SPACE = normalize([(0x09, 0x0D), (0x20, 0x20)])
DOT = complement(normalize([(0x0A, 0x0A)]))
_CLASS_ESCAPES = {"d": DIGIT, "w": WORD, "s": SPACE, "D": complement(DIGIT), "W": complement(WORD),
                  "S": complement(SPACE)}
_CHAR_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
_REFUSED_ESCAPES = {"b": "word boundaries (\\b)", "B": "word boundaries (\\B)", "A": "anchors (\\A)",
                    "z": "anchors (\\z)", "Z": "anchors (\\Z)", "G": "anchors (\\G)", "p": "Unicode classes (\\p)",
                    "P": "Unicode classes (\\P)", "k": "back-references (\\k)"}


def parse(pattern: str) -> Node:
    """The syntax tree of `pattern` (whole-string match)."""
    return _Parser(pattern).parse()


class _Parser:
    def __init__(self, pattern: str) -> None:
        self.p, self.i = pattern, 0

    def fail(self, what: str) -> ConstraintError:
        return ConstraintError(f"regex {self.p!r}: {what} (at offset {self.i})")

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def parse(self) -> Node:
        if self.peek() == "^":
            self.i += 1
        node = self.alternation()
        if self.peek() == "$" and self.i == len(self.p) - 1:
            self.i += 1
        if self.i != len(self.p):
            raise self.fail("unbalanced ')'" if self.peek() == ")" else f"unexpected {self.peek()!r}")
        return node

    def alternation(self) -> Node:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else Node("alt", children=tuple(branches))

    def concatenation(self) -> Node:
        items = []
        while self.peek() is not None and self.peek() not in "|)":
            if self.peek() == "$" and self.i == len(self.p) - 1:
                break
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else Node("cat", children=tuple(items))

    def quantified(self, node: Node) -> Node:
        while True:
            ch = self.peek()
            if ch in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[ch]
            elif ch == "{":
                lo, hi = self.braces()
            else:
                return node
            if self.peek() == "?":
                self.i += 1  # lazy: same language
            elif self.peek() == "+":
                raise self.fail("possessive quantifiers are not supported")
            node = Node("repeat", children=(node,), lo=lo, hi=hi)

    def braces(self) -> tuple[int, int | None]:
        end = self.p.find("}", self.i)
        body = self.p[self.i + 1:end] if end > 0 else ""
        parts = body.split(",")
        if end < 0 or len(parts) > 2 or not parts[0].strip().isdigit() or \
                (len(parts) == 2 and parts[1].strip() and not parts[1].strip().isdigit()):
            raise self.fail("'{' must start a repetition {m}, {m,} or {m,n}; write \\{ for a literal brace")
        lo = int(parts[0])
        hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1].strip() else None)
        if hi is not None and hi < lo:
            raise self.fail(f"repetition {{{body}}} has max < min")
        self.i = end + 1
        return lo, hi

    def atom(self) -> Node:
        ch = self.p[self.i]
        self.i += 1
        if ch == "(":
            return self.group()
        if ch == "[":
            return Node("set", ranges=self.char_class())
        if ch == ".":
            return Node("set", ranges=DOT)
        if ch == "\\":
            ranges = self.escape(in_class=False)
            return Node("set", ranges=ranges) if isinstance(ranges, tuple) else ranges
        if ch in "*+?{":
            raise self.fail(f"nothing to repeat before {ch!r}")
        if ch in "^$":
            raise self.fail(f"anchor {ch!r} is only supported at the very start (^) or end ($)")
        return Node("set", ranges=((ord(ch), ord(ch)),))

    def group(self) -> Node:
        if self.p.startswith("?:", self.i):
            self.i += 2
        elif self.p.startswith("?P<", self.i) or (self.p.startswith("?<", self.i) and self.p[self.i + 2:self.i + 3]
                                                  not in ("=", "!")):
            self.i = self.p.index(">", self.i) + 1 if ">" in self.p[self.i:] else len(self.p)
        elif self.peek() == "?":
            raise self.fail("look-around, flags and other (?...) groups are not supported")
        node = self.alternation()
        if self.peek() != ")":
            raise self.fail("missing ')'")
        self.i += 1
        return node

    def escape(self, in_class: bool) -> Ranges | Node:
        if self.i >= len(self.p):
            raise self.fail("trailing backslash")
        ch = self.p[self.i]
        self.i += 1
        if ch in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[ch]
        if ch in _CHAR_ESCAPES:
            return ((_CHAR_ESCAPES[ch],) * 2,)
        if ch in "xu":
            return ((self.hex_escape(ch),) * 2,)
        if ch in _REFUSED_ESCAPES:
            raise self.fail(f"{_REFUSED_ESCAPES[ch]} are not supported")
        if ch.isdigit():
            raise self.fail("back-references are not supported")
        if ch.isalnum():
            raise self.fail(f"unknown escape \\{ch}")
        return ((ord(ch), ord(ch)),)

    def hex_escape(self, kind: str) -> int:
        if kind == "x" and self.peek() == "{":
            end = self.p.find("}", self.i)
            digits, self.i = self.p[self.i + 1:end], end + 1
        else:
            n = 2 if kind == "x" else 4
            digits, self.i = self.p[self.i:self.i + n], self.i + n
        try:
            value = int(digits, 16)
        except ValueError:
            raise self.fail(f"bad \\{kind} escape {digits!r}") from None
        if value > MAX_CODEPOINT or SURROGATES[0] <= value <= SURROGATES[1]:
            raise self.fail(f"\\{kind}{digits} is not a Unicode scalar value")
        return value

    def char_class(self) -> Ranges:
        negate = self.peek() == "^"
        self.i += negate
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            ch = self.peek()
            if ch is None:
                raise self.fail("missing ']'")
            if ch == "]" and not first:
                self.i += 1
                break
            if ch == "[" or self.p[self.i:self.i + 2] in ("&&", "--", "~~"):  # Rust reads these as set syntax
                raise self.fail("nested classes and class set operations (&&, --, ~~) are not supported; "
                                "write \\[ for a literal bracket")
            lo = self.class_item()
            if isinstance(lo, tuple):  # \d and friends
                ranges.extend(lo)
            elif self.peek() == "-" and self.p[self.i + 1:self.i + 2] not in ("]", ""):
                self.i += 1
                hi = self.class_item()
                if isinstance(hi, tuple) or hi < lo:
                    raise self.fail("invalid range in character class")
                ranges.append((lo, hi))
            else:
                ranges.append((lo, lo))
            first = False
        result = normalize(ranges)
        return complement(result) if negate else result

    def class_item(self) -> int | Ranges:
        ch = self.p[self.i]
        self.i += 1
        if ch != "\\":
            return ord(ch)
        value = self.escape(in_class=True)
        if isinstance(value, Node):
            raise self.fail("unexpected escape in a character class")
        return value[0][0] if len(value) == 1 and value[0][0] == value[0][1] else value


def utf8_ranges(ranges: Ranges) -> list[list[tuple[int, int]]]:
    """Byte-range sequences whose union is exactly the UTF-8 encodings of the code points in `ranges`."""
    out: list[list[tuple[int, int]]] = []
    for lo, hi in ranges:
        for a, b in ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, MAX_CODEPOINT)):
            if max(lo, a) <= min(hi, b):
                _aligned(max(lo, a), min(hi, b), out)
    return out


def _aligned(lo: int, hi: int, out: list[list[tuple[int, int]]]) -> None:
    """Split [lo, hi] (same encoded length) until every continuation byte spans a full or exact range."""
    n = len(chr(lo).encode())
    for k in range(1, n):
        m = (1 << (6 * k)) - 1  # the low k continuation bytes
        if lo & ~m != hi & ~m:
            if lo & m:
                _aligned(lo, lo | m, out)
                _aligned((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _aligned(lo, (hi & ~m) - 1, out)
                _aligned(hi & ~m, hi, out)
                return
    a, b = chr(lo).encode(), chr(hi).encode()
    out.append([(a[i], b[i]) for i in range(n)])
