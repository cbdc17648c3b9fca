"""Preallocated KV cache for the engine: one slot per batch row, written once per commit.

Layout per layer, for row b: `[canvas slots (C) | context slots]`.
- The canvas slots hold the K/V of the canvas being denoised; each denoising step overwrites them, so a
  step attends to one contiguous view `[:C + context]` and copies nothing. Key order does not matter to
  the bidirectional denoiser (RoPE is applied before the cache), which is why the canvas can come first.
- Full-attention layers: context slot C + p holds absolute position p (all committed tokens).
- Sliding layers: a ring of `sliding_window - 1` slots, slot C + (p mod (W - 1)); `ring_pos` records which
  position each slot holds (-1: empty). This keeps exactly the transformers DynamicCache semantics: the
  canvas sees the last W - 1 committed tokens.

`lengths` (committed tokens per row) is kept on the host by the engine: shapes never need a device sync.
Shapes: (max_batch, kv_heads, slots, head_dim).
"""

from __future__ import annotations

import torch

from dgemma.config import ModelConfig


class StaticKVCache:
    def __init__(self, config: ModelConfig, max_batch: int, max_context: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        if config.sliding_window < 2:
            raise ValueError(f"the engine needs sliding_window >= 2 (got {config.sliding_window}); use --exact")
        self.canvas = config.canvas_length
        self.ring = config.sliding_window - 1
        self.max_context = max_context
        self.max_batch = max_batch
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.is_sliding: list[bool] = []
        for i in range(config.num_hidden_layers):
            shape = config.layer_shape(i)
            slots = self.canvas + (self.ring if shape.is_sliding else max_context)
            size = (max_batch, shape.num_key_value_heads, slots, shape.head_dim)
            self.keys.append(torch.zeros(size, device=device, dtype=dtype))
            self.values.append(torch.zeros(size, device=device, dtype=dtype))
            self.is_sliding.append(shape.is_sliding)
        self.ring_pos = torch.full((max_batch, max(self.ring, 1)), -1, dtype=torch.long, device=device)
        self.lengths = [0] * max_batch

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def check_room(self, row: int, new_tokens: int) -> None:
        """Raise ValueError unless row `row`'s context slots can take `new_tokens` more."""
        n = self.lengths[row] + new_tokens
        if n > self.max_context:
            raise ValueError(f"context of {n} tokens exceeds the engine's max_context {self.max_context}")

    def row_view(self, row: int) -> StaticKVCache:
        """A one-row cache of views into row `row` (no copies): the step for that row alone."""
        view = StaticKVCache.__new__(StaticKVCache)
        view.canvas, view.ring, view.max_context, view.max_batch = self.canvas, self.ring, self.max_context, 1
        view.keys = [k[row:row + 1] for k in self.keys]
        view.values = [v[row:row + 1] for v in self.values]
        view.is_sliding = self.is_sliding
        view.ring_pos = self.ring_pos[row:row + 1]
        view.lengths = [self.lengths[row]]
        return view

    def reset_row(self, row: int) -> None:
        self.lengths[row] = 0
        self.ring_pos[row] = -1

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into `dst` (compaction when a request leaves)."""
        n = self.lengths[src]
        for k, v, sliding in zip(self.keys, self.values, self.is_sliding, strict=True):
            end = k.shape[2] if sliding else self.canvas + n
            k[dst, :, :end] = k[src, :, :end]
            v[dst, :, :end] = v[src, :, :end]
        self.ring_pos[dst] = self.ring_pos[src]
        self.lengths[dst] = n
