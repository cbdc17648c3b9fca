"""The stable prefix of a canvas: the rule that says which leading tokens are settled, measured or enforced.

After each denoising step of a canvas, position i joins the settled prefix when every position before it has
joined, its argmax has been the same token for `rule.steps` consecutive steps (2 by default: transformers'
`stability_threshold=1`, "k + 1 identical argmax canvases"), and that token's probability under the step's
processed distribution is at least `rule.confidence` (0.9). Positions join in order and never leave.

Two uses, one rule (`PrefixTracker`):
- measurement (no behaviour change): the tracker follows the canvas; when it is committed, `settle` compares the
  would-be locked tokens with the committed ones (a difference is a false lock) and counts how many steps earlier
  each right token was known (`PrefixStats`; the server's /metrics, bench/prefix_replay.py);
- locking (`stream_mode: "prefix"`): the engine streams each settled token at once and forces it in the later
  steps of its canvas (one-hot processed logits: entropy 0, always accepted, argmax fixed, self-conditioning on
  the token); an end id among them ends the request at once.
tests/test_openai_prefix.py checks the rule on hand-made step sequences and through the engine. Plain Python over
host lists (the engine syncs a tracked row's argmax canvas and its log-probabilities every step).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PrefixRule:
    confidence: float = 0.9  # the token's probability under the step's processed distribution, at least
    steps: int = 2  # consecutive steps with the same argmax at the position

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence <= 1.0:
            raise ValueError(f"prefix confidence must be in (0, 1], got {self.confidence!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"prefix steps must be an integer >= 1, got {self.steps!r}")


@dataclass
class PrefixStats:
    """Sums over canvases (one request's, or a whole server's)."""

    canvases: int = 0
    answer_tokens: int = 0  # committed tokens of the answer (through its end id, within max_tokens)
    locked_tokens: int = 0  # of them, settled before the commit
    false_locks: int = 0  # settled tokens that differ from the committed ones
    lead_steps: int = 0  # over rightly settled tokens: steps between settling and the canvas's last step
    first_lock_fraction: list[float] = field(default_factory=list)  # per canvas with a lock: its step / steps taken

    def add(self, other: PrefixStats) -> None:
        self.canvases += other.canvases
        self.answer_tokens += other.answer_tokens
        self.locked_tokens += other.locked_tokens
        self.false_locks += other.false_locks
        self.lead_steps += other.lead_steps
        self.first_lock_fraction += other.first_lock_fraction


class PrefixTracker:
    """One canvas's settled prefix under `rule`."""

    def __init__(self, rule: PrefixRule, canvas_length: int) -> None:
        self.rule, self.canvas_length = rule, canvas_length
        self.log_confidence = math.log(rule.confidence)
        self.history: deque[list[int]] = deque(maxlen=rule.steps)
        self.step = 0
        self.tokens: list[int] = []  # the settled tokens, in order
        self.lock_steps: list[int] = []  # the step (1-based) at which each settled

    @property
    def locked(self) -> int:
        return len(self.tokens)

    def update(self, argmax: list[int], logprob: list[float]) -> int:
        """After a step: its argmax canvas and the argmax's log-probabilities (C,). Returns the settled count."""
        self.step += 1
        self.history.append(argmax)
        if len(self.history) < self.rule.steps:
            return self.locked
        k = self.locked
        while (k < self.canvas_length and logprob[k] >= self.log_confidence
               and all(h[k] == argmax[k] for h in self.history)):
            self.tokens.append(argmax[k])
            self.lock_steps.append(self.step)
            k += 1
        return k

    def settle(self, committed: list[int], answer_length: int) -> PrefixStats:
        """The canvas is committed (`committed`, its tokens) and its answer is the first `answer_length` of them:
        what the rule would have streamed, compared with what was committed."""
        n = min(self.locked, answer_length)
        right = [i for i in range(n) if self.tokens[i] == committed[i]]
        stats = PrefixStats(canvases=1, answer_tokens=answer_length, locked_tokens=n, false_locks=n - len(right),
                            lead_steps=sum(self.step - self.lock_steps[i] for i in right))
        if self.lock_steps:
            stats.first_lock_fraction.append(self.lock_steps[0] / max(self.step, 1))
        return stats
