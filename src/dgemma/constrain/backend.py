"""Grammar backends: a `Matcher` per request that follows the committed tokens and gives token masks.

`GrammarBackend` / `Matcher` are the small protocols the sampler sees (another library, e.g.
xgrammar, can implement them); `LLGuidanceBackend` is the llguidance one (JSON Schema, regex,
choice, Lark; one `LLTokenizer` per (tokenizer, V, end ids), cached). Exact-mode specs get a
`dgemma.constrain.automaton.AutomatonMatcher` with the same protocol.

Draft masks (the invariant tests/test_constrain_masks.py checks against a brute-force matcher):
row k = the tokens allowed at position k given draft[:k]. A row is never empty. An end id is allowed
only where the grammar accepts. After the first end id in the draft, rows allow exactly the end ids.
After the first draft token f that is not allowed, rows f+1.. are "free": every token of the
tokenizer that is not special, plus the end ids (the state there is unknown; the next step masks them
along the new draft). Ids without a tokenizer entry (V may exceed the tokenizer) are never allowed.
Rows before the first position where the draft changed since the last call are reused.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import llguidance as llg
import llguidance.numpy as llg_numpy
import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from dgemma.constrain import bitmask
from dgemma.constrain.bitmask import check_draft
from dgemma.constrain.spec import ConstraintError, ConstraintSpec
from dgemma.constrain.text import regex_escape

log = logging.getLogger(__name__)


class Matcher(Protocol):
    """Grammar state of one request: the committed tokens so far, and masks for what may follow."""

    vocab_size: int
    end_ids: tuple[int, ...]

    def consume(self, tokens: Sequence[int]) -> int:
        """Advance over committed tokens up to and including the first end id; returns how many were
        consumed. Raises ConstraintError (state unchanged) if a token is not allowed."""

    def is_accepting(self) -> bool: ...

    def is_stopped(self) -> bool:
        """Only end ids may follow (the grammar cannot be extended, or an end id was consumed)."""

    def is_finished(self) -> bool:
        """An end id has been consumed."""

    @property
    def error(self) -> str | None: ...

    def copy(self) -> Matcher: ...

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (possibly none)."""

    def draft_bitmask(self, draft: Sequence[int], n_rows: int | None = None) -> np.ndarray:
        """(n_rows, ceil(V/32)) int32 packed masks along `draft` (module docstring); n_rows defaults to
        len(draft); rows past len(draft) are free."""

    def draft_masks(self, draft: Sequence[int], n_rows: int | None = None) -> torch.Tensor:
        """`draft_bitmask` unpacked to (n_rows, V) bool."""


class GrammarBackend(Protocol):
    vocab_size: int
    end_ids: tuple[int, ...]

    def check(self, spec: ConstraintSpec) -> None:
        """Raise ConstraintError if `spec` cannot be compiled."""

    def matcher(self, spec: ConstraintSpec) -> Matcher: ...


_BACKENDS: dict[tuple[str, int, tuple[int, ...]], LLGuidanceBackend] = {}


def tokenizer_json(tokenizer: Any) -> str:
    """The `tokenizer.json` text of a dgemma Tokenizer, a `tokenizers.Tokenizer`, a path, or the text,
    always as the `tokenizers` library serializes it (so every route gives one cache key)."""
    inner = getattr(tokenizer, "_tok", tokenizer)  # dgemma.tokenizer.Tokenizer wraps a tokenizers.Tokenizer
    if hasattr(inner, "to_str"):
        return inner.to_str()
    if isinstance(tokenizer, os.PathLike) or (isinstance(tokenizer, str) and not tokenizer.lstrip().startswith("{")):
        tokenizer = Path(tokenizer).read_text()
    if isinstance(tokenizer, str):
        return HFTokenizer.from_str(tokenizer).to_str()
    raise TypeError(f"cannot read a tokenizer from {type(tokenizer).__name__}")


