"""A byte DFA lifted to the vocabulary, with tokens grouped into classes (exact mode's automaton).

`TokenAutomaton.build` computes each token's action next[:, t] on all live DFA states as a composition
of byte columns, memoizing every (prefix action, byte class) step, and tokens with equal actions form
one class (actions are compared exactly, as bytes). The end ids form one more class, leading from each
accepting state to an absorbing DONE state. Special tokens, ids without a tokenizer entry, empty
tokens and tokens valid nowhere are in no class (never allowed). States that no token path leads to
acceptance from are dropped, so every state is live (co-accessible). States x classes is capped.
`AutomatonMatcher` gives the same `Matcher` protocol as llguidance's (tests/test_constrain_exact.py
checks masks, consume and forced tokens on it).

Shapes: S states (live DFA states + DONE), K classes (end class last), V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dgemma.constrain import bitmask
from dgemma.constrain.bitmask import check_draft
from dgemma.constrain.regex_dfa import ByteDFA, compile_regex
from dgemma.constrain.spec import ConstraintError, ConstraintSpec
from dgemma.constrain.text import regex_escape

MAX_STATES_X_CLASSES = 4_000_000


@dataclass
class TokenAutomaton:
    token_class: torch.Tensor  # (V,) int64: class of each id, -1 = never allowed
    class_next: torch.Tensor  # (S, K) int64: next state, -1 = not allowed
    accepting: torch.Tensor  # (S,) bool: the output may end here (DONE included)
    start: int
    done: int  # absorbing state after an end id
    end_class: int
    end_ids: tuple[int, ...]

    @property
    def num_states(self) -> int:
        return self.class_next.shape[0]

    @property
    def num_classes(self) -> int:
        return self.class_next.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.token_class.shape[0]

    def to(self, device: torch.device | str) -> TokenAutomaton:
        return TokenAutomaton(self.token_class.to(device), self.class_next.to(device), self.accepting.to(device),
                              self.start, self.done, self.end_class, self.end_ids)

    @classmethod
    def from_spec(cls, spec: ConstraintSpec, token_bytes: Sequence[bytes | None], end_ids: Sequence[int],
                  max_size: int = MAX_STATES_X_CLASSES) -> TokenAutomaton:
        return cls.build(compile_regex(spec_regex(spec)), token_bytes, end_ids, max_size)

    @classmethod
    def build(cls, dfa: ByteDFA, token_bytes: Sequence[bytes | None], end_ids: Sequence[int],
              max_size: int = MAX_STATES_X_CLASSES) -> TokenAutomaton:
        end_ids = tuple(int(e) for e in end_ids)
        live = np.flatnonzero(dfa.live())
        funcs, token_fn = _lift(dfa, live, token_bytes, end_ids)  # (F, Q_live) DFA states, (V,) function or -1
        # a live-state index per DFA state (dead -> -1); distinct functions stay distinct under it
        index = np.full(dfa.num_states, -1, dtype=np.int64)
        index[live] = np.arange(len(live))
        funcs = index[funcs]
        used = np.unique(token_fn[token_fn >= 0])
        used = used[(funcs[used] >= 0).any(axis=1)]  # a class valid from at least one state
        renum = np.full(len(funcs), -1, dtype=np.int64)
        renum[used] = np.arange(len(used))
        token_class = np.where(token_fn >= 0, renum[np.maximum(token_fn, 0)], -1)
        n_classes = len(used) + 1
        end_class, done = n_classes - 1, len(live)
        token_class[list(end_ids)] = end_class
        table = np.full((len(live) + 1, n_classes), -1, dtype=np.int64)
        table[:len(live), :-1] = funcs[used].T
        accepting = np.r_[dfa.accepting[live], True]
        table[np.flatnonzero(accepting), end_class] = done  # DONE also loops on end ids
        if table.size > max_size:
            raise ConstraintError(f"exact-mode automaton has {table.shape[0]} states x {n_classes} token classes "
                                  f"= {table.size} > {max_size}; use mode='default'")
        start = int(index[dfa.start])
        table, accepting, start, done = _prune(table, accepting, start, done)
        if start < 0:
            raise ConstraintError("no sequence of this vocabulary's tokens is in the constraint's language")
        return cls(torch.from_numpy(token_class), torch.from_numpy(table), torch.from_numpy(accepting), start,
                   done, end_class, end_ids)

    def allowed_classes(self, state: int) -> torch.Tensor:
        return self.class_next[state] >= 0

    def tokens_to_done(self) -> torch.Tensor:
        """(S,) long: the fewest tokens from each state to DONE (the end id included); a large number where DONE
        cannot be reached. Breadth-first over the class edges, backwards from DONE."""
        table = self.class_next.cpu()
        big = table.shape[0] + 1
        dist = torch.full((table.shape[0],), big, dtype=torch.long)
        dist[self.done] = 0
        for d in range(1, big):
            reach = ((table >= 0) & (dist[table.clamp(min=0)] == d - 1)).any(dim=1) & (dist == big)
            if not reach.any():
                break
            dist[reach] = d
        return dist.to(self.class_next.device)

    def token_mask(self, state: int) -> torch.Tensor:
        """(V,) bool: ids allowed in `state`."""
        ok = self.allowed_classes(state)
        return torch.where(self.token_class >= 0, ok[self.token_class.clamp(min=0)], False)

    def step(self, state: int, token: int) -> int:
        c = int(self.token_class[token])
        return -1 if c < 0 or state < 0 else int(self.class_next[state, c])


def spec_regex(spec: ConstraintSpec) -> str:
    """The regex of an exact-mode spec."""
    if spec.kind == "regex":
        return spec.value
    if spec.kind == "choice":
        return "|".join(regex_escape(c) for c in spec.value)
    from dgemma.constrain.json_regex import schema_to_regex

    return schema_to_regex(spec.schema(), spec.whitespace)


def _lift(dfa: ByteDFA, live: np.ndarray, token_bytes: Sequence[bytes | None], end_ids: tuple[int, ...]
          ) -> tuple[np.ndarray, np.ndarray]:
    """The action of every token on the live states: (F, Q_live) distinct functions (DFA state reached
    from each live state) and (V,) the function of each id (-1: special, empty or an end id).

    A token's function is the composition of its bytes' columns. Tokens are walked byte by byte, and
    each (function so far, byte class) composition is computed once (an O(Q) gather) and memoized, so
    the cost is one dict step per byte of the vocabulary plus one gather per distinct composition,
    instead of Q gathers per byte."""
    _, rep, inverse = np.unique(dfa.table, axis=1, return_index=True, return_inverse=True)
    byte_table = dfa.table[:, rep]  # (Q, B): one column per byte class
    n_classes = byte_table.shape[1]
    classes_of = inverse.reshape(-1).astype(np.int64)
    funcs: list[np.ndarray] = [live.astype(np.int32)]
    index: dict[bytes, int] = {funcs[0].tobytes(): 0}
    memo: dict[int, int] = {}
    ends = set(end_ids)
    token_fn = np.full(len(token_bytes), -1, dtype=np.int64)
    for t, data in enumerate(token_bytes):
        if not data or t in ends:
            continue
        f = 0
        for c in classes_of[np.frombuffer(data, dtype=np.uint8)].tolist():
            key = f * n_classes + c
            g = memo.get(key)
            if g is None:
                vec = byte_table[funcs[f], c]
                g = index.setdefault(vec.tobytes(), len(funcs))
                if g == len(funcs):
                    funcs.append(vec)
                memo[key] = g
            f = g
        token_fn[t] = f
    return np.stack(funcs), token_fn


def _prune(table: np.ndarray, accepting: np.ndarray, start: int, done: int
           ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Keep the states from which some token path reaches DONE (token-level co-accessibility)."""
    live = np.zeros(len(table), dtype=bool)
    live[done] = True
    while True:
        grow = live | (np.where(table >= 0, live[np.maximum(table, 0)], False)).any(axis=1)
        if (grow == live).all():
            break
        live = grow
    index = np.full(len(table), -1, dtype=np.int64)
    index[live] = np.arange(int(live.sum()))
    pruned = np.where(table >= 0, index[np.maximum(table, 0)], -1)[live]
    return pruned, accepting[live], int(index[start]), int(index[done])


