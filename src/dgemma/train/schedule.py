"""What every training loop shares: the learning-rate schedule, the per-step random generators that make a
resumed run continue exactly as the uninterrupted one (tests/test_train.py), and Ctrl-C handling that lets a
loop finish its step and save."""

from __future__ import annotations

import math
import signal
import sys

import torch


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak (`cfg`: an optimisation config)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + salt)


class InterruptFlag:
    """While active, the first Ctrl-C (SIGINT) sets `.set` instead of raising, so the loop can finish its step
    and save; a second Ctrl-C interrupts at once. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self.set = False
        self._previous = None

    def __enter__(self) -> InterruptFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True
        print("\ninterrupt: finishing this step and saving a checkpoint (Ctrl-C again to stop now)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False
