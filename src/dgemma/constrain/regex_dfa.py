"""Regex -> minimal byte-level DFA (exact mode's automaton before it is lifted to tokens).

Pipeline: `regex_parse.parse` (code-point sets) -> Thompson NFA over bytes (each set expanded to its
UTF-8 byte-range sequences, so non-ASCII classes and negations are exact) -> subset construction
over byte classes (bytes no transition distinguishes share a column) -> Moore partition refinement
in numpy -> `ByteDFA` with one explicit dead state. Written here rather than taken from interegular:
we need bytes (tokens are byte strings, not characters), and subset construction over byte classes
is small. Sizes are capped (`max_states`) with a ConstraintError that says so.
tests/test_constrain_regex.py checks `ByteDFA.matches` against `re.fullmatch` on generated strings.

Shapes: Q states (dead included), 256 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dgemma.constrain.regex_parse import Node, parse, utf8_ranges
from dgemma.constrain.spec import ConstraintError

MAX_NFA_STATES = 400_000


@dataclass(frozen=True)
class ByteDFA:
    table: np.ndarray  # (Q, 256) int32: next state per byte
    accepting: np.ndarray  # (Q,) bool
    start: int
    dead: int  # the state with no way to accept (it loops on every byte)

    @property
    def num_states(self) -> int:
        return len(self.accepting)

    def run(self, data: bytes, state: int | None = None) -> int:
        q = self.start if state is None else state
        for b in data:
            q = int(self.table[q, b])
        return q

    def matches(self, data: bytes | str) -> bool:
        return bool(self.accepting[self.run(data.encode() if isinstance(data, str) else data)])

    def live(self) -> np.ndarray:
        """(Q,) bool: an accepting state is reachable (co-accessible)."""
        return np.arange(self.num_states) != self.dead


def compile_regex(pattern: str, max_states: int = 20_000) -> ByteDFA:
    """The minimal DFA of the bytes (UTF-8) of the strings `pattern` matches in full."""
    return determinize(_Nfa.from_node(parse(pattern)), max_states, pattern)


class _Nfa:
    """States with byte-range edges and epsilon edges; one start, one accepting state."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int, int]]] = []  # (byte_lo, byte_hi, target)
        self.eps: list[list[int]] = []
        self.start = self.accept = 0

    @classmethod
    def from_node(cls, node: Node) -> _Nfa:
        nfa = cls()
        nfa.start, nfa.accept = nfa.build(node)
        return nfa

    def new(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise ConstraintError(f"regex is too large for exact mode (more than {MAX_NFA_STATES} NFA states); "
                                  "use mode='default'")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def build(self, node: Node) -> tuple[int, int]:
        """(entry, exit) states of a fragment for `node`."""
        entry = self.new()
        if node.op == "set":
            exit_ = self.new()
            for seq in utf8_ranges(node.ranges):
                q = entry
                for i, (lo, hi) in enumerate(seq):
                    nxt = exit_ if i == len(seq) - 1 else self.new()
                    self.edges[q].append((lo, hi, nxt))
                    q = nxt
            return entry, exit_
        if node.op in ("cat", "alt") and (node.op == "cat" or not node.children):
            q = entry
            for child in node.children:
                a, b = self.build(child)
                self.eps[q].append(a)
                q = b
            return entry, q
        if node.op == "alt":
            exit_ = self.new()
            for child in node.children:
                a, b = self.build(child)
                self.eps[entry].append(a)
                self.eps[b].append(exit_)
            return entry, exit_
        return self.build_repeat(entry, node)

    def build_repeat(self, entry: int, node: Node) -> tuple[int, int]:
        child, q = node.children[0], entry
        for _ in range(node.lo):
            a, b = self.build(child)
            self.eps[q].append(a)
            q = b
        if node.hi is None:  # a loop back to a fresh copy
            a, b = self.build(child)
            self.eps[q].append(a)
            self.eps[b].append(a)
            exit_ = self.new()
            self.eps[q].append(exit_)
            self.eps[b].append(exit_)
            return entry, exit_
        exit_ = self.new()
        for _ in range(node.hi - node.lo):  # optional copies, each may end the repetition
            self.eps[q].append(exit_)
            a, b = self.build(child)
            self.eps[q].append(a)
            q = b
        self.eps[q].append(exit_)
        return entry, exit_


def _byte_classes(nfa: _Nfa) -> tuple[np.ndarray, np.ndarray]:
    """(256,) class of every byte and (K,) a representative byte per class: bytes that no edge tells apart."""
    cuts = np.zeros(257, dtype=bool)
    for edges in nfa.edges:
        for lo, hi, _ in edges:
            cuts[lo] = cuts[hi + 1] = True
    cuts[0] = False
    byte_class = np.cumsum(cuts[:256]).astype(np.int64)
    reps = np.flatnonzero(np.r_[True, byte_class[1:] != byte_class[:-1]])
    return byte_class, reps


class _Closures:
    """Epsilon closures, memoized per NFA state and per target set."""

    def __init__(self, nfa: _Nfa) -> None:
        self.nfa = nfa
        self.single: dict[int, frozenset[int]] = {}
        self.sets: dict[frozenset[int], frozenset[int]] = {}

    def of_state(self, q: int) -> frozenset[int]:
        if q not in self.single:
            stack, seen = [q], {q}
            while stack:
                for t in self.nfa.eps[stack.pop()]:
                    if t not in seen:
                        seen.add(t)
                        stack.append(t)
            self.single[q] = frozenset(seen)
        return self.single[q]

    def of_set(self, targets: frozenset[int]) -> frozenset[int]:
        if targets not in self.sets:
            self.sets[targets] = frozenset().union(*(self.of_state(t) for t in targets))
        return self.sets[targets]


def determinize(nfa: _Nfa, max_states: int, pattern: str = "") -> ByteDFA:
    byte_class, reps = _byte_classes(nfa)
    # per NFA state: its targets by byte class (edges are unions of whole classes)
    moves: list[list[tuple[int, int]]] = []
    for edges in nfa.edges:
        moves.append([(c, t) for lo, hi, t in edges for c in range(int(byte_class[lo]), int(byte_class[hi]) + 1)])
    closures = _Closures(nfa)
    dead_set: frozenset[int] = frozenset()
    start = closures.of_state(nfa.start)
    index = {dead_set: 0, start: 1}
    order, rows = [dead_set, start], []
    while len(rows) < len(order):
        targets: dict[int, set[int]] = {}
        for q in order[len(rows)]:
            for c, t in moves[q]:
                targets.setdefault(c, set()).add(t)
        row = [0] * len(reps)
        for c, ts in targets.items():
            nxt = closures.of_set(frozenset(ts))
            if nxt not in index:
                if len(order) >= max_states:
                    raise ConstraintError(f"regex {pattern[:80]!r} needs more than {max_states} DFA states "
                                          "for exact mode; use mode='default'")
                index[nxt] = len(order)
                order.append(nxt)
            row[c] = index[nxt]
        rows.append(row)
    class_table = np.array(rows, dtype=np.int32).reshape(len(order), len(reps))
    accepting = np.array([nfa.accept in s for s in order])
    dfa = minimize(class_table, accepting, start=1, dead=0)
    return ByteDFA(table=np.ascontiguousarray(dfa.table[:, byte_class]), accepting=dfa.accepting,
                   start=dfa.start, dead=dfa.dead)


def minimize(table: np.ndarray, accepting: np.ndarray, start: int, dead: int) -> ByteDFA:
    """Moore refinement over the (Q, K) table (K input classes): states merge until no input separates
    them; states that cannot reach an accepting state all merge with `dead`."""
    block = _refine(table, accepting, exact=False)
    if not _is_congruence(block, table, accepting):  # a hash collision merged two states: redo exactly
        block = _refine(table, accepting, exact=True)
    count = int(block.max()) + 1
    reps = np.zeros(count, dtype=np.int64)
    reps[block[::-1]] = np.arange(len(block))[::-1]  # first state of each block
    # renumber: start first, dead last, so tables read the same way every time
    order = [int(block[start])] + [b for b in range(count) if b not in (block[start], block[dead])]
    if block[dead] != block[start]:
        order.append(int(block[dead]))
    remap = np.full(count, -1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    new_table = remap[block[table[reps[order]]]].astype(np.int32)
    return ByteDFA(table=new_table, accepting=accepting[reps[order]], start=0, dead=int(remap[block[dead]]))


def _refine(table: np.ndarray, accepting: np.ndarray, exact: bool) -> np.ndarray:
    weights = np.random.default_rng(0).integers(1, 2**62, size=table.shape[1] + 1, dtype=np.int64)
    block = accepting.astype(np.int64)
    count = len(np.unique(block))
    while True:
        signature = np.concatenate([block[:, None], block[table]], axis=1)
        if exact:
            _, block = np.unique(signature, axis=0, return_inverse=True)
        else:  # one 64-bit key per row (wrapping arithmetic); checked by _is_congruence afterwards
            _, block = np.unique(signature @ weights, return_inverse=True)
        block = block.reshape(-1)
        new_count = int(block.max()) + 1
        if new_count == count:
            return block
        count = new_count


def _is_congruence(block: np.ndarray, table: np.ndarray, accepting: np.ndarray) -> bool:
    """Merged states agree on acceptance and on the block of every successor (so they are equivalent)."""
    reps = np.zeros(int(block.max()) + 1, dtype=np.int64)
    reps[block] = np.arange(len(block))
    rep = reps[block]
    return bool((accepting == accepting[rep]).all() and (block[table] == block[table[rep]]).all())


def intersects(a: ByteDFA, b: ByteDFA) -> bool:
    """Some byte string is accepted by both (breadth-first search over state pairs)."""
    seen = {(a.start, b.start)}
    frontier = [(a.start, b.start)]
    while frontier:
        nxt = []
        for qa, qb in frontier:
            if a.accepting[qa] and b.accepting[qb]:
                return True
            if qa == a.dead or qb == b.dead:
                continue
            for pair in set(zip(a.table[qa].tolist(), b.table[qb].tolist(), strict=True)):
                if pair not in seen:
                    seen.add(pair)
                    nxt.append(pair)
        frontier = nxt
    return False
