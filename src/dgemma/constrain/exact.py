"""Exact mode: dynamic programming over (canvas position x automaton state) with token classes.

The step law is factorised: P(x) ∝ prod_i exp(pl[i, x_i]) over canvases x, with pl the processed
logits (C, V). Conditioning it on "x is a valid continuation of the committed state" gives, exactly:
- `CanvasDP.marginal_logits()`: log P(x_i = t | valid), (C, V), via forward-backward in log space
  (pl'[i, t] = pl[i, t] + log g[i, class(t)] - log Z), for entropy, acceptance and sampling;
- `CanvasDP.viterbi()`: the most probable valid canvas (max-product), a jointly valid argmax canvas;
- `CanvasDP.sample()`: a jointly valid canvas drawn from the conditioned law (forward filtering,
  backward sampling, then a token within each sampled class).
Budget: with `remaining` <= C (max_tokens left in this canvas) the canvas must end the output:
positions >= remaining may hold only end ids and the state at C must be DONE, or accepting when
remaining == C; with more tokens left, the canvas must end in a state from which the output can still be
closed within the tokens left after it (`TokenAutomaton.tokens_to_done`); with no budget, in any live state.
Work per position is over E <= S*K edges, so cost ~ C*E plus a (C, V) class reduction.
tests/test_constrain_exact.py compares all three with brute force over every canvas of a toy.
"""

from __future__ import annotations

import torch

from dgemma.constrain.automaton import TokenAutomaton
from dgemma.constrain.spec import ConstraintError

NEG_INF = float("-inf")


