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
from dgemma.model.modeling import Attention, DiffusionGemma


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm in one call (fp32 compute, as the reference `RMSNorm`)."""
    w = None if norm.weight is None else norm.weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), w, norm.eps).to(x.dtype)


class _LayerWeights:
    """One layer's weights laid out for few, large kernels: q/k/v in one matrix, gate/up in one, the
    experts' down projections side by side. On CPU every matrix is stored input-major (x @ W with W
    (in, out) contiguous), which this CPU's GEMMs run 25-35% faster than the checkpoint's (out, in).

    The module parameters are re-pointed at views of the packed tensors, so the model keeps one copy of
    every weight, and the reference path and a saved checkpoint see exactly the same values."""

    def __init__(self, layer, transposed: bool, mkl: bool) -> None:
        attn = layer.self_attn
        linears = [attn.q_proj, attn.k_proj] + ([attn.v_proj] if attn.v_proj is not None else [])
        self.qkv = _pack(linears, transposed)  # (heads x D + kv x D [+ kv x D], H)
        self.n_q, self.n_k = attn.num_heads, attn.num_kv_heads
        self.head_dim = attn.head_dim
        # per-head QK-norm weights for the q and k heads, fp32: (heads + kv, D)
        self.qk_norm = torch.cat([attn.q_norm.weight.detach().float().expand(self.n_q, -1),
                                  attn.k_norm.weight.detach().float().expand(self.n_k, -1)])
        self.eps = attn.q_norm.eps
        self.gate_up = _pack([layer.mlp.gate_proj, layer.mlp.up_proj], transposed)  # (2I, H)
        self.intermediate = layer.mlp.gate_proj.weight.shape[0]
        for single in (attn.o_proj, layer.mlp.down_proj, layer.router.proj):
            _pack([single], transposed)
        experts = layer.experts
        self.expert_gate_up = self.expert_down = None
        if experts.num_experts <= DENSE_EXPERTS:
            self.expert_gate_up, self.expert_down = _pack_experts(experts, transposed)
        # MKL's own packed copies (CPU, fp32): the GEMM skips re-packing the weight on every call
        self.mkl: dict[str, torch.Tensor] = {}
        # with MKL copies (fp32), the FFN's three input products (dense gate/up, every expert's gate/up,
        # router) become one GEMM: they read the same normalised residual, so their norm weights (and the
        # router's scale) are folded into one stacked copy of the three matrices (`ffn_in`)
        self.ffn_in = _fold_ffn_inputs(layer, self.gate_up, self.expert_gate_up, transposed) if mkl else None
        self.ffn_eps = layer.pre_feedforward_layernorm.eps
        if mkl:
            matrices = {"qkv": self.qkv, "o": attn.o_proj.weight, "gate_up": self.gate_up,
                        "down": layer.mlp.down_proj.weight, "expert_gate_up": self.expert_gate_up,
                        "expert_down": self.expert_down, "ffn_in": self.ffn_in}
            if self.ffn_in is not None:
                del matrices["gate_up"], matrices["expert_gate_up"]
            self.mkl = {k: _mkl_pack(w) for k, w in matrices.items() if w is not None}
        self.anchors = self._anchors(layer)

    def _anchors(self, layer) -> tuple[int, ...]:
        attn = layer.self_attn
        weights = (attn.q_proj.weight, attn.o_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.down_proj.weight,
                   layer.router.proj.weight, layer.experts.gate_up_proj, layer.experts.down_proj)
        # versions: the QK-norm weights are copied, and so is every matrix with an MKL copy (in-place
        # updates through the module parameters, which are views, bump the packed storage's version),
        # and the vectors folded into `ffn_in`
        norms = (attn.q_norm.weight, attn.k_norm.weight)
        folded = _ffn_folded_vectors(layer) if self.ffn_in is not None else ()
        versioned = norms + folded + (weights if self.mkl else ())
        return tuple(w.data_ptr() for w in weights + norms + folded) + tuple(w._version for w in versioned)

    def valid(self, layer) -> bool:
        return self._anchors(layer) == self.anchors


DENSE_EXPERTS = 16  # up to this many experts: every expert on every token in two GEMMs (CPU-sized models)
MKL_PACK_LIMIT = 1 << 30  # parameter bytes up to which a CPU model also keeps MKL-packed copies (~1.3x each)
_MKL_PACK_BATCH = 32  # the row count MKL is told to pack for (it serves any number of rows)


def _ffn_folded_vectors(layer) -> tuple[torch.Tensor, ...]:
    return layer.pre_feedforward_layernorm.weight, layer.pre_feedforward_layernorm_2.weight, layer.router.scale


def _fold_ffn_inputs(layer, gate_up: torch.Tensor, expert_gate_up: torch.Tensor | None, transposed: bool
                     ) -> torch.Tensor | None:
    """(2I + E x 2I_e + E, H): [gate_up * w1; expert_gate_up * w2; router * scale / sqrt(H)], w1 and w2 the
    weights of `pre_feedforward_layernorm(_2)`, so that one GEMM of the scale-free RMSNorm of the residual
    gives all three products. None where the three norms differ in eps or the experts are not dense."""
    router, pre1, pre2 = layer.router, layer.pre_feedforward_layernorm, layer.pre_feedforward_layernorm_2
    if expert_gate_up is None or pre1.weight is None or pre2.weight is None or not pre1.eps == pre2.eps == router.eps:
        return None
    with torch.no_grad():
        w1, w2 = pre1.weight.float(), pre2.weight.float()
        rows = [gate_up * w1, expert_gate_up * w2, router.proj.weight * (router.scale.float() * router.root_size)]
        stacked = torch.cat(rows)
        # input-major like the other CPU matrices: MKL reads it for row counts other than the packed 32
        return stacked.T.contiguous().T if transposed else stacked.contiguous()


def _mkl_wanted(model: DiffusionGemma) -> bool:
    """MKL-packed weight copies: fp32 on a CPU with MKL, for models of up to MKL_PACK_LIMIT bytes."""
    if model.device.type != "cpu" or model.dtype != torch.float32 or not torch.backends.mkl.is_available():
        return False
    if not hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"):
        return False
    return sum(p.numel() * p.element_size() for p in model.parameters()) <= MKL_PACK_LIMIT


def _mkl_pack(w: torch.Tensor) -> torch.Tensor:
    """MKL's packed form of an (out, in) weight, for `linear`."""
    return torch.ops.mkl._mkl_reorder_linear_weight(w.detach().contiguous(), _MKL_PACK_BATCH)


