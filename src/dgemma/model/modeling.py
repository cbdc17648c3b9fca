"""The DiffusionGemma text stack: one set of weights used in two modes.

- `encode(ids, cache)`: causal pass (sliding-window layers and full layers) that writes K/V into the
  cache: the prefill of a prompt and the commit of a finished canvas.
- `denoise(canvas, cache, self_cond_logits)`: bidirectional pass over the canvas that reads the cache
  and never writes it; its input goes through the self-conditioning block; returns soft-capped fp32
  logits.

Parameter and buffer names equal the Hugging Face checkpoint's (`model.decoder.*`), so a state dict
loads without renaming. Numerics follow transformers 5.24 (reference notes section 1): plain-weight
RMSNorm computed in fp32, embedding scale cast to the weight dtype, QK-norm with weight and scale-free
V-norm, attention scale 1.0, K=V on full layers, proportional partial RoPE on full layers, a dense MLP
plus top-k routed experts (per-expert scale, fp32 combination), a per-layer scalar, a tied head and
a 30*tanh(x/30) logit cap. tests/test_parity.py compares logits with transformers.

Shapes: B batch, S tokens in this pass, C canvas_length, H hidden_size, V vocab_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import SLIDING, ModelConfig
from dgemma.model.kv_cache import KVCache
from dgemma.model.moe import Experts, Router


class RMSNorm(nn.Module):
    """y = x * (mean(x^2) + eps)^-0.5 [* weight], computed in fp32 and cast back (plain weight,
    not 1 + weight)."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.pow(y.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Gated GELU MLP: down(gelu_tanh(gate(x)) * up(x)). Used as the dense FFN and for
    self-conditioning."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(config: ModelConfig, layer_type: str, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) for one layer type.

    `default`: theta^(-2i/d') over d' = head_dim * partial_rotary_factor.
    `proportional`: the first int(factor * head_dim // 2) angles use theta^(-2i/head_dim) (the exponent
    divides by the full head_dim), the remaining angles are zero (cos 1, sin 0)."""
    params = config.rope_parameters[layer_type]
    theta, factor = float(params["rope_theta"]), float(params.get("partial_rotary_factor", 1.0))
    if params.get("rope_type", "default") == "default":
        dim = int(head_dim * factor)
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    angles = int(factor * head_dim // 2)
    rotated = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
    inv = torch.cat([rotated, torch.zeros(head_dim // 2 - angles)])
    return inv / float(params.get("factor", 1.0))


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (B, S, head_dim) in fp32, then cast to the activation dtype (as transformers does)."""
    freqs = positions[..., None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, S, heads, D) with split-half ("rotate_half") pairs (i, i + D/2)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        shape = config.layer_shape(layer_idx)
        self.layer_idx = layer_idx
        self.is_sliding = shape.is_sliding
        self.window = config.sliding_window
        self.head_dim = shape.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = shape.num_key_value_heads
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias)
        # Full layers share K and V: V is the raw (un-normed, un-roped) key projection.
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=bias) if self.is_sliding else None
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, config.rms_norm_eps, with_scale=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (B, heads, S, D); k, v (B, kv_heads, S, D)."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim)
        k_raw = self.k_proj(x).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim) if self.v_proj is not None else k_raw
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = self.v_norm(v).transpose(1, 2)
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def forward_encode(self, x, cos, sin, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            key_pos = torch.cat([cache.key_positions(self.layer_idx, x.device), positions[0]])
            k, v = cache.append(self.layer_idx, k, v)
        else:
            key_pos = positions[0]
        q_pos = positions[0][:, None]
        mask = key_pos[None, :] <= q_pos
        if self.is_sliding:
            mask = mask & (key_pos[None, :] > q_pos - self.window)
        return self.attend(q, k, v, mask)

    def forward_denoise(self, x, cos, sin, cache: KVCache) -> torch.Tensor:
        q, k, v = self.qkv(x, cos, sin)
        past_k, past_v = cache.past(self.layer_idx)
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
        # No mask: every canvas query sees the stored context (all of it on full layers, the last
        # window-1 committed tokens on sliding layers) and the whole canvas.
        return self.attend(q, k, v, None)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(h, config.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.router = Router(config)
        self.experts = Experts(config)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def feed_forward(self, residual: torch.Tensor) -> torch.Tensor:
        """Dense MLP and routed experts, both fed from the same residual (the router sees it raw)."""
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(residual)))
        flat = residual.reshape(-1, residual.shape[-1])
        weights, experts = self.router(flat)
        routed = self.experts(self.pre_feedforward_layernorm_2(flat), experts, weights).reshape(residual.shape)
        routed = self.post_feedforward_layernorm_2(routed)
        return residual + self.post_feedforward_layernorm(dense + routed)

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Everything after attention: residual add, FFN branches, layer scalar."""
        return self.feed_forward(x + self.post_attention_layernorm(attn_out)) * self.layer_scalar

    def forward(self, x: torch.Tensor, attn_out_fn) -> torch.Tensor:
        return self.finish(x, attn_out_fn(self.input_layernorm(x)))


class SelfConditioning(nn.Module):
    """dec_in = RMSNorm_noscale(embed + MLP(pre_norm(soft_embed)))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.pre_norm = RMSNorm(h, config.rms_norm_eps)
        self.post_norm = RMSNorm(h, config.rms_norm_eps, with_scale=False)
        self.gate_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)

    def forward(self, embeds: torch.Tensor, soft_embeds: torch.Tensor) -> torch.Tensor:
        n = self.pre_norm(soft_embeds)
        signal = self.down_proj(gelu_tanh(self.gate_proj(n)) * self.up_proj(n))
        return self.post_norm(embeds + signal)


