"""The reference KV cache: what `encode` writes and `denoise` reads.

It keeps the semantics of transformers' `DynamicCache` for DiffusionGemma, which is what the
sampler parity tests compare against:
- full-attention layers keep every committed token;
- sliding layers keep only the last `sliding_window - 1` committed tokens, so every canvas query
  of a sliding layer sees the same block-anchored window just before the canvas.

Tensors are (B, kv_heads, T, head_dim); `length` counts committed tokens (positions 0..length-1).
The fast engine replaces this with a preallocated cache; this one is the oracle.
"""

from __future__ import annotations

import torch

from dgemma.config import ModelConfig


class KVCache:
    def __init__(self, config: ModelConfig) -> None:
        self.window = config.sliding_window
        self.is_sliding = [config.layer_shape(i).is_sliding for i in range(config.num_hidden_layers)]
        self.keys: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.values: list[torch.Tensor | None] = [None] * config.num_hidden_layers
        self.length = 0

    def stored(self, layer_idx: int) -> int:
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[-2]

    def key_positions(self, layer_idx: int, device: torch.device) -> torch.Tensor:
        """Absolute positions of the stored keys of one layer, shape (T,)."""
        n = self.stored(layer_idx)
        return torch.arange(self.length - n, self.length, device=device)

    def past(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer_idx], self.values[layer_idx]

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V of one layer; return past + new for this pass's attention."""
        past_k, past_v = self.keys[layer_idx], self.values[layer_idx]
        full_k = k if past_k is None else torch.cat([past_k, k], dim=-2)
        full_v = v if past_v is None else torch.cat([past_v, v], dim=-2)
        if self.is_sliding[layer_idx]:
            keep = self.window - 1
            self.keys[layer_idx], self.values[layer_idx] = full_k[:, :, -keep:], full_v[:, :, -keep:]
        else:
            self.keys[layer_idx], self.values[layer_idx] = full_k, full_v
        return full_k, full_v

    def advance(self, n: int) -> None:
        """Called once per encode pass after every layer has appended `n` tokens."""
        self.length += n