_MKL_IN_GRAPHS = False  # set by `allow_mkl_in_graphs`


def allow_mkl_in_graphs() -> None:
    """Let compiled graphs call MKL's packed GEMM: inductor's own lowering of that op only accepts weights
    frozen into the graph as constants, ours are graph inputs, so the op is made an ordinary library call
    (C++ on the compiled path). Where that is not possible, compiled graphs use plain GEMMs (`linear`)."""
    global _MKL_IN_GRAPHS
    if _MKL_IN_GRAPHS:
        return
    try:
        from torch._inductor import lowering

        op = torch.ops.mkl._mkl_linear
        for key in (op, op.default):
            lowering.lowerings.pop(key, None)
        lowering.make_fallback(op.default)
        _MKL_IN_GRAPHS = True
    except (ImportError, AttributeError, AssertionError):
        pass


def linear(x: torch.Tensor, weight: torch.Tensor, mkl: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight)`; through MKL's packed GEMM when `mkl` (`_mkl_pack(weight)`) is given, which is
    15-25% faster for the M = 32-row products of a denoising step on CPU."""
    if mkl is None or (torch.compiler.is_compiling() and not _MKL_IN_GRAPHS):
        return F.linear(x, weight)
    return torch.ops.mkl._mkl_linear(x, mkl, weight, None, _MKL_PACK_BATCH)


def _param(value: torch.Tensor, like: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(value, requires_grad=like.requires_grad)


def _pack(linears, transposed: bool) -> torch.Tensor:
    """Concatenate the weights of `linears` (out features stacked) and re-point each module's weight at
    its rows; returns the packed (sum of out, in) matrix for `F.linear`. `transposed`: the storage is
    (in, sum of out) contiguous and the returned matrix is its transpose view."""
    weights = [m.weight for m in linears]
    if transposed:
        packed = torch.cat([w.detach().T for w in weights], dim=1).contiguous().T
    else:
        packed = torch.cat([w.detach() for w in weights])
    start = 0
    for m, w in zip(linears, weights, strict=True):
        m.weight = _param(packed[start:start + w.shape[0]], w)
        start += w.shape[0]
    return packed


def _pack_experts(experts, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert as one wide GEMM: gate/up (E x 2I, H) and down (H, E x I), so that the routing-weighted
    sum over experts is part of the second GEMM; `gate_up_proj` and `down_proj` become views of them."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    e, two_i, h = gate_up.shape
    i = down.shape[2]
    if transposed:
        gu = gate_up.detach().reshape(e * two_i, h).T.contiguous().T
        d = down.detach().permute(0, 2, 1).reshape(e * i, h).contiguous()  # (E x I, H)
        experts.down_proj = _param(d.view(e, i, h).permute(0, 2, 1), down)
        d = d.T
    else:
        gu = gate_up.detach().reshape(e * two_i, h).contiguous()
        d = down.detach().permute(1, 0, 2).reshape(h, e * i).contiguous()  # (H, E x I)
        experts.down_proj = _param(d.view(h, e, i).permute(1, 0, 2), down)
    experts.gate_up_proj = _param(gu.view(e, two_i, h), gate_up)
    return gu, d


class FastWeights:
    """Packed weights of a whole model, built once and cached on it (`fast_weights(model)`). On CPU also
    an input-major copy of the tied embedding for the head GEMM (the embedding itself stays row-major
    for lookups and the self-conditioning product)."""

    def __init__(self, model: DiffusionGemma) -> None:
        stack = model.stack
        transposed = model.device.type == "cpu"
        mkl = _mkl_wanted(model)
        self.layers = [_LayerWeights(layer, transposed, mkl) for layer in stack.layers]
        sc = stack.self_conditioning
        self.sc_gate_up = _pack([sc.gate_proj, sc.up_proj], transposed)
        _pack([sc.down_proj], transposed)
        embed = stack.embed_tokens.weight
        self.head = embed.detach().T.contiguous().T if transposed else embed.detach()
        # MKL copies (see _LayerWeights); "soft": E^T, for the self-conditioning product softmax @ E
        self.mkl: dict[str, torch.Tensor] = {}
        if mkl:
            self.mkl = {"sc_gate_up": _mkl_pack(self.sc_gate_up), "sc_down": _mkl_pack(sc.down_proj.weight),
                        "head": _mkl_pack(embed), "soft": _mkl_pack(self.head.T)}
        self.anchors = self._anchors(model)

    def _anchors(self, model: DiffusionGemma) -> tuple[int, ...]:
        sc, embed = model.stack.self_conditioning, model.stack.embed_tokens.weight
        versions = (sc.gate_proj.weight._version, sc.down_proj.weight._version) if self.mkl else ()
        return (len(model.stack.layers), sc.gate_proj.weight.data_ptr(), sc.down_proj.weight.data_ptr(),
                embed.data_ptr(), embed._version) + versions

    def valid(self, model: DiffusionGemma) -> bool:
        return (self._anchors(model) == self.anchors
                and all(w.valid(layer) for w, layer in zip(self.layers, model.stack.layers, strict=True)))


@torch.no_grad()
def fast_weights(model: DiffusionGemma) -> FastWeights:
    """The model's packed weights, (re)built when its parameters were replaced (e.g. `model.to(...)`) or,
    where MKL copies exist (fp32 CPU models), updated in place (version counters; `.data` writes are not
    seen). Packing replaces the parameter objects (same values): build an optimizer after creating an
    Engine, or train a model no Engine has touched. An Engine re-checks this when it admits requests."""
    fw = model.__dict__.get("_dgemma_fast_weights")
    if fw is None or not fw.valid(model):
        with torch.inference_mode(False):  # normal tensors: the parameters become views of them
            fw = FastWeights(model)
        model.__dict__["_dgemma_fast_weights"] = fw
    return fw


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """`F.gelu(x, approximate="tanh")`. Compiled for a CPU it is written as x * sigmoid(2u) with a single exp
    (the same function, within 1e-6): inductor's vectorised tanh costs several times ATen's."""
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        u = x * (1.5957691216057308 + 0.07135481627260025 * x * x)  # 2 sqrt(2/pi) (x + 0.044715 x^3)
        return x / (1 + torch.exp(-u))
    return F.gelu(x, approximate="tanh")


def _gated(x: torch.Tensor, gate_up: torch.Tensor, down: torch.nn.Linear, inter: int,
           mkl: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """down(gelu_tanh(gate(x)) * up(x)) with gate and up in one GEMM; `mkl`: packed copies of both."""
    gu = linear(x, gate_up, mkl[0])
    return linear(gelu_tanh(gu[..., :inter]) * gu[..., inter:], down.weight, mkl[1])


def _experts(experts, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             packed: tuple[torch.Tensor, torch.Tensor] | None = None,
             mkl: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """Routed experts. Few experts (CPU-sized models, `packed` by `_pack_experts`): every expert on every
    token in one GEMM, the routing weights (zero for experts not chosen) applied to the activations, and
    (fp32) the weighted sum over experts done by the second GEMM. Many experts: tokens sorted by expert and
    two grouped GEMMs (no Python loop, no host sync); the reference loop where those are unavailable."""
    if packed is None:
        if _grouped_ok(experts, x):
            return _experts_grouped(experts, x, ids, weights)
        return experts(x, ids, weights)
    return _dense_experts(experts, linear(x, packed[0], mkl[0]), ids, weights, packed[1], mkl[1])


def _dense_experts(experts, gu: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, down: torch.Tensor,
                   down_mkl: torch.Tensor | None) -> torch.Tensor:
    """The rest of `_experts` for few experts from every expert's gate/up products gu (T, E x 2I)."""
    t, e = gu.shape[0], experts.num_experts
    dtype = gu.dtype
    gu = gu.view(t, e, 2, -1)
    act = gelu_tanh(gu[:, :, 0]) * gu[:, :, 1]  # (T, E, I)
    dense_w = torch.zeros(t, e, dtype=torch.float32, device=gu.device).scatter_(1, ids, weights)
    if dtype == torch.float32:
        return linear((act * dense_w[:, :, None]).view(t, -1), down, down_mkl)
    # lower precision: round each expert's output, then weight and sum in fp32, as the reference does
    y = torch.matmul(act.transpose(0, 1), experts.down_proj.transpose(1, 2))  # (E, T, H)
    return torch.einsum("eth,te->th", y.float(), dense_w).to(dtype)


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


def _route(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Router.forward` with the fused norm: x (T, H) -> weights (T, K) fp32, expert ids (T, K)."""
    y = F.rms_norm(x.float(), (x.shape[-1],), None, router.eps).to(x.dtype)
    return _route_scores(router, F.linear(y * router.scale * router.root_size, router.proj.weight))


def _route_scores(router, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(scores, dim=-1, dtype=torch.float32)
    weights, ids = _top_k(probs, router.top_k)
    return weights / weights.sum(dim=-1, keepdim=True) * router.per_expert_scale[ids], ids


def _top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk` over the experts. Compiled, k <= 2 is one or two max reductions instead (fused with
    the softmax; a topk is a separate library call there). Ties: the lower index first."""
    if k > 2 or not torch.compiler.is_compiling():
        return torch.topk(probs, k=k, dim=-1)
    w1, i1 = probs.max(dim=-1, keepdim=True)
    if k == 1:
        return w1, i1
    rest = probs.scatter(-1, i1, float("-inf"))
    w2, i2 = rest.max(dim=-1, keepdim=True)
    return torch.cat([w1, w2], -1), torch.cat([i1, i2], -1)


