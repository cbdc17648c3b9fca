"""Counter-based random numbers for the fast sampler.

Every draw is a pure function of (request seed, canvas index, step, position, stream): a 32-bit integer
hash (Wellons' "lowbias32" mixer) chained over those counters, in int64 tensor arithmetic that never
overflows (32 x 16-bit partial products), so eager kernels, compiled C++/Triton code and every device
compute the same bits. Consequences: a request gives the same tokens alone or inside any batch (batch
invariance), CPU and CUDA give the same draws, and a captured graph needs no generator state.

Uniforms have 24 random bits (the fused sampler draws in fp32); integers come from 48 bits (modulo bias
below high / 2^48). tests/test_engine.py checks the statistics. This stream is not transformers'
(`--exact` keeps the reference sampler for that).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 without leaving int64's range: x * (c mod 2^16) < 2^48 and the
    high half only matters mod 2^16."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, stream: int) -> torch.Tensor:
    """(B,) counters -> (B,) 32-bit keys."""
    seeds = seeds.to(torch.int64)
    k = hash32((seeds & _M32) ^ (stream * 0x9E3779B9 & _M32))
    k = hash32(k ^ ((seeds >> 32) & _M32))
    k = hash32(k ^ (canvas.to(torch.int64) & _M32))
    return hash32(k ^ (step.to(torch.int64) & _M32))


def counters(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """(B,) seeds, canvas indices and steps -> (B, length) 32-bit hashes, one per position."""
    pos = torch.arange(length, device=seeds.device, dtype=torch.int64)
    return hash32(_key(seeds, canvas, step, stream)[:, None] ^ pos[None])


def uniform(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """(B, length) float32 uniforms in [0, 1), multiples of 2^-24."""
    return (counters(seeds, canvas, step, length, stream) >> 8).to(torch.float32) * (1.0 / (1 << 24))


def randint(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int,
            high: int) -> torch.Tensor:
    """(B, length) int64 uniform in [0, high) from 48 hashed bits."""
    h = counters(seeds, canvas, step, length, stream)
    return (((h >> 16) << 32) | hash32(h ^ 0x5BD1E995)) % high
