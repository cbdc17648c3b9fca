"""The model shape, from and to a checkpoint's `config.json`.

This is the only place where the Hugging Face JSON spelling of the model is translated into our fields
(`ModelConfig.from_hf_dict` / `to_hf_dict`). A config we write loads back in
`transformers.DiffusionGemmaConfig` unchanged (tests/test_loading.py checks the round trip both ways).

Conventions kept from transformers 5.24 (`DiffusionGemmaTextConfig.__post_init__`):
- `layer_types` defaults to 5 sliding layers then 1 full layer, repeated; the last layer is forced
  to `full_attention`.
- Full-attention layers take `head_dim`/`num_key_value_heads` from `per_layer_config` (written by
  transformers >= 5.11) or from `global_head_dim` (default 512) / `num_global_key_value_heads`.
- Full layers share K and V (no `v_proj`).
A compressed checkpoint's `quantization_config` becomes `ModelConfig.quantization` (config/quantization.py) and is
written back verbatim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dgemma.config.errors import ConfigError
from dgemma.config.quantization import QuantizationConfig, parse_quantization_config
from dgemma.config.values import as_id_tuple

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
_DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
_SUPPORTED_ROPE = ("default", "proportional")
_SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)

@dataclass(frozen=True)
class LayerShape:
    """Attention geometry of one layer (sliding and full layers differ)."""

    layer_type: str
    head_dim: int
    num_key_value_heads: int

    @property
    def is_sliding(self) -> bool:
        return self.layer_type == SLIDING


@dataclass
class ModelConfig:
    """The DiffusionGemma text stack plus the few top-level fields the sampler needs."""

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = 2
    layer_types: list[str] | None = None
    sliding_window: int = 1024
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, dict[str, Any]] | None = None
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 262_144
    attention_bias: bool = False
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    canvas_length: int = 256
    image_token_id: int | None = 258_880
    boi_token_id: int | None = 255_999
    eoi_token_id: int | None = 258_882
    dtype: str = "bfloat16"
    # Kept verbatim so a save writes back what was loaded (the vision tower is not built yet).
    vision_config: dict[str, Any] | None = None
    # Overrides from `per_layer_config`, keyed by layer index.
    per_layer_overrides: dict[int, dict[str, int]] = field(default_factory=dict)
    # A compressed checkpoint's `quantization_config` (None: every weight in `dtype`).
    quantization: QuantizationConfig | None = None

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = [
                SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        if self.rope_parameters is None:
            self.rope_parameters = {k: dict(v) for k, v in _DEFAULT_ROPE.items()}
        self.validate()
        if self.layer_types[-1] != FULL:
            # transformers forces this too (with a warning); the checkpoint was trained that way.
            self.layer_types[-1] = FULL

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"invalid DiffusionGemma config: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
                     "sliding_window", "num_experts", "top_k_experts", "moe_intermediate_size",
                     "canvas_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        need(not bad, f"unknown layer types {bad}; expected {list(LAYER_TYPES)}")
        need(self.top_k_experts <= self.num_experts,
             f"top_k_experts ({self.top_k_experts}) exceeds num_experts ({self.num_experts})")
        need(self.hidden_activation in _SUPPORTED_ACTIVATIONS,
             f"hidden_activation {self.hidden_activation!r} is not supported (only {_SUPPORTED_ACTIVATIONS})")
        for layer_type in set(self.layer_types):
            rope = self.rope_parameters.get(layer_type)
            need(rope is not None, f"rope_parameters has no entry for {layer_type}")
            need(rope.get("rope_type", "default") in _SUPPORTED_ROPE,
                 f"rope_type {rope.get('rope_type')!r} for {layer_type} is not supported ({_SUPPORTED_ROPE})")
            need("rope_theta" in rope, f"rope_parameters[{layer_type}] has no rope_theta")
        for i in range(self.num_hidden_layers):
            shape = self.layer_shape(i)
            need(self.num_attention_heads % shape.num_key_value_heads == 0,
                 f"layer {i}: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                 f"its num_key_value_heads ({shape.num_key_value_heads})")
            need(shape.head_dim % 2 == 0, f"layer {i}: head_dim {shape.head_dim} must be even for RoPE")
        need(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; expected one of {sorted(DTYPES)}")

    # -- derived ------------------------------------------------------------------------------
    def layer_shape(self, layer_idx: int) -> LayerShape:
        layer_type = self.layer_types[layer_idx]
        if layer_type == SLIDING:
            head_dim, kv_heads = self.head_dim, self.num_key_value_heads
        else:
            head_dim = self.global_head_dim
            kv_heads = self.num_global_key_value_heads or self.num_key_value_heads
        override = self.per_layer_overrides.get(layer_idx, {})
        return LayerShape(layer_type, override.get("head_dim", head_dim),
                          override.get("num_key_value_heads", kv_heads))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return as_id_tuple(self.eos_token_id)

    @property
    def embed_scale(self) -> float:
        return self.hidden_size**0.5

    # -- Hugging Face JSON ---------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config.json must hold a JSON object, not {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type != "diffusion_gemma":
            raise ConfigError(
                f"config.json has model_type {model_type!r}; dgemma loads DiffusionGemma checkpoints "
                "(model_type 'diffusion_gemma')"
            )
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json has no 'text_config' object")
        if text.get("model_type", "diffusion_gemma_text") != "diffusion_gemma_text":
            raise ConfigError(f"text_config has model_type {text.get('model_type')!r}, expected 'diffusion_gemma_text'")
        if text.get("use_bidirectional_attention") == "all":
            raise ConfigError("use_bidirectional_attention='all' (bidirectional encoder) is not supported; "
                             "the released checkpoint uses 'vision'")
        if data.get("tie_word_embeddings", True) is False or text.get("tie_word_embeddings", True) is False:
            raise ConfigError("tie_word_embeddings=false (separate encoder, decoder and head weights) is not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {k: v for k, v in text.items() if k in known}
        for key in ("canvas_length", "image_token_id", "boi_token_id", "eoi_token_id"):
            if data.get(key) is not None:
                kwargs[key] = data[key]
        kwargs["dtype"] = _dtype_name(data.get("dtype") or data.get("torch_dtype") or text.get("dtype") or "bfloat16")
        kwargs["vision_config"] = data.get("vision_config")
        if "final_logit_softcapping" not in text:
            kwargs["final_logit_softcapping"] = 30.0  # a class constant in transformers, never serialised
        overrides: dict[int, dict[str, int]] = {}
        for idx, override in (text.get("per_layer_config") or {}).items():
            unknown = set(override) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConfigError(f"per_layer_config[{idx}] sets unsupported fields {sorted(unknown)}")
            overrides[int(idx)] = dict(override)
        kwargs["per_layer_overrides"] = overrides
        if data.get("quantization_config") is not None:
            kwargs["quantization"] = parse_quantization_config(data["quantization_config"])
        try:
            return cls(**kwargs)
        except (TypeError, AttributeError, KeyError) as exc:  # a field of the wrong JSON type
            raise ConfigError(f"config.json has a field of the wrong type ({exc})") from None

    def to_hf_dict(self) -> dict[str, Any]:
        text = {
            "model_type": "diffusion_gemma_text",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window, "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts, "moe_intermediate_size": self.moe_intermediate_size,
            "hidden_activation": self.hidden_activation, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope_parameters, "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias, "attention_dropout": 0.0,
            "pad_token_id": self.pad_token_id, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "tie_word_embeddings": True,
            "use_bidirectional_attention": "vision", "initializer_range": 0.02,
            "per_layer_config": {
                str(i): {"head_dim": s.head_dim, "num_key_value_heads": s.num_key_value_heads}
                for i in range(self.num_hidden_layers) if not (s := self.layer_shape(i)).is_sliding
            },
        }
        out: dict[str, Any] = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "canvas_length": self.canvas_length, "tie_word_embeddings": True, "initializer_range": 0.02,
            "dtype": self.dtype, "text_config": text,
        }
        for key in ("image_token_id", "boi_token_id", "eoi_token_id"):
            if getattr(self, key) is not None:  # absent: transformers uses its defaults (null breaks its generate)
                out[key] = getattr(self, key)
        if self.vision_config is not None:
            out["vision_config"] = self.vision_config
        if self.quantization is not None:
            out["quantization_config"] = self.quantization.raw
        return out


DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32", "torch.float32": "float32", "torch.bfloat16": "bfloat16",
                  "torch.float16": "float16"}


def _dtype_name(name: str) -> str:
    name = _DTYPE_ALIASES.get(str(name), str(name))
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return name


def parse_dtype(name: str) -> str:
    """Validate a user-supplied dtype name (accepts fp32/bf16/fp16 aliases)."""
    return _dtype_name(name)