class LLGuidanceBackend:
    """llguidance for one model: its tokenizer, logits width V and end ids."""

    def __init__(self, tokenizer_text: str, vocab_size: int, end_ids: Sequence[int]) -> None:
        end_ids = tuple(int(e) for e in end_ids)
        if not end_ids or any(not 0 <= e < vocab_size for e in end_ids):
            raise ValueError(f"end ids must be a non-empty list of ids in [0, {vocab_size}), got {list(end_ids)}")
        self.vocab_size, self.end_ids = vocab_size, end_ids
        try:
            self.tokenizer = llg.LLTokenizer(tokenizer_text, n_vocab=vocab_size, eos_token=list(end_ids))
        except Exception as exc:  # llguidance raises plain ValueError/RuntimeError with its own text
            raise ValueError(f"llguidance cannot use this tokenizer with vocab size {vocab_size}: {exc}") from None
        self.executor = llg.LLExecutor()
        self.limits = llg.LLParserLimits(verbose_errors=False)
        special = np.array([self.tokenizer.is_special_token(t) for t in range(vocab_size)])
        free = ~special
        free[list(end_ids)] = True
        self.free_row = bitmask.pack(free[None])[0]  # what rows after an invalid draft token allow
        self.end_row = bitmask.from_ids(list(end_ids), vocab_size)
        self._grammars: dict[str, str] = {}
        self._automata: dict[str, Any] = {}
        self._token_bytes: list[bytes | None] | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int, end_ids: Sequence[int]) -> LLGuidanceBackend:
        """The backend for (tokenizer, V, end ids), built once per process (seconds at 262k tokens). Hold
        on to it: each call serializes and hashes the tokenizer to find the cached one."""
        text = tokenizer_json(tokenizer)
        key = (hashlib.sha256(text.encode()).hexdigest(), vocab_size, tuple(int(e) for e in end_ids))
        if key not in _BACKENDS:
            _BACKENDS[key] = cls(text, vocab_size, end_ids)
        return _BACKENDS[key]

    def grammar(self, spec: ConstraintSpec) -> str:
        """The llguidance grammar of `spec`, checked against this tokenizer (cached)."""
        key = spec.key()
        if key not in self._grammars:
            grammar = llguidance_grammar(spec)
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer,
                                                                             limits=self.limits)
            if is_error:
                raise ConstraintError(f"{spec.kind} not supported: {messages[0].strip()}")
            for message in messages:
                log.warning("%s constraint: %s", spec.kind, message)
            self._grammars[key] = grammar
        return self._grammars[key]

    def check(self, spec: ConstraintSpec) -> None:
        if spec.mode == "exact":
            self.automaton(spec)
        else:
            self.grammar(spec)

    def token_bytes(self) -> list[bytes | None]:
        """Bytes of every id below V; None for special tokens and ids without a tokenizer entry."""
        if self._token_bytes is None:
            tok = self.tokenizer
            self._token_bytes = [None if tok.is_special_token(t) else tok.decode_bytes([t])
                                 for t in range(self.vocab_size)]
        return self._token_bytes

    def automaton(self, spec: ConstraintSpec) -> Any:
        """The token automaton of an exact-mode spec (cached)."""
        from dgemma.constrain.automaton import TokenAutomaton  # exact mode only

        key = spec.key()
        if key not in self._automata:
            self._automata[key] = TokenAutomaton.from_spec(spec, self.token_bytes(), self.end_ids)
        return self._automata[key]

    def matcher(self, spec: ConstraintSpec) -> Matcher:
        if spec.mode == "exact":
            from dgemma.constrain.automaton import AutomatonMatcher

            return AutomatonMatcher(self.automaton(spec))
        inner = llg.LLMatcher(self.tokenizer, self.grammar(spec), log_level=0, limits=self.limits)
        if inner.is_error():
            raise ConstraintError(f"{spec.kind} not supported: {inner.get_error()}")
        return LLGuidanceMatcher(self, inner)


