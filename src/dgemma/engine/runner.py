"""The engine's forward passes over `StaticKVCache`: prefill/commit of one row, one denoising step for a
batch of rows. Same weights and same math as `DiffusionGemma.encode/denoise` (the reference twin);
tests/test_engine.py checks that they agree.

Differences that make it fast: no per-step concatenation of the context (the canvas K/V are written into
their fixed slots and attention reads one view), no mask when every row has the same context, GQA
without repeating K/V, the commit pass stops after the last layer's K/V (its attention and FFN feed
nothing), and the self-conditioning input arrives as soft embeddings computed by the fused sampler.

Shapes: B rows, S new tokens, C canvas_length, H hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgemma.config import SLIDING
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.model.modeling import Attention, DiffusionGemma, apply_rope


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in one fused kernel (fp32 compute, as the reference `RMSNorm`)."""
    w = None if norm.weight is None else norm.weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, norm.eps).to(x.dtype)


def _experts(experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Routed experts. Few experts (CPU-sized models): every expert on every token in one batched matmul,
    then the top-k weights select (fewer, larger kernels beat a Python loop of tiny ones). Many experts:
    tokens sorted by expert and two grouped GEMMs (no Python loop, no host sync); the reference loop only
    where grouped GEMMs are unavailable."""
    e = experts.num_experts
    if e > 16:
        if _grouped_ok(experts, x):
            return _experts_grouped(experts, x, ids, weights)
        return experts(x, ids, weights)
    gate_up = torch.matmul(x[None], experts.gate_up_proj.transpose(1, 2))  # (E, T, 2I)
    gate, up = gate_up.chunk(2, dim=-1)
    y = torch.matmul(F.gelu(gate, approximate="tanh") * up, experts.down_proj.transpose(1, 2))  # (E, T, H)
    dense_w = torch.zeros(x.shape[0], e, dtype=torch.float32, device=x.device).scatter_(1, ids, weights)
    return torch.einsum("eth,te->th", y.float(), dense_w).to(x.dtype)


def _grouped_ok(experts, x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    align = 16 // x.element_size()  # grouped GEMMs need 16-byte aligned rows
    _, two_i, h = experts.gate_up_proj.shape
    return h % align == 0 and (two_i // 2) % align == 0 and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


def _experts_grouped(experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # histc, not bincount: no host sync, so this can live inside a CUDA graph (int input on CUDA)
    counts = torch.histc(flat.float() if flat.device.type == "cpu" else flat.int(), bins=experts.num_experts,
                         min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // k]
    gate, up = torch._grouped_mm(xs, experts.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    y = torch._grouped_mm(F.gelu(gate, approximate="tanh") * up, experts.down_proj.transpose(1, 2), offs=offsets)
    weighted = y * weights.reshape(-1)[order, None]  # fp32, as transformers' grouped path
    out = torch.empty_like(weighted)
    out[order] = weighted
    return out.view(t, k, -1).sum(dim=1).to(x.dtype)


def _feed_forward(layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """`DecoderLayer.finish` with the fused norm and the batched experts."""
    r = x + _norm(layer.post_attention_layernorm, attn_out)
    mlp = layer.mlp
    h = _norm(layer.pre_feedforward_layernorm, r)
    dense = _norm(layer.post_feedforward_layernorm_1,
                  mlp.down_proj(F.gelu(mlp.gate_proj(h), approximate="tanh") * mlp.up_proj(h)))
    flat = r.reshape(-1, r.shape[-1])
    weights, ids = layer.router(flat)
    routed = _experts(layer.experts, _norm(layer.pre_feedforward_layernorm_2, flat), ids, weights)
    routed = _norm(layer.post_feedforward_layernorm_2, routed.reshape(r.shape))
    return (r + _norm(layer.post_feedforward_layernorm, dense + routed)) * layer.layer_scalar


def _qkv(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, -1, attn.head_dim)
    k_raw = attn.k_proj(x).view(b, s, -1, attn.head_dim)
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim) if attn.v_proj is not None else k_raw
    q = apply_rope(_norm(attn.q_norm, q), cos, sin).transpose(1, 2)
    k = apply_rope(_norm(attn.k_norm, k_raw), cos, sin).transpose(1, 2)
    return q, k, _norm(attn.v_norm, v).transpose(1, 2)


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                         enable_gqa=attn.num_heads != attn.num_kv_heads)
    b, _, s, _ = out.shape
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))


@torch.no_grad()
def encode_row(model: DiffusionGemma, cache: StaticKVCache, row: int, ids: torch.Tensor) -> None:
    """Causal pass over `ids` (1, S) appended to row `row`'s context; writes K/V, returns nothing."""
    stack = model.stack
    n, s = cache.lengths[row], ids.shape[1]
    if n + s > cache.max_context:
        raise ValueError(f"context of {n + s} tokens exceeds the engine's max_context {cache.max_context}")
    c, ring = cache.canvas, cache.ring
    device = ids.device
    new_pos = torch.arange(n, n + s, device=device)
    x = stack.embed(ids)
    rope = model.stack.rope(new_pos[None], x.dtype)
    ring_pos = cache.ring_pos[row]
    ring_slots = c + new_pos[-ring:] % ring if ring > 0 else None
    last = len(stack.layers) - 1
    for i, layer in enumerate(stack.layers):
        attn = layer.self_attn
        sliding = attn.is_sliding
        cos, sin = rope[SLIDING if sliding else "full_attention"]
        q, k, v = _qkv(attn, _norm(layer.input_layernorm, x), cos, sin)
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
            out = _attend(attn, q, torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2), mask)
        if sliding:
            keep = min(s, ring)
            kc[:, :, ring_slots] = k[:, :, -keep:]
            vc[:, :, ring_slots] = v[:, :, -keep:]
        else:
            kc[:, :, c + n:c + n + s] = k
            vc[:, :, c + n:c + n + s] = v
        if i < last:  # the last layer's attention output and FFN feed nothing the cache needs
            x = _feed_forward(layer, x, out)
    if ring > 0:
        ring_pos[ring_slots - c] = new_pos[-ring:]
    cache.lengths[row] = n + s