def scatter_logsumexp(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """out[..., j] = logsumexp(values[..., index == j]) over the last dim, -inf for empty groups;
    max-shifted per group, so a group far below the others keeps its exact value."""
    shape = (*values.shape[:-1], size)
    index = index.expand_as(values)
    top = torch.full(shape, NEG_INF, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(-1, index, values, "amax")
    safe_top = torch.where(torch.isfinite(top), top, 0.0)
    terms = torch.where(values > NEG_INF, torch.exp(values - safe_top.gather(-1, index)), 0.0)
    sums = torch.zeros(shape, dtype=values.dtype, device=values.device).scatter_add(-1, index, terms)
    return torch.where(sums > 0, safe_top + torch.log(sums), NEG_INF)


class CanvasDP:
    """One denoising step's exact constrained law for one canvas. logits (C, V): processed logits."""

    def __init__(self, automaton: TokenAutomaton, logits: torch.Tensor, state: int,
                 remaining: int | None = None) -> None:
        length, vocab = logits.shape
        if vocab != automaton.vocab_size:
            raise ValueError(f"logits have {vocab} columns but the automaton covers {automaton.vocab_size} ids")
        if automaton.class_next.device != logits.device:
            raise ValueError(f"the automaton is on {automaton.class_next.device} and the logits on {logits.device}; "
                             "move it once with automaton.to(device)")
        if not 0 <= state < automaton.num_states:
            raise ValueError(f"state {state} is not a state of the automaton (0..{automaton.num_states - 1})")
        self.a, self.logits, self.state = automaton, logits.float(), state
        self.length, self.device = length, logits.device
        src, cls = torch.nonzero(automaton.class_next >= 0, as_tuple=True)
        self.src, self.cls, self.dst = src, cls, automaton.class_next[src, cls]  # (E,) edges
        self.class_ok = torch.ones(length, automaton.num_classes, dtype=torch.bool, device=self.device)
        self.final = torch.ones(automaton.num_states, dtype=torch.bool, device=self.device)
        if remaining is not None and remaining <= length:  # this canvas must end the output
            self.class_ok[max(remaining, 0):, :automaton.end_class] = False
            self.final = automaton.accepting.clone() if remaining == length else \
                torch.arange(automaton.num_states, device=self.device) == automaton.done
        elif remaining is not None:  # later canvases follow: end where the output can still close in time
            # (`remaining` counts content tokens; the distance counts the end id too)
            self.final = automaton.tokens_to_done() <= remaining - length + 1
        self._class_scores()
        self._alpha: torch.Tensor | None = None
        self._beta: torch.Tensor | None = None

    def _class_scores(self) -> None:
        """lse[i, c] = logsumexp of the class's logits, best[i, c] / best_token[i, c] = its max and argmax."""
        tc = self.a.token_class
        valid = tc >= 0
        index = tc.clamp(min=0).expand(self.length, -1)
        x = torch.where(valid, self.logits, NEG_INF)
        k = self.a.num_classes
        best = torch.full((self.length, k), NEG_INF, device=self.device).scatter_reduce(1, index, x, "amax")
        at_best = valid & (x == best.gather(1, index)) & (x > NEG_INF)
        ids = torch.arange(tc.shape[0], device=self.device).expand(self.length, -1)
        self.best_token = torch.full((self.length, k), tc.shape[0], device=self.device).scatter_reduce(
            1, index, torch.where(at_best, ids, tc.shape[0]), "amin")
        safe = torch.where(torch.isfinite(best), best, 0.0)
        terms = torch.where(x > NEG_INF, torch.exp(x - safe.gather(1, index)), 0.0)
        sums = torch.zeros(self.length, k, device=self.device).scatter_add(1, index, terms)
        lse = torch.where(sums > 0, safe + torch.log(sums), NEG_INF)
        self.lse = lse.masked_fill(~self.class_ok, NEG_INF)  # (C, K)
        self.best = best.masked_fill(~self.class_ok, NEG_INF)

    def forward(self) -> torch.Tensor:
        """alpha (C+1, S): log-weight of reaching each state after i positions."""
        if self._alpha is None:
            alpha = torch.full((self.length + 1, self.a.num_states), NEG_INF, device=self.device)
            alpha[0, self.state] = 0.0
            for i in range(self.length):
                alpha[i + 1] = scatter_logsumexp(alpha[i, self.src] + self.lse[i, self.cls], self.dst,
                                                 self.a.num_states)
            self._alpha = alpha
        return self._alpha

    def backward(self) -> torch.Tensor:
        """beta (C+1, S): log-weight of finishing the canvas validly from each state at position i."""
        if self._beta is None:
            beta = torch.full((self.length + 1, self.a.num_states), NEG_INF, device=self.device)
            beta[self.length] = torch.where(self.final, 0.0, NEG_INF)
            for i in range(self.length - 1, -1, -1):
                beta[i] = scatter_logsumexp(self.lse[i, self.cls] + beta[i + 1, self.dst], self.src,
                                            self.a.num_states)
            self._beta = beta
        return self._beta

    def log_partition(self) -> torch.Tensor:
        """log Z: the log-weight of all valid canvases (-inf: none)."""
        return torch.logsumexp(self.forward()[self.length] + torch.where(self.final, 0.0, NEG_INF), dim=0)

    def _check_feasible(self) -> torch.Tensor:
        log_z = self.log_partition()
        if not torch.isfinite(log_z):  # sync: a constant-size check, once per call
            raise ConstraintError("no valid canvas exists from this state under the budget (the output cannot "
                                  "be completed within the remaining tokens)")
        return log_z

    def marginal_logits(self) -> torch.Tensor:
        """(C, V): log P(x_i = t | valid canvas); -inf where no valid canvas has t at i. Rows sum to 1 in
        probability, so softmax, entropy and argmax treat them as processed logits."""
        log_z = self._check_feasible()
        alpha, beta = self.forward(), self.backward()
        g = scatter_logsumexp(alpha[:-1, self.src] + beta[1:, self.dst], self.cls, self.a.num_classes)  # (C, K)
        g = g.masked_fill(~self.class_ok, NEG_INF) - log_z
        tc = self.a.token_class
        per_token = torch.where(tc >= 0, g[:, tc.clamp(min=0)], NEG_INF)
        return self.logits + per_token

    def viterbi(self) -> torch.Tensor:
        """(C,) long: the most probable valid canvas."""
        self._check_feasible()
        n_states, n_edges = self.a.num_states, self.src.shape[0]
        score = torch.full((n_states,), NEG_INF, device=self.device)
        score[self.state] = 0.0
        edge_ids = torch.arange(n_edges, device=self.device)
        pointers = torch.empty(self.length, n_states, dtype=torch.long, device=self.device)
        for i in range(self.length):
            vals = score[self.src] + self.best[i, self.cls]
            score = torch.full((n_states,), NEG_INF, device=self.device).scatter_reduce(0, self.dst, vals, "amax")
            winner = (vals == score[self.dst]) & (vals > NEG_INF)
            pointers[i] = torch.full((n_states,), n_edges, device=self.device).scatter_reduce(
                0, self.dst, torch.where(winner, edge_ids, n_edges), "amin")
        q = int(torch.where(self.final, score, NEG_INF).argmax())  # sync: backtracking runs on the host
        ptr, src, cls = pointers.cpu(), self.src.cpu(), self.cls.cpu()
        classes = torch.empty(self.length, dtype=torch.long)
        for i in range(self.length - 1, -1, -1):
            e = int(ptr[i, q])
            classes[i], q = cls[e], int(src[e])
        return self.best_token.gather(1, classes.to(self.device)[:, None])[:, 0]

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """(C,) long: a valid canvas drawn from the conditioned law (forward filtering, backward sampling)."""
        self._check_feasible()
        alpha = self.forward()
        last = alpha[self.length] + torch.where(self.final, 0.0, NEG_INF)
        q = int(torch.multinomial(torch.softmax(last, 0), 1, generator=generator))  # sync: host-side walk
        classes = torch.empty(self.length, dtype=torch.long, device=self.device)
        for i in range(self.length - 1, -1, -1):
            into = torch.nonzero(self.dst == q).flatten()
            weights = alpha[i, self.src[into]] + self.lse[i, self.cls[into]]
            e = into[torch.multinomial(torch.softmax(weights, 0), 1, generator=generator)[0]]
            classes[i], q = self.cls[e], int(self.src[e])
        in_class = self.a.token_class[None, :] == classes[:, None]
        probs = torch.softmax(torch.where(in_class, self.logits, NEG_INF), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


def marginal_logits(automaton: TokenAutomaton, logits: torch.Tensor, state: int,
                    remaining: int | None = None) -> torch.Tensor:
    return CanvasDP(automaton, logits, state, remaining).marginal_logits()


def viterbi_canvas(automaton: TokenAutomaton, logits: torch.Tensor, state: int,
                   remaining: int | None = None) -> torch.Tensor:
    return CanvasDP(automaton, logits, state, remaining).viterbi()


def sample_canvas(automaton: TokenAutomaton, logits: torch.Tensor, state: int, remaining: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    return CanvasDP(automaton, logits, state, remaining).sample(generator)