def _feed_forward(layer, lw: _LayerWeights, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """`DecoderLayer.finish` with fused norms, packed gate/up and the batched experts."""
    r = x + _norm(layer.post_attention_layernorm, attn_out)
    mlp = layer.mlp
    flat = r.reshape(-1, r.shape[-1])
    if lw.ffn_in is not None:  # the three input products in one GEMM (see `_fold_ffn_inputs`)
        i, n_experts = lw.intermediate, lw.expert_gate_up.shape[0]
        y = linear(F.rms_norm(flat, (flat.shape[-1],), None, lw.ffn_eps), lw.ffn_in, lw.mkl["ffn_in"])
        dense = linear(gelu_tanh(y[:, :i]) * y[:, i:2 * i], mlp.down_proj.weight, lw.mkl["down"])
        weights, ids = _route_scores(layer.router, y[:, 2 * i + n_experts:])
        routed = _dense_experts(layer.experts, y[:, 2 * i:2 * i + n_experts], ids, weights, lw.expert_down,
                                lw.mkl["expert_down"])
    else:
        dense = _gated(_norm(layer.pre_feedforward_layernorm, flat), lw.gate_up, mlp.down_proj, lw.intermediate,
                       (lw.mkl.get("gate_up"), lw.mkl.get("down")))
        weights, ids = _route(layer.router, flat)
        packed = (lw.expert_gate_up, lw.expert_down) if lw.expert_down is not None else None
        routed = _experts(layer.experts, _norm(layer.pre_feedforward_layernorm_2, flat), ids, weights, packed,
                          (lw.mkl.get("expert_gate_up"), lw.mkl.get("expert_down")))
    both = _norm(layer.post_feedforward_layernorm_1, dense) + _norm(layer.post_feedforward_layernorm_2, routed)
    return (r + _norm(layer.post_feedforward_layernorm, both).view(r.shape)) * layer.layer_scalar


def _qkv(lw: _LayerWeights, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
    """One GEMM for q, k (and v), one RMSNorm over every head, the QK-norm weights in one multiply and
    RoPE on q and k together. q (B, heads, S, D); k, v (B, kv_heads, S, D). On full layers V is the
    scale-free norm of the raw key projection (K = V)."""
    b, s, _ = x.shape
    nq, nk, d = lw.n_q, lw.n_k, lw.head_dim
    heads = linear(x, lw.qkv, lw.mkl.get("qkv")).view(b, s, -1, d)
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


def _layer_qkv(fw: FastWeights, i: int, layer, x: torch.Tensor, rope: dict) -> tuple:
    """Layer i's attention module and its q, k, v for x (input norm, `_qkv` with the layer type's RoPE)."""
    attn = layer.self_attn
    cos, sin = rope[SLIDING if attn.is_sliding else "full_attention"]
    return (attn, *_qkv(fw.layers[i], _norm(layer.input_layernorm, x), cos, sin))


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            mkl: torch.Tensor | None = None):
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0,
                                         enable_gqa=attn.num_heads != attn.num_kv_heads)
    b, _, s, _ = out.shape
    return linear(out.transpose(1, 2).reshape(b, s, -1), attn.o_proj.weight, mkl)


