"""The one summary of a finished generation: tokens, canvases, steps per canvas, tokens per forward, speed.

`tokens_per_forward` is returned tokens / denoiser calls (`nfe`, the sum of steps over canvases): the number
the CLI, chat, bench and server report. (The reference sampler's `GenerationResult.tokens_per_forward` keeps
transformers' own definition, whole canvases of non-pad tokens, for parity.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    tokens: int  # returned tokens
    steps: list[int]  # denoising steps of each canvas
    seconds: float | None = None  # wall time of the generation

    @property
    def canvases(self) -> int:
        return len(self.steps)

    @property
    def nfe(self) -> int:
        return sum(self.steps)

    @property
    def steps_per_canvas(self) -> float:
        return self.nfe / max(1, self.canvases)

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(1, self.nfe)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds else None

    def as_dict(self) -> dict[str, float | int | list[int] | None]:
        return {"steps": self.steps, "canvases": self.canvases, "steps_per_canvas": self.steps_per_canvas,
                "tokens_per_forward": self.tokens_per_forward, "seconds": self.seconds,
                "tokens_per_second": self.tokens_per_s}

    def line(self, finish_reason: str | None = None, extra: str = "") -> str:
        """`[N tokens (reason), K canvases, steps/canvas S, tokens/forward T, R tokens/s...]`"""
        reason = f" ({finish_reason})" if finish_reason else ""
        speed = f", {self.tokens_per_s:.1f} tokens/s" if self.tokens_per_s is not None else ""
        return (f"[{self.tokens} tokens{reason}, {self.canvases} canvases, steps/canvas {self.steps_per_canvas:.1f}, "
                f"tokens/forward {self.tokens_per_forward:.2f}{speed}{extra}]")
