"""The engine's forward passes over `StaticKVCache`: `encode_row` (a prompt's prefill, or an eager commit, into one
row), `encode_canvas` (its twin for the compiled commit: no host value inside) and `denoise` (one bidirectional
pass for a batch of rows). Same math as `DiffusionGemma.encode/denoise`, the reference twin; every product goes
through `engine.weights`. tests/test_engine.py checks each against the reference.

What makes them fast: no per-step concatenation of the context (the canvas K/V are written into their fixed
slots and attention reads one view), masks only where rows differ, GQA without repeating K/V, the commit pass
stops after the last layer's K/V (its attention and FFN feed nothing), and the self-conditioning input arrives
as soft embeddings computed by the fused sampler.

`denoise` takes its context as `ForwardInputs`, made three ways: `exact_inputs` (eager: the exact context
width from host lengths, masks only when needed), `masked_inputs` (no host value: the compiled step, with the
width as a dynamic tensor size, and the CUDA graphs, over every context slot).

Shapes: B rows, S new tokens, C canvas_length, H hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgemma.config import SLIDING
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.engine.ops import gelu_tanh, norm, top_k
from dgemma.engine.weights import LayerWeights, ModelWeights, pack_weights
from dgemma.model.modeling import DiffusionGemma


def _gated(x: torch.Tensor, gate_up, down, inter: int) -> torch.Tensor:
    """down(gelu_tanh(gate(x)) * up(x)) with gate and up in one product."""
    gu = gate_up(x)
    return down(gelu_tanh(gu[..., :inter]) * gu[..., inter:])


def _route_scores(router, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router probabilities from its scores: top-k, renormalised, times the per-expert scale."""
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    weights, ids = top_k(probs, router.top_k)
    return weights / weights.sum(dim=-1, keepdim=True) * router.per_expert_scale[ids], ids


