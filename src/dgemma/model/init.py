"""Random initialisation and named config presets, for tests, benchmarks and training from scratch.

`released` is the text stack of google/diffusiongemma-26B-A4B-it (reference notes section 1.2);
`tiny` is a CPU-sized model with the same structure (sliding + full layers, K=V, experts).
"""

from __future__ import annotations

import torch
from torch import nn

from dgemma.config import ConfigError, ModelConfig
from dgemma.model.modeling import DiffusionGemma, RMSNorm

PRESETS: dict[str, dict] = {
    "released": dict(),  # the ModelConfig defaults are the released checkpoint's values
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                 layer_types=["sliding_attention", "full_attention"] * 2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                 sliding_window=16, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
                 canvas_length=32, max_position_embeddings=4096, dtype="float32",
                 image_token_id=509, boi_token_id=510, eoi_token_id=511),
}


def count_parameters(config: ModelConfig) -> int:
    """Unique parameters of the text stack (the embedding is tied to the head, counted once)."""
    with torch.device("meta"):
        model = DiffusionGemma(config)
    return sum(p.numel() for p in model.parameters())


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@torch.no_grad()
def init_weights(model: DiffusionGemma, std: float = 0.02, generator: torch.Generator | None = None) -> DiffusionGemma:
    """Normal(0, std) for projections, experts and the embedding; ones for norms, scales and layer
    scalars (the transformers initialisation)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std, generator=generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, RMSNorm) and module.weight is not None:
            module.weight.fill_(1.0)
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            p.normal_(0.0, std, generator=generator)
        elif name.endswith(("router.scale", "router.per_expert_scale")):
            p.fill_(1.0)
    for name, b in model.named_buffers():
        if name.endswith("layer_scalar"):
            b.fill_(1.0)
    return model


def random_model(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> DiffusionGemma:
    dtype = dtype or getattr(torch, config.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype directly (26B in fp32 fits no GPU)
    try:
        with torch.device(device):
            model = DiffusionGemma(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    init_weights(model, generator=gen)
    model.stack.reset_buffers(device)  # RoPE frequencies and the embedding scale stay fp32
    return model.eval().requires_grad_(False)