class AutomatonMatcher:
    """`Matcher` over a `TokenAutomaton`: the state is one integer."""

    def __init__(self, automaton: TokenAutomaton, state: int | None = None) -> None:
        self.automaton = automaton
        self.vocab_size, self.end_ids = automaton.vocab_size, automaton.end_ids
        self.state = automaton.start if state is None else state
        self._rows: dict[int, np.ndarray] = {}
        self._free = bitmask.pack((automaton.token_class >= 0)[None])[0]
        self._end = bitmask.from_ids(list(automaton.end_ids), self.vocab_size)

    def consume(self, tokens: Sequence[int]) -> int:
        state = self.state
        for i, t in enumerate(int(x) for x in tokens):
            if state == self.automaton.done and t in self.end_ids:
                return i + 1
            nxt = self.automaton.step(state, t)
            if nxt < 0:
                if t in self.end_ids:
                    raise ConstraintError(f"end id {t} at position {i} but the grammar does not accept there")
                raise ConstraintError(f"token {t} at position {i} is not allowed by the automaton")
            state = nxt
            if state == self.automaton.done:
                self.state = state
                return i + 1
        self.state = state
        return len(tokens)

    def is_accepting(self) -> bool:
        return bool(self.automaton.accepting[self.state])

    def is_finished(self) -> bool:
        return self.state == self.automaton.done

    def is_stopped(self) -> bool:
        ok = self.automaton.allowed_classes(self.state)
        return bool(ok[self.automaton.end_class]) and int(ok.sum()) == 1

    @property
    def error(self) -> str | None:
        return None

    def copy(self) -> AutomatonMatcher:
        twin = AutomatonMatcher(self.automaton, self.state)
        twin._rows = self._rows  # rows depend on the state only: share the cache
        return twin

    def forced_tokens(self, limit: int = 256) -> list[int]:
        """The tokens while exactly one token is allowed (weaker than llguidance's forced bytes: where
        several tokenizations of the forced text exist, none is returned)."""
        out, state = [], self.state
        while len(out) < limit:
            mask = self.automaton.token_mask(state)
            if int(mask.sum()) != 1:
                break
            token = int(mask.nonzero()[0, 0])
            if token in self.end_ids:
                break
            out.append(token)
            state = self.automaton.step(state, token)
        return out

    def row(self, state: int) -> np.ndarray:
        if state not in self._rows:
            self._rows[state] = bitmask.pack(self.automaton.token_mask(state)[None])[0]
        return self._rows[state]

    def draft_bitmask(self, draft: Sequence[int], n_rows: int | None = None) -> np.ndarray:
        draft = check_draft(draft, self.vocab_size)
        n_rows = len(draft) if n_rows is None else n_rows
        out = np.empty((n_rows, bitmask.words(self.vocab_size)), dtype=np.int32)
        state, fill = self.state, None
        for k in range(n_rows):
            if fill is not None:
                out[k:] = fill
                break
            out[k] = self.row(state) if state != self.automaton.done else self._end
            if k >= len(draft):
                fill = self._free
                continue
            nxt = self.automaton.step(state, int(draft[k]))
            if nxt < 0:
                fill = self._free
            elif int(draft[k]) in self.end_ids:
                fill = self._end
            state = nxt
        return out

    def draft_masks(self, draft: Sequence[int], n_rows: int | None = None) -> torch.Tensor:
        return bitmask.unpack(self.draft_bitmask(draft, n_rows), self.vocab_size)