def llguidance_grammar(spec: ConstraintSpec) -> str:
    """The llguidance grammar text of a spec (not yet checked)."""
    if spec.kind in ("json_schema", "json_object"):
        # overrides beat the schema's own "x-guidance": the spec decides whitespace, and unknown
        # keywords are always refused (lenient would ignore them silently)
        options = {"whitespace_flexible": spec.whitespace == "flexible", "lenient": False}
        return llg.LLMatcher.grammar_from_json_schema(spec.schema(), overrides=options)
    if spec.kind == "regex":
        return _regex_grammar(spec.value)
    if spec.kind == "choice":
        return _regex_grammar("|".join(regex_escape(c) for c in spec.value))
    return llg.LLMatcher.grammar_from_lark(spec.value)


def _regex_grammar(regex: str) -> str:
    # \d \w \s as ASCII classes, as JSON Schema and the exact-mode compiler read them
    return llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(regex, 'dws')}/")


class LLGuidanceMatcher:
    """`Matcher` over an `llguidance.LLMatcher`."""

    def __init__(self, backend: LLGuidanceBackend, inner: llg.LLMatcher) -> None:
        self.backend, self._m = backend, inner
        self.vocab_size, self.end_ids = backend.vocab_size, backend.end_ids
        self._finished = False
        self._prev: tuple[np.ndarray, np.ndarray] | None = None  # (path, rows) of the last draft call

    def consume(self, tokens: Sequence[int]) -> int:
        toks = _cut_at_end([int(t) for t in tokens], self.end_ids)
        if not toks:
            return 0
        if self._finished:
            if toks[0] in self.end_ids:
                return 1
            raise ConstraintError("the output has already ended (an end id was consumed)")
        end = toks[-1] if toks[-1] in self.end_ids else None
        body = toks[:-1] if end is not None else toks
        valid = self._m.validate_tokens(body) if body else 0
        if valid < len(body):
            text = self.backend.tokenizer.dbg_tokens(body[max(0, valid - 8):valid + 1])
            raise ConstraintError(f"token {body[valid]} at position {valid} of {len(toks)} is not allowed by "
                                  f"the grammar (tokens ending there: {text})")
        if body and not self._m.consume_tokens(body):
            raise ConstraintError(f"grammar matcher failed: {self._m.get_error()}")
        if end is not None:
            # one end id goes through consume_token: llguidance's consume_tokens/validate_tokens refuse
            # an end id that comes first in a state that cannot be extended
            if not self._m.is_accepting():
                self._m.rollback(len(body))
                raise ConstraintError(f"end id {end} at position {len(body)} but the grammar does not accept "
                                      f"there: {self.backend.tokenizer.dbg_tokens(body[-8:])}")
            if not self._m.consume_token(end):
                raise ConstraintError(f"grammar matcher failed: {self._m.get_error()}")
        self._finished = toks[-1] in self.end_ids
        self._prev = None
        return len(toks)

    def is_accepting(self) -> bool:
        return self._finished or self._m.is_accepting()

    def is_stopped(self) -> bool:
        return self._finished or self._m.is_stopped()

    def is_finished(self) -> bool:
        return self._finished

    @property
    def error(self) -> str | None:
        return self._m.get_error() or None

    def copy(self) -> LLGuidanceMatcher:
        twin = LLGuidanceMatcher(self.backend, self._m.deep_copy())
        twin._finished = self._finished
        return twin

    def forced_tokens(self) -> list[int]:
        return [] if self.is_stopped() else list(self._m.compute_ff_tokens())

    def draft_masks(self, draft: Sequence[int], n_rows: int | None = None) -> torch.Tensor:
        return bitmask.unpack(self.draft_bitmask(draft, n_rows), self.vocab_size)

    def draft_bitmask(self, draft: Sequence[int], n_rows: int | None = None) -> np.ndarray:
        draft = check_draft(draft, self.vocab_size)
        n_rows = len(draft) if n_rows is None else n_rows
        if self.error:
            raise ConstraintError(f"grammar matcher is in an error state: {_explain(self.error)}")
        out = np.empty((n_rows, bitmask.words(self.vocab_size)), dtype=np.int32)
        if n_rows == 0:
            return out
        if self.is_stopped():  # llguidance allows exactly the end ids once it cannot extend
            if not self.is_accepting():
                raise ConstraintError("grammar matcher stopped in a non-accepting state")
            out[:] = self.backend.end_row
            return out
        path = draft[:max(0, min(len(draft), n_rows - 1))]  # draft[n_rows - 1] shapes no row
        rows = self._path_rows(path)[:n_rows]
        out[:len(rows)] = rows
        out[len(rows):] = self.backend.free_row
        if not out.any(axis=1).all():  # S5: llguidance leaves a row empty only on an internal error
            raise ConstraintError(f"grammar matcher produced an empty mask: {self.error or 'resource limit'}")
        return out

    def _path_rows(self, path: np.ndarray) -> np.ndarray:
        """(len(path) + 1, W): rows along `path`, reusing the last call's rows up to where the path changed."""
        n = len(path)
        rows = np.empty((n + 1, bitmask.words(self.vocab_size)), dtype=np.int32)
        start = 0
        if self._prev is not None:
            prev_path, prev_rows = self._prev
            same = min(n, len(prev_path))
            diff = np.flatnonzero(path[:same] != prev_path[:same])
            d = int(diff[0]) if len(diff) else same
            rows[:d + 1] = prev_rows[:d + 1]  # row k depends on path[:k] only
            stop = self._fill_after_stop(rows, path, 0, min(d + 1, n))
            start = n + 1 if stop is not None else d + 1
        if start <= n:
            self._fill_from(rows, path, start)
            self._fill_after_stop(rows, path, start, n)
        self._prev = (path.copy(), rows.copy())
        return rows

    def _fill_from(self, rows: np.ndarray, path: np.ndarray, start: int) -> None:
        """Rows start..n from llguidance; path[:start] is known valid and holds no end id."""
        if start > 0 and not self._m.consume_tokens(path[:start].tolist()):
            raise ConstraintError(f"grammar matcher failed on a valid prefix: {self._m.get_error()}")
        try:
            tail = path[start:].tolist()
            if tail:
                llg_numpy.fill_next_token_bitmask_par_with_draft_tokens(self.backend.executor, [(self._m, 0, tail)],
                                                                        rows[start:])
            else:
                llg_numpy.fill_next_token_bitmask(self._m, rows, start)
        finally:
            if start > 0:
                self._m.rollback(start)

    def _fill_after_stop(self, rows: np.ndarray, path: np.ndarray, lo: int, hi: int) -> int | None:
        """Find the first k in [lo, hi) where path[k] is not allowed by row k or is an end id, and
        overwrite rows k+1.. with free rows (invalid token) or end rows (end id). Returns k or None."""
        if hi <= lo:
            return None
        ok = bitmask.has_bits(rows[lo:hi], path[lo:hi])
        is_end = np.isin(path[lo:hi], self.end_ids) & ok
        stops = np.flatnonzero(~ok | is_end)
        if not len(stops):
            return None
        k = lo + int(stops[0])
        rows[k + 1:] = self.backend.end_row if is_end[k - lo] else self.backend.free_row
        return k


def _explain(error: str) -> str:
    error = error.replace("<non-verbose/>", "").strip()
    if "NoExtensionBias" in error:
        return ("no token of this model's vocabulary can continue the output here (the grammar needs text the "
                f"tokenizer cannot produce; llguidance: {error})")
    return error


def _cut_at_end(tokens: list[int], end_ids: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in end_ids:
            return tokens[:i + 1]
    return tokens
