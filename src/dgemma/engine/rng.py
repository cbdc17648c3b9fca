"""Counter-based random numbers for the fast sampler.

Every draw is a pure function of (request seed, canvas index, step, position, stream), hashed with
SplitMix64 in int64 tensor arithmetic. Consequences: a request gives the same tokens alone or inside any
batch (batch invariance), CPU and CUDA give the same draws, and a captured CUDA graph needs no generator
state. The distribution is uniform to 2^-53 (tests/test_engine.py checks the statistics).

This stream is not transformers' (`--exact` keeps the reference sampler for that).
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _wrap(x: int) -> int:
    """A 64-bit constant as a signed int64 (torch has no uint64 arithmetic)."""
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN = _wrap(0x9E3779B97F4A7C15)
_M1 = _wrap(0xBF58476D1CE4E5B9)
_M2 = _wrap(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def counters(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """(B,) seeds, canvas indices and steps -> (B, length) int64 hashes, one per position."""
    pos = torch.arange(length, device=seeds.device, dtype=torch.int64)
    key = splitmix64(seeds.to(torch.int64) * 4 + stream)
    key = splitmix64(key ^ (canvas.to(torch.int64) << 20) ^ step.to(torch.int64))
    return splitmix64(key[:, None] ^ (pos[None] * _GOLDEN))


def uniform(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """(B, length) float64 uniforms in [0, 1)."""
    h = counters(seeds, canvas, step, length, stream)
    return _shr(h, 11).to(torch.float64) * (1.0 / (1 << 53))


def randint(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int,
            high: int) -> torch.Tensor:
    """(B, length) int64 uniform in [0, high); modulo bias below high / 2^53."""
    return _shr(counters(seeds, canvas, step, length, stream), 11) % high
