"""Routed experts of one layer: the router and the expert weights (reference path).

Router: p = softmax(proj(RMSNorm_noscale(x) * scale * H^-0.5)) in fp32; top-k; renormalise to sum 1;
multiply by the learned `per_expert_scale`. Experts: `gate_up_proj` (E, 2I, H) holds gate rows then
up rows; `down_proj` (E, H, I). Each expert output (model dtype) is weighted in fp32 and the k
contributions per token are summed in fp32 before one cast, as transformers' default `grouped_mm`
path does. tests/test_parity.py checks this against transformers.

Shapes: T tokens, K top_k_experts, E num_experts, H hidden, I moe_intermediate_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import ModelConfig


class Router(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = h**-0.5
        self.proj = nn.Linear(h, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(h))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, H) -> weights (T, K) fp32, expert ids (T, K)."""
        y = x.float()
        y = (y * torch.pow(y.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)).type_as(x)
        scores = self.proj(y * self.scale * self.root_size)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Experts(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), expert_ids (T, K), weights (T, K) -> (T, H) in x.dtype."""
        t, k = expert_ids.shape
        out = x.new_zeros((t, k, x.shape[-1]), dtype=torch.float32)
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()  # sync: reference path
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start:start + count]
            start += count
            tok, kk = slots // k, slots % k
            gate, up = self.project(x[tok], expert, "gate_up").chunk(2, dim=-1)
            y = self.project(F.gelu(gate, approximate="tanh") * up, expert, "down")
            out[tok, kk] = y * weights[tok, kk, None]
        return out.sum(dim=1).to(x.dtype)

    def project(self, x: torch.Tensor, expert: int, which: str) -> torch.Tensor:
        """x @ W^T for one expert's `gate_up` or `down` weight (a compressed bank overrides this)."""
        return F.linear(x, (self.gate_up_proj if which == "gate_up" else self.down_proj)[expert])