class TextStack(nn.Module):
    """`model.decoder` in the checkpoint: embeddings, layers, final norm, self-conditioning."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self.register_buffer("embed_scale", torch.tensor(0.0), persistent=False)
        for layer_type in sorted(set(config.layer_types)):
            self.register_buffer(f"{layer_type}_inv_freq", torch.zeros(1), persistent=False)
        self.reset_buffers()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers in fp32; needed after building on the meta device."""
        device = device if device is not None else self.embed_tokens.weight.device
        if torch.device(device).type == "meta":
            return  # built on meta: the loader calls this again with the real device
        self.embed_scale = torch.tensor(self.config.embed_scale, dtype=torch.float32, device=device)
        for layer_type in sorted(set(self.config.layer_types)):
            head_dim = self.config.layer_shape(self.config.layer_types.index(layer_type)).head_dim
            setattr(self, f"{layer_type}_inv_freq", rope_inv_freq(self.config, layer_type, head_dim).to(device))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight
        # The fp32 scale is cast to the weight dtype first (sqrt(2816) = 53.07 becomes 53.0 in bf16).
        return F.embedding(ids, w) * self.embed_scale.to(w.dtype)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {t: rope_cos_sin(getattr(self, f"{t}_inv_freq"), positions, dtype) for t in set(self.config.layer_types)}


class DiffusionGemmaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.decoder = TextStack(config)


class DiffusionGemma(nn.Module):
    """The text model. `state_dict()` keys are the checkpoint's `model.decoder.*` names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionGemmaModel(config)

    @property
    def stack(self) -> TextStack:
        return self.model.decoder

    @property
    def dtype(self) -> torch.dtype:
        return self.stack.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.stack.embed_tokens.weight.device

    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    def encode(self, ids: torch.Tensor | None, cache: KVCache | None = None, *, return_hidden: bool = False,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | None:
        """Causal pass over `ids` (B, S), or over `inputs_embeds` (B, S, H) given instead (the path image
        embeddings take), at positions cache.length.., appending K/V to `cache`. Returns the final-normed hidden
        states (B, S, H) when `return_hidden`, else None."""
        stack = self.stack
        x = inputs_embeds if inputs_embeds is not None else stack.embed(ids)
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + x.shape[1], device=x.device)[None]
        rope = stack.rope(positions, x.dtype)
        for layer in stack.layers:
            attn = layer.self_attn
            cos, sin = rope[SLIDING if attn.is_sliding else "full_attention"]
            x = layer(x, lambda h, a=attn, c=cos, s=sin: a.forward_encode(h, c, s, positions, cache))
        if cache is not None:
            cache.advance(positions.shape[1])
        return stack.norm(x) if return_hidden else None

    def soft_embed(self, self_cond_logits: torch.Tensor) -> torch.Tensor:
        """Expected embedding under softmax(logits): (B, C, V) -> (B, C, H), scaled like `embed`."""
        w = self.stack.embed_tokens.weight
        probs = self_cond_logits.softmax(dim=-1, dtype=torch.float32).to(w.dtype)
        return torch.matmul(probs, w) * self.stack.embed_scale.to(w.dtype)

    def denoise(self, canvas: torch.Tensor, cache: KVCache, self_cond_logits: torch.Tensor | None = None,
                self_cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bidirectional pass over `canvas` (B, C) placed right after the cached context.
        `self_cond_logits` (B, C, V) are the previous step's processed logits (None on the first
        step); `self_cond_mask` (B,) zeroes the signal per row. Returns logits (B, C, V) fp32."""
        stack = self.stack
        positions = torch.arange(cache.length, cache.length + canvas.shape[1], device=canvas.device)[None]
        embeds = stack.embed(canvas)
        if self_cond_logits is None:
            soft = torch.zeros_like(embeds)
        else:
            soft = self.soft_embed(self_cond_logits)
            if self_cond_mask is not None:
                soft = soft * self_cond_mask.to(soft.dtype)[:, None, None]
        x = stack.self_conditioning(embeds, soft)
        rope = stack.rope(positions, x.dtype)
        for layer in stack.layers:
            attn = layer.self_attn
            cos, sin = rope[SLIDING if attn.is_sliding else "full_attention"]
            x = layer(x, lambda h, a=attn, c=cos, s=sin: a.forward_denoise(h, c, s, cache))
        return self.logits(stack.norm(x))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied head in the model dtype, then fp32 soft cap cap*tanh(x/cap)."""
        logits = F.linear(hidden, self.stack.embed_tokens.weight).float()
        cap = self.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