@torch.no_grad()
def denoise_rows(model: DiffusionGemma, cache: StaticKVCache, canvas: torch.Tensor,
                 soft_embeds: torch.Tensor) -> torch.Tensor:
    """One bidirectional pass for rows 0..B-1: canvas (B, C), soft embeddings of the previous step's
    distribution (B, C, H) (zeros on a canvas's first step). Returns final-normed hidden states (B, C, H).
    Attends to exactly the stored context (shapes follow the host-side lengths)."""
    b, c = canvas.shape
    lengths = cache.lengths[:b]
    device = canvas.device
    ctx = max(lengths)
    lengths_t = torch.tensor(lengths, device=device)
    full_mask = ring_mask = None
    if min(lengths) != ctx:  # rows with different contexts: mask the unused context slots
        slot = torch.arange(c + ctx, device=device)
        full_mask = (slot[None] < c + lengths_t[:, None])[:, None, None]
    if min(lengths) < cache.ring:
        ring_mask = _ring_mask(cache, b, c)
    return _denoise(model, cache, canvas, soft_embeds, lengths_t, c + ctx, full_mask, ring_mask)


@torch.no_grad()
def denoise_rows_static(model: DiffusionGemma, cache: StaticKVCache, canvas: torch.Tensor,
                        soft_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`denoise_rows` with shapes that depend only on the batch size: every context slot is attended
    under a mask built on the device from `lengths` (B,). No host value enters, so it can be captured
    in a CUDA graph and replayed for any context length."""
    b, c = canvas.shape
    slot = torch.arange(c + cache.max_context, device=canvas.device)
    full_mask = (slot[None] < c + lengths[:, None])[:, None, None]
    return _denoise(model, cache, canvas, soft_embeds, lengths, c + cache.max_context, full_mask,
                    _ring_mask(cache, b, c))


def _ring_mask(cache: StaticKVCache, b: int, c: int) -> torch.Tensor:
    valid = torch.cat([torch.ones(b, c, dtype=torch.bool, device=cache.ring_pos.device), cache.ring_pos[:b] >= 0], 1)
    return valid[:, None, None]


def _denoise(model: DiffusionGemma, cache: StaticKVCache, canvas: torch.Tensor, soft_embeds: torch.Tensor,
             lengths: torch.Tensor, full_len: int, full_mask: torch.Tensor | None,
             ring_mask: torch.Tensor | None) -> torch.Tensor:
    stack = model.stack
    b, c = canvas.shape
    positions = lengths[:, None] + torch.arange(c, device=canvas.device)[None]
    sc = stack.self_conditioning
    n = _norm(sc.pre_norm, soft_embeds)
    signal = sc.down_proj(F.gelu(sc.gate_proj(n), approximate="tanh") * sc.up_proj(n))
    x = _norm(sc.post_norm, stack.embed(canvas) + signal)
    rope = model.stack.rope(positions, x.dtype)
    for i, layer in enumerate(stack.layers):
        attn = layer.self_attn
        sliding = attn.is_sliding
        cos, sin = rope[SLIDING if sliding else "full_attention"]
        q, k, v = _qkv(attn, _norm(layer.input_layernorm, x), cos, sin)
        kc, vc = cache.keys[i], cache.values[i]
        kc[:b, :, :c] = k
        vc[:b, :, :c] = v
        if sliding:
            out = _attend(attn, q, kc[:b], vc[:b], ring_mask)
        else:
            out = _attend(attn, q, kc[:b, :, :full_len], vc[:b, :, :full_len], full_mask)
        x = _feed_forward(layer, x, out)
    return _norm(stack.norm, x)


class DenoiseGraphs:
    """CUDA graphs of `denoise_rows_static`, one per batch bucket (1, 2, 4, ... max_batch), captured on
    first use. A step copies its inputs into the bucket's static buffers (padding rows get context 0),
    replays the graph and returns a view of the static output. The eager twin is `denoise_rows_static`."""

    def __init__(self, model: DiffusionGemma, cache: StaticKVCache) -> None:
        self.model, self.cache = model, cache
        self.graphs: dict[int, tuple] = {}

    def bucket(self, b: int) -> int:
        size = 1
        while size < b:
            size *= 2
        return min(size, self.cache.max_batch)

    def __call__(self, canvas: torch.Tensor, soft_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b = canvas.shape[0]
        size = self.bucket(b)
        if size not in self.graphs:
            self.graphs[size] = self._capture(size, canvas, soft_embeds)
        graph, static_canvas, static_soft, static_lengths, static_out = self.graphs[size]
        static_canvas[:b].copy_(canvas)
        static_soft[:b].copy_(soft_embeds)
        static_lengths[:b].copy_(lengths)
        if size > b:
            static_lengths[b:].zero_()
        graph.replay()
        return static_out[:b]

    def _capture(self, size: int, canvas: torch.Tensor, soft_embeds: torch.Tensor):
        c, h = canvas.shape[1], soft_embeds.shape[2]
        static_canvas = torch.zeros(size, c, dtype=canvas.dtype, device=canvas.device)
        static_soft = torch.zeros(size, c, h, dtype=soft_embeds.dtype, device=canvas.device)
        static_lengths = torch.zeros(size, dtype=torch.long, device=canvas.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and the allocator outside the graph
            for _ in range(2):
                denoise_rows_static(self.model, self.cache, static_canvas, static_soft, static_lengths)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = denoise_rows_static(self.model, self.cache, static_canvas, static_soft, static_lengths)
        return graph, static_canvas, static_soft, static_lengths, static_out
