"""Packed token masks: int32 words, token t is bit t % 32 of word t // 32 (llguidance's layout).

A packed mask of a canvas is (n, ceil(V / 32)) int32 = V / 8 bytes per row (32 KB at V = 262,144),
so it is cheap to copy to the device and unpack there; unpacking on the CPU uses numpy's
`unpackbits`, on other devices shifts of uint8 bytes. Bits at or beyond V are ignored.
tests/test_constrain_masks.py checks pack/unpack round trips at widths that are not multiples of 32. `check_draft`
validates the draft ids that masks are built along.

Shapes: n rows, V vocabulary (the model's logits width), W = ceil(V / 32) words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def pack(mask: np.ndarray | torch.Tensor) -> np.ndarray:
    """(n, V) bool -> (n, W) int32."""
    mask = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    n, vocab = mask.shape
    padded = np.zeros((n, words(vocab) * 32), dtype=bool)
    padded[:, :vocab] = mask
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


def unpack(bitmask: np.ndarray | torch.Tensor, vocab_size: int, device: torch.device | str | None = None
           ) -> torch.Tensor:
    """(n, W) int32 -> (n, V) bool tensor on `device` (default: where the bitmask is, CPU for numpy)."""
    if isinstance(bitmask, np.ndarray):
        bitmask = torch.from_numpy(np.ascontiguousarray(bitmask))
    device = torch.device(device) if device is not None else bitmask.device
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.cpu().numpy().view(np.uint8), axis=1, count=vocab_size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool)
    # little-endian words: byte j of word w holds tokens 32w + 8j .. 32w + 8j + 7
    as_bytes = bitmask.to(device, non_blocking=True).contiguous().view(torch.uint8)
    shifts = torch.arange(8, device=device, dtype=torch.uint8)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()


def has_bits(bitmask: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Row k of `bitmask` has the bit of tokens[k] set: (n, W), (n,) -> (n,) bool."""
    tokens = np.asarray(tokens, dtype=np.int64)
    rows = np.arange(len(tokens))
    return ((bitmask[rows, tokens >> 5].astype(np.int64) >> (tokens & 31)) & 1).astype(bool)


def from_ids(ids: list[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """(W,) int32 row with exactly the bits of `ids` set."""
    row = np.zeros(words(vocab_size) * 32, dtype=bool)
    row[np.asarray(ids, dtype=np.int64)] = True
    return np.packbits(row, bitorder="little").view(np.int32)


def check_draft(draft: Sequence[int] | torch.Tensor | np.ndarray, vocab_size: int) -> np.ndarray:
    """The draft as int64 numpy, with a clear error for ids outside [0, V)."""
    if isinstance(draft, torch.Tensor):
        draft = draft.detach().cpu().numpy()  # sync: the previous argmax canvas comes to the host
    arr = np.asarray(draft, dtype=np.int64).reshape(-1)
    if len(arr) and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"draft token ids must lie in [0, {vocab_size}), got range [{arr.min()}, {arr.max()}]")
    return arr