@torch.no_grad()
def encode_row(model: DiffusionGemma, cache: StaticKVCache, row: int, ids: torch.Tensor,
               fw: FastWeights | None = None) -> None:
    """Causal pass over `ids` (1, S) appended to row `row`'s context; writes K/V, returns nothing. `fw`: the
    model's `fast_weights` when the caller holds them (saves the cache check)."""
    stack, fw = model.stack, fw or fast_weights(model)
    n, s = cache.lengths[row], ids.shape[1]
    cache.check_room(row, s)
    c, ring = cache.canvas, cache.ring
    device = ids.device
    new_pos = torch.arange(n, n + s, device=device)
    x = stack.embed(ids)
    rope = _rope(stack, new_pos[None], x.dtype)
    ring_pos = cache.ring_pos[row]
    ring_slots = c + new_pos[-ring:] % ring if ring > 0 else None
    last = len(stack.layers) - 1
    for i, layer in enumerate(stack.layers):
        attn, q, k, v = _layer_qkv(fw, i, layer, x, rope)
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
            out = _attend(attn, q, torch.cat([ctx_k, k], 2), torch.cat([ctx_v, v], 2), mask, fw.layers[i].mkl.get("o"))
        if sliding:
            keep = min(s, ring)
            kc[:, :, ring_slots] = k[:, :, -keep:]
            vc[:, :, ring_slots] = v[:, :, -keep:]
        else:
            kc[:, :, c + n:c + n + s] = k
            vc[:, :, c + n:c + n + s] = v
        if i < last:  # the last layer's attention output and FFN feed nothing the cache needs
            x = _feed_forward(layer, fw.layers[i], x, out)
    if ring > 0:
        ring_pos[ring_slots - c] = new_pos[-ring:]
    cache.lengths[row] = n + s


