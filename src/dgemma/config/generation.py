"""Sampler settings (from `generation_config.json`), their documented limits, and the one request validator.

`GenerationConfig.from_hf_dict` is the only place where the Hugging Face spelling of the sampler settings is
translated (`entropy_bound` lives under `sampler_config` there); unset fields fall back to transformers'
global defaults. Every setting has a documented range (the module constants, docs/reliability.md), checked
at construction and on every request: `check_request` (prompt ids and sizes against the model's positions
and the engine's context) and `check_seed`. tests/test_engine.py and tests/test_server.py try values outside
each range.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dgemma.config.errors import ConfigError
from dgemma.config.flags import setting
from dgemma.config.model import ModelConfig
from dgemma.config.values import as_id_tuple, is_int, is_num

# Documented limits of the generation settings (docs/reliability.md); a request outside them is refused at the
# door (CLI, HTTP, Python API) before anything is allocated.
SEED_RANGE = (-(2**63), 2**63 - 1)  # a seed is a signed 64-bit integer (the counter-based RNG's key)
MIN_TEMPERATURE = 1e-6  # the lowest temperature of a schedule: below it fp32 logits / T overflow to inf
MAX_TEMPERATURE = 1e4
MAX_ENTROPY_BOUND = 1e6  # above any sum of canvas entropies (256 x ln 262,144 = 3,192 nats)
MAX_CONFIDENCE_THRESHOLD = 1e6
MAX_DENOISING_STEPS = 100_000
MAX_NEW_TOKENS = 2**31 - 1  # a request is also checked against the model's positions and the engine's context
MAX_STABILITY = 64
MAX_END_IDS = 8
MAX_TOP_K = 2**31 - 1


@dataclass
class GenerationConfig:
    """Sampler settings. Field names follow `generation_config.json`; `entropy_bound` lives
    there under `sampler_config`."""

    max_new_tokens: int = setting(256, "tokens to generate at most (the answer is cut to exactly this many)")
    max_denoising_steps: int = setting(48, "denoising steps per canvas at most")
    entropy_bound: float = setting(0.1, "accept the lowest-entropy positions whose entropies sum to at most this")
    t_min: float = setting(0.4, "temperature at a canvas's last step")
    t_max: float = setting(0.8, "temperature at a canvas's first step")
    stability_threshold: int = setting(1, "steps the argmax canvas must stay unchanged before stopping early")
    confidence_threshold: float = setting(0.005, "stop early when the mean entropy is below this (0: never)")
    stop_at_end: bool = setting(False, "a canvas may stop once its answer through the end token is stable and "
                                       "confident, whatever its padding does (dgemma's rule; off: transformers')")
    top_k: int = setting(0, "keep the k most probable tokens of each position (ties kept; 0: off), before sampling, "
                            "argmax and entropy (docs/design.md, sampling filters)")
    top_p: float = setting(1.0, "keep the tokens each position ranks above mass top_p (1: off)")
    min_p: float = setting(0.0, "keep the tokens at least min_p times as probable as the position's best (0: off)")
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = 0

    def __post_init__(self) -> None:
        self.eos_token_ids = as_id_tuple(self.eos_token_ids)
        self.validate()

    def validate(self) -> None:
        """Every setting within its documented range (module constants); raises ConfigError naming the first
        one that is not."""

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        def count(name: str, low: int, high: int) -> None:
            value = getattr(self, name)
            need(is_int(value) and low <= value <= high,
                 f"{name} must be an integer in [{low}, {high}], got {value!r}")

        def number(name: str, low: float, high: float, low_open: bool = False) -> None:
            value = getattr(self, name)
            ok = is_num(value) and (value > low if low_open else value >= low) and value <= high
            need(ok, f"{name} must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")

        count("max_new_tokens", 1, MAX_NEW_TOKENS)
        count("max_denoising_steps", 1, MAX_DENOISING_STEPS)
        number("entropy_bound", 0.0, MAX_ENTROPY_BOUND, low_open=True)
        number("t_min", 0.0, MAX_TEMPERATURE)
        number("t_max", 0.0, MAX_TEMPERATURE)
        need(self.t_max > self.t_min, f"t_max must be greater than t_min ({self.t_min}), got {self.t_max!r}")
        lowest = self.t_min + (self.t_max - self.t_min) / self.max_denoising_steps  # the schedule's last step
        need(lowest >= MIN_TEMPERATURE,
             f"the temperature schedule falls to {lowest:.3g} at its last step, below the floor {MIN_TEMPERATURE:g} "
             "(logits divided by it overflow): raise t_min or t_max")
        count("stability_threshold", 0, MAX_STABILITY)
        count("top_k", 0, MAX_TOP_K)
        number("top_p", 0.0, 1.0, low_open=True)
        number("min_p", 0.0, 1.0)
        number("confidence_threshold", 0.0, MAX_CONFIDENCE_THRESHOLD)
        need(all(is_int(t) and t >= 0 for t in self.eos_token_ids),
             f"eos token ids must be non-negative integers, got {self.eos_token_ids!r}")
        need(self.pad_token_id is None or (is_int(self.pad_token_id) and self.pad_token_id >= 0),
             f"pad_token_id must be a non-negative integer, got {self.pad_token_id!r}")
        need(isinstance(self.stop_at_end, bool), f"stop_at_end must be true or false, got {self.stop_at_end!r}")
        need(not self.stop_at_end or 0 < len(self.eos_token_ids) <= MAX_END_IDS,
             f"stop_at_end needs 1 to {MAX_END_IDS} end token ids, got {len(self.eos_token_ids)}")

    @property
    def filters(self) -> bool:
        """Whether a top-k / top-p / min-p filter is on (`sampler.filters`)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def replace(self, **overrides: Any) -> GenerationConfig:
        """A copy with the given fields changed; `None` values leave a field as it is."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown generation settings {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], model: ModelConfig | None = None) -> GenerationConfig:
        """Unset (missing or null) fields take transformers' global defaults; EOS falls back to
        the model config when the generation config names none."""
        if not isinstance(data, dict):
            raise ConfigError(f"generation_config.json must hold a JSON object, not {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        for key in ("max_new_tokens", "max_denoising_steps", "t_min", "t_max",
                    "stability_threshold", "confidence_threshold", "pad_token_id", "stop_at_end"):
            if data.get(key) is not None:
                kwargs[key] = data[key]
        sampler = data.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            kwargs["entropy_bound"] = sampler["entropy_bound"]
        eos = data.get("eos_token_id")
        if eos is None and model is not None:
            eos = model.eos_token_id
        kwargs["eos_token_ids"] = as_id_tuple(eos)
        if "pad_token_id" not in kwargs and model is not None:
            kwargs["pad_token_id"] = model.pad_token_id
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": float(self.entropy_bound)},
            "t_min": self.t_min, "t_max": self.t_max,
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": float(self.confidence_threshold),
            "eos_token_id": list(self.eos_token_ids), "pad_token_id": self.pad_token_id,
            "return_dict_in_generate": True,
        } | ({"stop_at_end": True} if self.stop_at_end else {})


def check_seed(seed: Any) -> int:
    """A request seed: an integer in SEED_RANGE (the RNG key is a signed 64-bit value)."""
    low, high = SEED_RANGE
    if not is_int(seed) or not low <= seed <= high:
        raise ConfigError(f"seed must be an integer in [-2**63, 2**63 - 1], got {seed!r}")
    return seed


def check_request(model: ModelConfig, gen: GenerationConfig, prompt: Any, context: int = 0,
                  max_context: int | None = None) -> None:
    """The one prompt validator (engine, reference sampler, CLI, server): a non-empty list of token ids inside
    the vocabulary, and room for it plus `gen.max_new_tokens` (rounded up to whole canvases, as generation
    runs) after `context` already cached tokens: within the model's positions and, when given, within
    `max_context` cache slots (the last canvas is never cached). Checked before anything is allocated."""
    if not isinstance(prompt, (list, tuple)):
        raise ConfigError(f"prompt must be a list of token ids, got {type(prompt).__name__}")
    if not prompt:
        raise ConfigError("prompt is empty (it must be a non-empty list of token ids)")
    if not all(is_int(t) for t in prompt):
        raise ConfigError("prompt token ids must be integers")
    low, high = min(prompt), max(prompt)
    if low < 0 or high >= model.vocab_size:
        raise ConfigError(f"prompt token ids must lie in [0, {model.vocab_size}), got range [{low}, {high}]")
    c = model.canvas_length
    canvases = -(-gen.max_new_tokens // c)
    positions = context + len(prompt) + canvases * c
    if positions > model.max_position_embeddings:
        raise ConfigError(f"prompt ({context + len(prompt)} tokens) plus max_new_tokens ({gen.max_new_tokens}, "
                          f"{canvases} canvases of {c}) needs {positions} positions; the model has "
                          f"{model.max_position_embeddings}")
    slots = positions - c
    if max_context is not None and slots > max_context:
        raise ConfigError(f"prompt ({context + len(prompt)} tokens) plus max_new_tokens ({gen.max_new_tokens}) "
                          f"needs {slots} context slots; the engine has {max_context}")
