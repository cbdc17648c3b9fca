"""Settings of the engine, the server and the benchmark: plain dataclasses whose fields are the CLI flags
(`config.flags`), each checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from dgemma.config.errors import ConfigError, UserError
from dgemma.config.flags import setting
from dgemma.config.values import is_int


def _at_least(obj: object, names: tuple[str, ...], low: int) -> None:
    for name in names:
        value = getattr(obj, name)
        if not is_int(value) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class EngineConfig:
    max_batch: int = setting(8, "requests denoised together (rows of the KV cache)")
    max_context: int = setting(4096, "context slots per request: prompt plus every committed canvas but the last")
    sampler_chunk: int = setting(1024, "positions per fused-sampler chunk (memory: chunk x vocabulary fp32)")
    compile: bool = setting(False, "torch.compile the whole step and the commit pass (1-1.5 minutes on first use on "
                                   "CPU, seconds with a warm inductor cache; then about 2x faster on CPU)")
    cuda_graphs: bool = setting(False, "replay the whole step as a CUDA graph per batch bucket (CUDA only; "
                                       "--compile takes precedence)")
    sync_every: int = setting(0, "host syncs: rows that stop are frozen on the device and committed at the next "
                                 "sync, every N steps and at a canvas's last step; 0 = auto (1 on CPU, 4 on GPUs)")

    def __post_init__(self) -> None:
        _at_least(self, ("max_batch", "max_context", "sampler_chunk"), 1)
        _at_least(self, ("sync_every",), 0)


@dataclass
class ServerConfig:
    served_model_name: str = setting("dgemma", "model id clients use (dgemma serve: the checkpoint directory's name)")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on all but /health; never empty")
    max_queue: int = setting(64, "waiting requests before answering 429")
    max_body_bytes: int = setting(1 << 20, "largest request body (413 above)")
    default_max_tokens: int = setting(256, "max_tokens of a request that gives none")
    prefix_metrics: bool = setting(True, "measure how early each canvas's prefix settles and how often locking it "
                                         "would be wrong (/metrics dgemma_prefix_*); no change to any answer, one host "
                                         "sync per step")

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("api_key must not be empty (omit it to serve without authentication)")
        _at_least(self, ("max_queue", "max_body_bytes", "default_max_tokens"), 1)


@dataclass
class BenchConfig:
    prompt_tokens: int = setting(64, "random prompt length")
    max_new_tokens: int = setting(256, "tokens generated per request")
    batch: int = setting(1, "requests run together")
    max_denoising_steps: int | None = setting(None, "steps per canvas (default: the checkpoint's)")
    confidence_threshold: float | None = setting(None, "0 = fixed steps, no early stop (default: the checkpoint's)")
    repeats: int = setting(3, "timed runs; the best is reported")
    warmup: int = setting(1, "untimed runs first")
    seed: int = setting(0, "prompt and sampling seed")
    baseline: str | None = setting(None, "also measure 'transformers' (its generate) or 'ar' (autoregressive "
                                         "decoding of the same weights) in the same run")
    compile: bool = setting(False, "torch.compile the engine's whole step")
    cuda_graphs: bool = setting(False, "replay the engine step as CUDA graphs")

    def __post_init__(self) -> None:
        _at_least(self, ("prompt_tokens", "max_new_tokens", "batch", "repeats"), 1)
        _at_least(self, ("warmup",), 0)
        if self.baseline not in (None, "transformers", "ar"):
            raise ConfigError(f"unknown baseline {self.baseline!r}; use 'transformers' or 'ar'")