def encode_canvas(model: DiffusionGemma, fw: FastWeights, keys: list[torch.Tensor], values: list[torch.Tensor],
                  ring_pos: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor) -> None:
    """`encode_row` for one row and a whole canvas (C tokens), with no host value inside (the compiled
    engine's commit pass): `keys`/`values` the row's per-layer cache views (1, kv heads, slots, D),
    `ring_pos` its (1, ring) view, ids (1, C), `slots` = arange(C + n) with n the row's context length as
    its (dynamic) size. The new K/V go into the canvas slots first (free between denoising steps), so
    each layer attends to one view [canvas | context] with a causal mask over the canvas part, then are
    copied into the context slots (full layers) or the ring (sliding layers). The caller advances
    `cache.lengths`."""
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
        attn, q, k, v = _layer_qkv(fw, i, layer, x, rope)
        sliding = attn.is_sliding
        kc, vc = keys[i], values[i]
        kc[:, :, :c] = k
        vc[:, :, :c] = v
        if i < last:
            o_mkl = fw.layers[i].mkl.get("o")
            if sliding:
                out = _attend(attn, q, kc, vc, ring_mask, o_mkl)
            else:
                out = _attend(attn, q, kc[:, :, :c + n], vc[:, :, :c + n], full_mask, o_mkl)
        if sliding:
            kc[:, :, ring_slots] = k[:, :, c - keep:]
            vc[:, :, ring_slots] = v[:, :, c - keep:]
        else:
            kc[:, :, c + n:2 * c + n] = k
            vc[:, :, c + n:2 * c + n] = v
        if i < last:  # the last layer's attention output and FFN feed nothing the cache needs
            x = _feed_forward(layer, fw.layers[i], x, out)
    ring_pos[0, ring_slots - c] = new_pos[c - keep:]


