"""Counter-based random numbers for the fast sampler.

Every draw is a pure function of (request seed, canvas index, step, position, stream): a 32-bit integer
mixer (Wellons' improved "lowbias32": xor-shifts and two multiplications by constants below 2^31)
chained over those counters. Values stay below 2^32 and products below 2^63, so int64 tensor arithmetic
never overflows and eager kernels, compiled C++/Triton code and every device compute the same bits.
Consequences: a request gives the same tokens alone or inside any batch (batch invariance), CPU and CUDA
give the same draws, and a captured graph needs no generator state.

Uniforms have 24 random bits (the fused sampler draws in fp32); integers come from 48 bits (modulo bias
below high / 2^48). tests/test_engine.py checks the statistics. This stream is not transformers'
(`--exact` keeps the reference sampler for that).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_POS_BITS = 24  # counters of stream s start at s << 24 (positions per canvas stay far below 2^24)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _key(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(B,) counters -> (B,) 32-bit keys."""
    seeds = seeds.to(torch.int64)
    k = hash32((seeds & _M32) ^ 0x9E3779B9)
    k = hash32(k ^ ((seeds >> 32) & _M32))
    k = hash32(k ^ (canvas.to(torch.int64) & _M32))
    return hash32(k ^ (step.to(torch.int64) & _M32))


def counters(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """(B,) seeds, canvas indices and steps -> (B, length) 32-bit hashes, one per position."""
    pos = torch.arange(length, device=seeds.device, dtype=torch.int64) + (stream << _POS_BITS)
    return hash32(_key(seeds, canvas, step)[:, None] ^ pos[None])


def _to_uniform(h: torch.Tensor) -> torch.Tensor:
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _to_int(h: torch.Tensor, high: int) -> torch.Tensor:
    return (((h >> 16) << 32) | hash32(h ^ 0x5BD1E995)) % high


def uniform(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int) -> torch.Tensor:
    """(B, length) float32 uniforms in [0, 1), multiples of 2^-24."""
    return _to_uniform(counters(seeds, canvas, step, length, stream))


def randint(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int, stream: int,
            high: int) -> torch.Tensor:
    """(B, length) int64 uniform in [0, high) from 48 hashed bits."""
    return _to_int(counters(seeds, canvas, step, length, stream), high)


def uniform_and_randint(seeds: torch.Tensor, canvas: torch.Tensor, step: torch.Tensor, length: int,
                        uniform_stream: int, int_stream: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`uniform(..., uniform_stream)` and `randint(..., int_stream, high)` from one key and one hash pass."""
    pos = torch.arange(length, device=seeds.device, dtype=torch.int64)
    pos = torch.cat([pos + (uniform_stream << _POS_BITS), pos + (int_stream << _POS_BITS)])
    h = hash32(_key(seeds, canvas, step)[:, None] ^ pos[None])
    return _to_uniform(h[:, :length]), _to_int(h[:, length:], high)