def _feed_forward(layer, lw: LayerWeights, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """`DecoderLayer.finish` with fused norms, packed gate/up and the batched experts."""
    r = x + norm(layer.post_attention_layernorm, attn_out)
    flat = r.reshape(-1, r.shape[-1])
    router = layer.router
    if lw.ffn_in is not None:  # the three input products in one GEMM (see `weights._fold_ffn_inputs`)
        i, n = lw.intermediate, lw.experts.num_experts * 2 * lw.experts.intermediate
        y = lw.ffn_in(F.rms_norm(flat, (flat.shape[-1],), None, lw.ffn_eps))
        dense = lw.down(gelu_tanh(y[:, :i]) * y[:, i:2 * i])
        weights, ids = _route_scores(router, y[:, 2 * i + n:])
        routed = lw.experts.from_products(y[:, 2 * i:2 * i + n], ids, weights)
    else:
        dense = _gated(norm(layer.pre_feedforward_layernorm, flat), lw.gate_up, lw.down, lw.intermediate)
        y = F.rms_norm(flat.float(), (flat.shape[-1],), None, router.eps).to(flat.dtype)
        weights, ids = _route_scores(router, lw.router(y * router.scale * router.root_size))
        routed = lw.experts(norm(layer.pre_feedforward_layernorm_2, flat), ids, weights)
    both = norm(layer.post_feedforward_layernorm_1, dense) + norm(layer.post_feedforward_layernorm_2, routed)
    return (r + norm(layer.post_feedforward_layernorm, both).view(r.shape)) * layer.layer_scalar


def _qkv(lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
    """One product for q, k (and v), one RMSNorm over every head, the QK-norm weights in one multiply and RoPE on
    q and k together. q (B, heads, S, D); k, v (B, kv_heads, S, D). On full layers V is the scale-free norm of the
    raw key projection (K = V)."""
    b, s, _ = x.shape
    nq, nk, d = lw.n_q, lw.n_k, lw.head_dim
    heads = lw.qkv(x).view(b, s, -1, d)
    normed = F.rms_norm(heads.float(), (d,), None, lw.eps)
    qk = normed[:, :, :nq + nk] * lw.qk_norm
    v = normed[:, :, nq + nk:] if normed.shape[2] > nq + nk else normed[:, :, nq:]
    qk, v = qk.to(x.dtype), v.to(x.dtype)
    # rotate_half(x) * sin == roll(x, D/2) * [-sin_first_half, sin_second_half]
    qk = qk * cos + torch.roll(qk, d // 2, dims=-1) * sin_signed
    return qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2), v.transpose(1, 2)


def _rope(stack, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos and the sign-folded sin, (B, S, 1, D), per layer type."""
    out = {}
    for kind, (cos, sin) in stack.rope(positions, dtype).items():
        half = sin.shape[-1] // 2
        out[kind] = cos[:, :, None], torch.cat([-sin[..., :half], sin[..., half:]], -1)[:, :, None]
    return out


def _layer_qkv(lw: LayerWeights, layer, x: torch.Tensor, rope: dict) -> tuple:
    """A layer's attention module and its q, k, v for x (input norm, `_qkv` with the layer type's RoPE)."""
    attn = layer.self_attn
    cos, sin = rope[SLIDING if attn.is_sliding else "full_attention"]
    return (attn, *_qkv(lw, norm(layer.input_layernorm, x), cos, sin))


def _attend(attn, lw: LayerWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                         enable_gqa=attn.num_heads != attn.num_kv_heads)
    b, _, s, _ = out.shape
    return lw.o(out.transpose(1, 2).reshape(b, s, -1))


# -- the causal passes ---------------------------------------------------------------------------------------
@torch.no_grad()
def encode_row(model: DiffusionGemma, cache: StaticKVCache, row: int, ids: torch.Tensor | None = None,
               weights: ModelWeights | None = None, embeds: torch.Tensor | None = None) -> None:
    """Causal pass over `ids` (1, S), or over input embeddings `embeds` (1, S, H) (e.g. an image's), appended to
    row `row`'s context; writes K/V, returns nothing. `weights`: the engine's (default: packed here)."""
    stack, w = model.stack, weights or pack_weights(model)
    x = embeds if embeds is not None else stack.embed(ids)
    n, s = cache.lengths[row], x.shape[1]
    cache.check_room(row, s)
    c, ring = cache.canvas, cache.ring
    device = x.device
    new_pos = torch.arange(n, n + s, device=device)
    rope = _rope(stack, new_pos[None], x.dtype)
    ring_pos = cache.ring_pos[row]
    ring_slots = c + new_pos[-ring:] % ring if ring > 0 else None
    last = len(stack.layers) - 1
    for i, layer in enumerate(stack.layers):
        attn, q, k, v = _layer_qkv(w.layers[i], layer, x, rope)
        sliding = attn.is_sliding
        kc, vc = cache.keys[i][row:row + 1], cache.values[i][row:row + 1]
        if sliding:
            ctx_k, ctx_v, ctx_pos = kc[:, :, c:], vc[:, :, c:], ring_pos
        else:
            ctx_k, ctx_v = kc[:, :, c:c + n], vc[:, :, c:c + n]
            ctx_pos = torch.arange(n, device=device)
        if i < last:
            key_pos = torch.cat([ctx_pos, new_pos])
            qp = new_pos[:, None]
            mask = (key_pos[None] >= 0) & (key_pos[None] <= qp)
            if sliding:
                mask &= key_pos[None] > qp - (ring + 1)
            out = _attend(attn, w.layers[i], q, torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2), mask)
        if sliding:
            keep = min(s, ring)
            kc[:, :, ring_slots] = k[:, :, -keep:]
            vc[:, :, ring_slots] = v[:, :, -keep:]
        else:
            kc[:, :, c + n:c + n + s] = k
            vc[:, :, c + n:c + n + s] = v
        if i < last:  # the last layer's attention output and FFN feed nothing the cache needs
            x = _feed_forward(layer, w.layers[i], x, out)
    if ring > 0:
        ring_pos[ring_slots - c] = new_pos[-ring:]
    cache.lengths[row] = n + s


def encode_canvas(model: DiffusionGemma, w: ModelWeights, keys: list[torch.Tensor], values: list[torch.Tensor],
                  ring_pos: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor) -> None:
    """`encode_row` for one row and a whole canvas (C tokens), with no host value inside (the compiled engine's
    commit pass): `keys`/`values` the row's per-layer cache views (1, kv heads, slots, D), `ring_pos` its
    (1, ring) view, ids (1, C), `slots` = arange(C + n) with n the row's context length as its (dynamic) size.
    The new K/V go into the canvas slots first (free between denoising steps), so each layer attends to one
    view [canvas | context] with a causal mask over the canvas part, then are copied into the context slots
    (full layers) or the ring (sliding layers). The caller advances `cache.lengths`."""
    stack = model.stack
    c = ids.shape[1]
    n = slots.shape[0] - c
    ring = ring_pos.shape[1]
    idx = torch.arange(c, device=ids.device)
    new_pos = idx + n
    x = stack.embed(ids)
    rope = _rope(stack, new_pos[None], x.dtype)
    # keys [canvas | context]: the context is all visible, the canvas causally
    full_mask = ((slots[None, :] >= c) | (slots[None, :] <= idx[:, None]))[None, None]
    # sliding: keys [canvas | ring]; a key is visible when filled, not after the query, within the window
    key_pos = torch.cat([new_pos, ring_pos[0]])
    query_pos = new_pos[:, None]
    ring_mask = ((key_pos[None] >= 0) & (key_pos[None] <= query_pos) & (key_pos[None] >= query_pos - ring))[None, None]
    keep = min(c, ring)
    ring_slots = c + new_pos[c - keep:] % ring
    last = len(stack.layers) - 1
    for i, layer in enumerate(stack.layers):
        lw = w.layers[i]
        attn, q, k, v = _layer_qkv(lw, layer, x, rope)
        sliding = attn.is_sliding
        kc, vc = keys[i], values[i]
        kc[:, :, :c] = k
        vc[:, :, :c] = v
        if i < last:
            if sliding:
                out = _attend(attn, lw, q, kc, vc, ring_mask)
            else:
                out = _attend(attn, lw, q, kc[:, :, :c + n], vc[:, :, :c + n], full_mask)
        if sliding:
            kc[:, :, ring_slots] = k[:, :, c - keep:]
            vc[:, :, ring_slots] = v[:, :, c - keep:]
        else:
            kc[:, :, c + n:2 * c + n] = k
            vc[:, :, c + n:2 * c + n] = v
        if i < last:  # the last layer's attention output and FFN feed nothing the cache needs
            x = _feed_forward(layer, lw, x, out)
    ring_pos[0, ring_slots - c] = new_pos[c - keep:]


# -- the denoising pass --------------------------------------------------------------------------------------
@dataclass
class ForwardInputs:
    """The context of one denoising pass: each row's context length (B,), the key width of full layers
    (C + context slots attended), and the masks (None where every key is visible)."""

    lengths: torch.Tensor
    width: int
    full_mask: torch.Tensor | None
    ring_mask: torch.Tensor | None


def exact_inputs(cache: StaticKVCache, b: int, device: torch.device) -> ForwardInputs:
    """The first b rows' exact context (shapes follow the host-side lengths); masks only where some rows have a
    shorter context or unfilled sliding-window slots."""
    c, lengths = cache.canvas, cache.lengths[:b]
    context = max(lengths)
    lengths_t = torch.tensor(lengths, device=device)
    full_mask = _context_mask(torch.arange(c + context, device=device), lengths_t, c) \
        if min(lengths) != context else None
    ring_mask = _ring_mask(cache, b, c) if min(lengths) < cache.ring else None
    return ForwardInputs(lengths_t, c + context, full_mask, ring_mask)


def masked_inputs(cache: StaticKVCache, lengths: torch.Tensor, slots: torch.Tensor) -> ForwardInputs:
    """No host value: the rows' context lengths (B,) on the device and `slots` = arange(C + context slots to
    attend), whose size `torch.compile` can mark dynamic (or every slot, for CUDA graphs); masks always."""
    b, c = lengths.shape[0], cache.canvas
    return ForwardInputs(lengths, slots.shape[0], _context_mask(slots, lengths, c), _ring_mask(cache, b, c))


def _context_mask(slots: torch.Tensor, lengths: torch.Tensor, c: int) -> torch.Tensor:
    """(B, 1, 1, slots): the canvas slots and each row's own context slots."""
    return (slots[None] < c + lengths[:, None])[:, None, None]


def _ring_mask(cache: StaticKVCache, b: int, c: int) -> torch.Tensor:
    valid = torch.cat([torch.ones(b, c, dtype=torch.bool, device=cache.ring_pos.device), cache.ring_pos[:b] >= 0], 1)
    return valid[:, None, None]


def denoise(model: DiffusionGemma, w: ModelWeights, cache: StaticKVCache, canvas: torch.Tensor,
            soft_embeds: torch.Tensor, inputs: ForwardInputs) -> torch.Tensor:
    """One bidirectional pass for rows 0..B-1: canvas (B, C), soft embeddings of the previous step's distribution
    (B, C, H) (zeros on a canvas's first step). Returns the final-normed hidden states (B, C, H)."""
    stack = model.stack
    b, c = canvas.shape
    positions = inputs.lengths[:, None] + torch.arange(c, device=canvas.device)[None]
    sc = stack.self_conditioning
    signal = _gated(norm(sc.pre_norm, soft_embeds), w.sc_gate_up, w.sc_down, w.sc_intermediate)
    x = norm(sc.post_norm, stack.embed(canvas) + signal)
    rope = _rope(stack, positions, x.dtype)
    for i, layer in enumerate(stack.layers):
        lw = w.layers[i]
        attn, q, k, v = _layer_qkv(lw, layer, x, rope)
        kc, vc = cache.keys[i], cache.values[i]
        kc[:b, :, :c] = k
        vc[:b, :, :c] = v
        if attn.is_sliding:
            out = _attend(attn, lw, q, kc[:b], vc[:b], inputs.ring_mask)
        else:
            width = inputs.width
            out = _attend(attn, lw, q, kc[:b, :, :width], vc[:b, :, :width], inputs.full_mask)
        x = _feed_forward(layer, lw, x, out)
    return norm(stack.norm, x)


def denoise_rows(model: DiffusionGemma, cache: StaticKVCache, canvas: torch.Tensor, soft_embeds: torch.Tensor,
                 weights: ModelWeights | None = None) -> torch.Tensor:
    """`denoise` of the first B rows with their exact context (the eager step's forward)."""
    with torch.no_grad():
        return denoise(model, weights or pack_weights(model), cache, canvas, soft_embeds,
                       exact_inputs(cache, canvas.shape[0], canvas.device))