@torch.no_grad()
def denoise_rows(model: DiffusionGemma, cache: StaticKVCache, canvas: torch.Tensor,
                 soft_embeds: torch.Tensor, fw: FastWeights | None = None) -> torch.Tensor:
    """One bidirectional pass for rows 0..B-1: canvas (B, C), soft embeddings of the previous step's
    distribution (B, C, H) (zeros on a canvas's first step). Returns final-normed hidden states (B, C, H).
    Attends to exactly the stored context (shapes follow the host-side lengths); masks only where some
    rows have a shorter context or unfilled sliding-window slots. `fw` as in `encode_row`."""
    b, c = canvas.shape
    lengths = cache.lengths[:b]
    context = max(lengths)
    lengths_t = torch.tensor(lengths, device=canvas.device)
    full_mask = ring_mask = None
    if min(lengths) != context:
        full_mask = _context_mask(torch.arange(c + context, device=canvas.device), lengths_t, c)
    if min(lengths) < cache.ring:
        ring_mask = _ring_mask(cache, b, c)
    return _denoise(model, fw or fast_weights(model), cache, canvas, soft_embeds, lengths_t, c + context,
                    full_mask, ring_mask)


def denoise_masked(model: DiffusionGemma, fw: FastWeights, cache: StaticKVCache, canvas: torch.Tensor,
                   soft_embeds: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`denoise_rows` with no host value inside: the rows' context lengths (B,) on the device, `slots` =
    arange(C + the context slots to attend) carrying that count as a tensor size (which `torch.compile` can
    mark dynamic), both masks always built, and `fw` (the model's `fast_weights`) passed in from outside a
    compiled region. Same result as `denoise_rows`."""
    b, c = canvas.shape
    return _denoise(model, fw, cache, canvas, soft_embeds, lengths, slots.shape[0],
                    _context_mask(slots, lengths, c), _ring_mask(cache, b, c))


@torch.no_grad()
def denoise_rows_static(model: DiffusionGemma, cache: StaticKVCache, canvas: torch.Tensor,
                        soft_embeds: torch.Tensor, lengths: torch.Tensor, fw: FastWeights | None = None
                        ) -> torch.Tensor:
    """`denoise_masked` over every context slot, so shapes depend only on the batch size: it can be
    captured in a CUDA graph and replayed for any context length."""
    slots = torch.arange(canvas.shape[1] + cache.max_context, device=canvas.device)
    return denoise_masked(model, fw or fast_weights(model), cache, canvas, soft_embeds, lengths, slots)


def _context_mask(slots: torch.Tensor, lengths: torch.Tensor, c: int) -> torch.Tensor:
    """(B, 1, 1, slots): the canvas slots and each row's own context slots."""
    return (slots[None] < c + lengths[:, None])[:, None, None]


def _ring_mask(cache: StaticKVCache, b: int, c: int) -> torch.Tensor:
    valid = torch.cat([torch.ones(b, c, dtype=torch.bool, device=cache.ring_pos.device), cache.ring_pos[:b] >= 0], 1)
    return valid[:, None, None]


def _denoise(model: DiffusionGemma, fw: FastWeights, cache: StaticKVCache, canvas: torch.Tensor,
             soft_embeds: torch.Tensor, lengths: torch.Tensor, full_len: int, full_mask: torch.Tensor | None,
             ring_mask: torch.Tensor | None) -> torch.Tensor:
    stack = model.stack
    b, c = canvas.shape
    positions = lengths[:, None] + torch.arange(c, device=canvas.device)[None]
    sc = stack.self_conditioning
    signal = _gated(_norm(sc.pre_norm, soft_embeds), fw.sc_gate_up, sc.down_proj, sc.gate_proj.weight.shape[0],
                    (fw.mkl.get("sc_gate_up"), fw.mkl.get("sc_down")))
    x = _norm(sc.post_norm, stack.embed(canvas) + signal)
    rope = _rope(stack, positions, x.dtype)
    for i, layer in enumerate(stack.layers):
        attn, q, k, v = _layer_qkv(fw, i, layer, x, rope)
        sliding = attn.is_sliding
        kc, vc = cache.keys[i], cache.values[i]
        kc[:b, :, :c] = k
        vc[:b, :, :c] = v
        o_mkl = fw.layers[i].mkl.get("o")
        if sliding:
            out = _attend(attn, q, kc[:b], vc[:b], ring_mask, o_mkl)
        else:
            out = _attend(attn, q, kc[:b, :, :full_len], vc[:b, :, :full_len], full_mask, o_mkl)
        x = _feed_forward(layer, fw.layers[i], x, out)
    return _norm(stack.norm, x)
