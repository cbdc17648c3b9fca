"""Elementwise forms shared by the fast forward and the fused sampler.

Compiled for a CPU, tanh and the tanh-GELU are written with one exp each: inductor's vectorised tanh costs
several times ATen's (125 vs 23.5 us over 32 x 4,096), and these run over every activation and every
(position x vocabulary) logit. Eager code keeps ATen's. tests/test_engine.py checks the forms against ATen
(within 3e-7 and 1e-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`; compiled for a CPU, x * sigmoid(2u) with a single exp."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        u = x * (1.5957691216057308 + 0.07135481627260025 * x * x)  # 2 sqrt(2/pi) (x + 0.044715 x^3)
        return x / (1 + torch.exp(-u))
    return F.gelu(x, approximate="tanh")


def tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh of fp32 `x` (in place, eager); compiled for a CPU, sign(x) (1 - e) / (1 + e) with e = exp(-2|x|)."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        e = torch.exp(-2 * x.abs())
        return torch.copysign((1 - e) / (1 + e), x)
    return torch.tanh_(x)


def norm(module, x: torch.Tensor) -> torch.Tensor:
    """A model `RMSNorm` in one call (fp32 compute, as the reference)."""
    w = None if module.weight is None else module.weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, module.eps).to(x.dtype)


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk` over the experts. Compiled, k <= 2 is one or two max reductions instead (fused with the
    softmax; a topk is a separate library call there). Ties: the lower index first."""
    if k > 2 or not torch.compiler.is_compiling():
        return torch.topk(probs, k=k, dim=-1)
    w1, i1 = probs.max(dim=-1, keepdim=True)
    if k == 1:
        return w1, i1
    rest = probs.scatter(-1, i1, float("-inf"))
    w2, i2 = rest.max(dim=-1, keepdim=True)
    return torch.cat([w1, w2], -1), torch.cat([i1, i2], -1)
