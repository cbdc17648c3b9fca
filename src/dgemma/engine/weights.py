"""The engine's weights and its one matrix-multiply seam.

Every product of the fast path goes through a `Linear` (`y = x @ W^T`): q/k/v, attention output, the dense MLP,
the router, the experts, self-conditioning, the head and the soft-embedding product. An adapted or quantized
weight is one new kind of `Linear` here; nothing else changes.

`pack_weights(model)` builds them once per engine. The model's own parameters are never touched (no
re-pointing, nothing cached on the module): a CPU-sized model (parameters up to PACK_LIMIT bytes) gets packed
copies laid out for few, large kernels (q/k/v in one matrix, gate/up in one, every expert in one wide GEMM;
input-major on CPU, where its GEMMs run 25-35% faster; fp32 CPU models also keep MKL's own packed copies, and
fold the FFN's three input products into one GEMM). A larger model multiplies its parameters as they are.
`ModelWeights.valid` notices replaced parameters and in-place updates (version counters) so the engine
re-packs. tests/test_engine.py checks the packed forward against the reference and the re-packing.

Compressed weights (`model/quant.py`) are never copied: `QuantProduct` and the quantized expert banks hold the
model's compressed tensors and dequantize inside each call (one matrix, or a chunk of experts, at a time); on a
Hopper-class GPU, FP8 checkpoints with dynamic activations use scaled FP8 GEMMs after a probe against the
dequantized product (engine/fp8.py). tests/test_quant.py checks them against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dgemma.config.quantization import FP8
from dgemma.engine import fp8
from dgemma.engine.ops import gelu_tanh
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.quant import QuantExperts, QuantLinear, fp8_as_half

PACK_LIMIT = 1 << 30  # parameter bytes up to which the engine keeps packed copies (and, fp32 CPU, MKL packs)
DENSE_EXPERTS = 16  # up to this many experts: every expert on every token in two GEMMs (CPU-sized models)
_MKL_PACK_BATCH = 32  # the row count MKL is told to pack for (it serves any number of rows)
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
    """`F.linear(x, weight)`; through MKL's packed GEMM when `mkl` (`mkl_pack(weight)`) is given, which is
    15-25% faster for the M = 32-row products of a denoising step on CPU."""
    if mkl is None or (torch.compiler.is_compiling() and not _MKL_IN_GRAPHS):
        return F.linear(x, weight)
    return torch.ops.mkl._mkl_linear(x, mkl, weight, None, _MKL_PACK_BATCH)


def mkl_pack(w: torch.Tensor) -> torch.Tensor:
    """MKL's packed form of an (out, in) weight, for `linear`."""
    return torch.ops.mkl._mkl_reorder_linear_weight(w.detach().contiguous(), _MKL_PACK_BATCH)


class Linear:
    """y = x @ weight^T, with MKL's packed copy when there is one, plus a LoRA update scale * B A x when an adapter
    is attached to an unpacked model (a packed model has it folded into its copy). `weight` may be a packed copy
    or the model's own parameter."""

    __slots__ = ("lora", "mkl", "weight")

    def __init__(self, weight: torch.Tensor, mkl: bool = False,
                 lora: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> None:
        self.weight = weight
        self.mkl = mkl_pack(weight) if mkl else None
        self.lora = lora  # (A (r, in), B (out, r), scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.mkl)
        if self.lora is not None:
            a, b, scale = self.lora
            y = y + (F.linear(F.linear(x.to(a.dtype), a), b) * scale).to(y.dtype)
        return y


class Stacked:
    """Several linears on the same input, outputs concatenated (an unpacked model's q/k/v or gate/up)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Linear]) -> None:
        self.parts = parts

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


class QuantProduct:
    """y = x @ [W_1; ...; W_n]^T for compressed weights (`QuantLinear`s on the same input), dequantized inside the
    call: the full-precision matrix exists only for this product. FP8 multiplies the exact code values and scales
    the product's columns by the per-channel scales instead (the same product, one pass over the matrix fewer).
    With `native` (a probed FP8 GPU), scaled FP8 GEMMs with per-token activation scales. An attached LoRA update
    is added beside, per part."""

    __slots__ = ("bounds", "lora", "native", "out_scale", "parts")

    def __init__(self, parts: list[QuantLinear], lora: list[tuple[torch.Tensor, torch.Tensor, float] | None],
                 native: bool = False) -> None:
        self.parts, self.native = parts, native
        ends = torch.tensor([p.out_features for p in parts]).cumsum(0).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        self.lora = [(lo, hi, ab) for (lo, hi), ab in zip(self.bounds, lora, strict=True) if ab is not None]
        fp8_parts = all(p.scheme == FP8 for p in parts)
        # (out,) fp32: the scales times 2^8, the offset of `fp8_as_half`
        self.out_scale = torch.cat([p.weight_scale.float().view(-1) for p in parts]) * 256.0 if fp8_parts else None

    def codes(self, dtype: torch.dtype) -> torch.Tensor:
        """FP8: the stacked code values times 2^-8, (out, in) in `dtype` (exact)."""
        bits = torch.empty(self.bounds[-1][1], self.parts[0].in_features, dtype=torch.int16,
                           device=self.parts[0].weight.device)
        for (lo, hi), p in zip(self.bounds, self.parts, strict=True):
            fp8_as_half(p.weight, out=bits[lo:hi])
        return bits.view(torch.float16).to(dtype)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The stacked (out, in) matrix in `dtype` (a transient copy)."""
        if len(self.parts) == 1:
            return self.parts[0].dequantize(dtype)
        w = torch.empty(self.bounds[-1][1], self.parts[0].in_features, dtype=dtype, device=self.parts[0].weight.device)
        for (lo, hi), p in zip(self.bounds, self.parts, strict=True):
            p.dequantize(dtype, out=w[lo:hi])
        return w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            y = fp8.linear(x, self.parts)
        elif self.out_scale is not None:
            y = F.linear(x, self.codes(x.dtype)).mul_(self.out_scale)
        else:
            y = F.linear(x, self.weight(x.dtype))
        for lo, hi, (a, b, scale) in self.lora:
            y[..., lo:hi] += (F.linear(F.linear(x.to(a.dtype), a), b) * scale).to(y.dtype)
        return y


class _Packer:
    """How one model's weights are laid out: packed copies or its parameters as they are."""

    def __init__(self, model: DiffusionGemma) -> None:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        self.copy = size <= PACK_LIMIT
        self.lora = _attached_lora(model)
        self.transposed = self.copy and model.device.type == "cpu"
        self.mkl = (self.copy and model.device.type == "cpu" and model.dtype == torch.float32
                    and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))
        q = model.config.quantization
        self.fp8_native = q is not None and q.dynamic_activations and fp8.native_ok(model.device, model.dtype)

    def layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """A fresh copy of an (out, in) matrix in this model's layout (input-major storage on CPU)."""
        return matrix.T.contiguous().T if self.transposed else matrix.contiguous()

    def linear(self, *modules: torch.nn.Linear, mkl: bool = True) -> Linear | Stacked:
        """The linears of `modules` (same input) as one product: one packed matrix, or each as it is."""
        quantized = [isinstance(m, QuantLinear) for m in modules]
        if all(quantized):
            return QuantProduct(list(modules), [self.lora.get(id(m)) for m in modules], native=self.fp8_native)
        if any(quantized):  # some of a group compressed: each product on its own
            return Stacked([self.linear(m, mkl=mkl) for m in modules])
        weights = [m.weight.detach() for m in modules]
        if not self.copy:  # the parameters as they are, a LoRA update computed beside them
            parts = [Linear(w, lora=self.lora.get(id(m))) for w, m in zip(weights, modules, strict=True)]
            return parts[0] if len(parts) == 1 else Stacked(parts)
        return Linear(self.layout(torch.cat([self.weight(m) for m in modules])), mkl=mkl and self.mkl)

    def weight(self, module: torch.nn.Linear) -> torch.Tensor:
        """A linear's weight as the engine multiplies it: with an attached adapter's update folded in (a copy)."""
        w = module.weight.detach()  # the sum in fp32, rounded once, as `train.lora.merge_adapter` forms it
        return (w.float() + self.delta(module)).to(w.dtype) if id(module) in self.lora else w

    def delta(self, module: torch.nn.Linear) -> torch.Tensor:
        """scale * B @ A of the adapter on `module` (folded into a packed copy; the model is untouched)."""
        a, b, scale = self.lora[id(module)]
        return (b.float() @ a.float()) * scale


class DenseExperts:
    """Few experts (CPU-sized models): every expert on every token in one wide GEMM `experts_in` (E x 2I, H), the
    routing weights (zero for experts not chosen) applied to the activations, and (fp32) the weighted sum over
    experts done by the second GEMM `experts_out` (H, E x I)."""

    def __init__(self, experts, packer: _Packer) -> None:
        gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
        e, two_i, h = gate_up.shape
        self.num_experts, self.intermediate = e, two_i // 2
        self.experts_in = Linear(packer.layout(gate_up.reshape(e * two_i, h)), mkl=packer.mkl)
        self.experts_out = Linear(packer.layout(down.permute(1, 0, 2).reshape(h, e * down.shape[2])), mkl=packer.mkl)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H) normed, ids / weights (T, K) -> (T, H) in x.dtype."""
        return self.from_products(self.experts_in(x), ids, weights)

    def from_products(self, gu: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The rest, from every expert's gate/up products gu (T, E x 2I)."""
        t, e = gu.shape[0], self.num_experts
        dtype = gu.dtype
        gu = gu.view(t, e, 2, -1)
        act = gelu_tanh(gu[:, :, 0]) * gu[:, :, 1]  # (T, E, I)
        dense_w = torch.zeros(t, e, dtype=torch.float32, device=gu.device).scatter_(1, ids, weights)
        if dtype == torch.float32:
            return self.experts_out((act * dense_w[:, :, None]).view(t, -1))
        # lower precision: round each expert's output, then weight and sum in fp32, as the reference does
        down = self.experts_out.weight.view(-1, e, self.intermediate).permute(1, 2, 0)  # (E, I, H)
        y = torch.matmul(act.transpose(0, 1), down)  # (E, T, H)
        return torch.einsum("eth,te->th", y.float(), dense_w).to(dtype)


class GroupedExperts:
    """Many experts: tokens sorted by expert and two grouped GEMMs over the expert banks (no Python loop, no host
    sync); the reference loop where grouped GEMMs are unavailable. The banks are the model's parameters."""

    def __init__(self, experts) -> None:
        self.module = experts
        self.gate_up, self.down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # (E, 2I, H), (E, H, I)
        self.num_experts = self.gate_up.shape[0]

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if not self._grouped_ok(x):
            return self.module(x, ids, weights)
        t, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # histc, not bincount: no host sync, so this can live inside a CUDA graph (int input on CUDA)
        counts = torch.histc(flat.float() if flat.device.type == "cpu" else flat.int(), bins=self.num_experts,
                             min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        xs = x[order // k]
        gate, up = torch._grouped_mm(xs, self.gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        y = torch._grouped_mm(F.gelu(gate, approximate="tanh") * up, self.down.transpose(1, 2), offs=offsets)
        weighted = y * weights.reshape(-1)[order, None]  # fp32, as transformers' grouped path
        out = torch.empty_like(weighted)
        out[order] = weighted
        return out.view(t, k, -1).sum(dim=1).to(x.dtype)

    def _grouped_ok(self, x: torch.Tensor) -> bool:
        if not hasattr(torch, "_grouped_mm"):
            return False
        align = 16 // x.element_size()  # grouped GEMMs need 16-byte aligned rows
        _, two_i, h = self.gate_up.shape
        return h % align == 0 and (two_i // 2) % align == 0 and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


class QuantDenseExperts:
    """`DenseExperts` for compressed banks: every expert on every token, the layer's banks dequantized inside the
    call. Each expert's output is rounded to the compute dtype, then weighted and summed in fp32 (the reference's
    order)."""

    def __init__(self, experts: QuantExperts) -> None:
        self.gate_up, self.down = experts.gate_up_proj, experts.down_proj
        self.num_experts, self.intermediate = experts.num_experts, experts.down_proj.cols
        self.scales = None  # FP8: the products' columns are scaled (see `QuantProduct`)
        if self.gate_up.scheme == FP8:
            e, h = self.num_experts, self.down.rows
            self.scales = (self.gate_up.weight_scale.float().view(-1) * 256.0,
                           self.down.weight_scale.float().view(e, 1, h) * 256.0)

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H) normed, ids / weights (T, K) -> (T, H) in x.dtype."""
        t, e, i = x.shape[0], self.num_experts, self.intermediate
        if self.scales is not None:
            gu = F.linear(x, fp8_as_half(self.gate_up.weight).to(x.dtype).view(e * 2 * i, -1)).mul_(self.scales[0])
            down = fp8_as_half(self.down.weight).to(x.dtype)
        else:
            gu = F.linear(x, self.gate_up.dequantize(x.dtype).view(e * 2 * i, -1))
            down = self.down.dequantize(x.dtype)
        gu = gu.view(t, e, 2, i)
        act = gelu_tanh(gu[:, :, 0]) * gu[:, :, 1]  # (T, E, I)
        y = torch.matmul(act.transpose(0, 1), down.transpose(1, 2))  # (E, T, H)
        if self.scales is not None:
            y.mul_(self.scales[1])
        dense_w = torch.zeros(t, e, dtype=torch.float32, device=x.device).scatter_(1, ids, weights)
        return torch.einsum("eth,te->th", y.float(), dense_w).to(x.dtype)


class QuantGroupedExperts:
    """Many experts over compressed banks: tokens sorted by expert, then per chunk of experts (at most
    CHUNK_BYTES once dequantized) the chunk's banks dequantized and its tokens multiplied, with grouped GEMMs where
    available. On CPU the expert counts are host values already; on a GPU, FP8 banks use scaled grouped GEMMs
    (no dequantization) and other banks are dequantized per layer for `torch._grouped_mm`."""

    CHUNK_BYTES = 64 << 20

    def __init__(self, experts: QuantExperts, native: bool = False) -> None:
        self.module, self.native = experts, native
        self.gate_up, self.down = experts.gate_up_proj, experts.down_proj
        self.num_experts = experts.num_experts
        self.scales = fp8.bank_scales(experts) if native else None

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t, k = ids.shape
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        xs = x[order // k]
        if self.native:
            y = fp8.grouped_experts(xs, flat, self.module, self.scales)
        elif x.device.type != "cpu" and _grouped_ok(x, self.gate_up.weight):
            y = _grouped_products(xs, flat, self.gate_up.dequantize(x.dtype), self.down.dequantize(x.dtype))
        else:  # sync: free on CPU; on a GPU only where grouped GEMMs cannot run
            y = self._chunked(xs, torch.bincount(flat, minlength=self.num_experts).tolist())
        weighted = y.float() * weights.reshape(-1)[order, None]
        out = torch.empty_like(weighted)
        out[order] = weighted
        return out.view(t, k, -1).sum(dim=1).to(x.dtype)

    def _chunked(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """(T*K, H) rows sorted by expert, with the per-expert row counts (host ints) -> expert outputs (T*K, H)."""
        per_expert = (self.gate_up.rows * self.gate_up.cols + self.down.rows * self.down.cols) * xs.element_size()
        chunk = max(1, self.CHUNK_BYTES // per_expert)
        out = xs.new_empty(xs.shape)
        start = 0
        for e0 in range(0, self.num_experts, chunk):
            e1 = min(e0 + chunk, self.num_experts)
            n = sum(counts[e0:e1])
            if n == 0:
                continue
            experts = slice(e0, e1)
            gate_up, down = self.gate_up.dequantize(xs.dtype, experts), self.down.dequantize(xs.dtype, experts)
            rows = xs[start:start + n]
            if _grouped_ok(rows, gate_up):
                offsets = torch.tensor(counts[e0:e1]).cumsum(0).to(torch.int32)
                gate, up = torch._grouped_mm(rows, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
                out[start:start + n] = torch._grouped_mm(gelu_tanh(gate) * up, down.transpose(1, 2), offs=offsets)
            else:
                at = 0
                for j, c in enumerate(counts[e0:e1]):
                    gate, up = F.linear(rows[at:at + c], gate_up[j]).chunk(2, dim=-1)
                    out[start + at:start + at + c] = F.linear(gelu_tanh(gate) * up, down[j])
                    at += c
            start += n
        return out


def _grouped_ok(x: torch.Tensor, gate_up: torch.Tensor) -> bool:
    """Grouped GEMMs exist and the rows of x (T, H) and of the (E, 2I, H) bank are 16-byte aligned (bf16 on a
    GPU); `gate_up` may be the compressed bank (only its first two dimensions are read)."""
    align = 16 // x.element_size()
    two_i, h = gate_up.shape[1], x.shape[-1]
    return (hasattr(torch, "_grouped_mm") and h % align == 0 and (two_i // 2) % align == 0
            and (x.device.type == "cpu" or x.dtype == torch.bfloat16))


def _grouped_products(xs: torch.Tensor, flat: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Expert outputs for rows sorted by expert, over whole (dequantized) banks, offsets on the device (no sync)."""
    e = gate_up.shape[0]
    counts = torch.histc(flat.int() if flat.is_cuda else flat.float(), bins=e, min=0, max=e - 1)
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    gate, up = torch._grouped_mm(xs, gate_up.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
    return torch._grouped_mm(gelu_tanh(gate) * up, down.transpose(1, 2), offs=offsets)


class LayerWeights:
    """One decoder layer's products. `experts`: `DenseExperts` (few experts, packed) or `GroupedExperts`, or for
    compressed banks `QuantDenseExperts` / `QuantGroupedExperts`.
    `ffn_in`: the FFN's three input products (dense gate/up, every expert's gate/up, router) in one GEMM of the
    scale-free RMSNorm of the residual, with the norm weights and the router scale folded in (fp32 MKL
    models with dense experts)."""

    def __init__(self, layer, packer: _Packer) -> None:
        attn, mlp, router = layer.self_attn, layer.mlp, layer.router
        qkv = [attn.q_proj, attn.k_proj] + ([attn.v_proj] if attn.v_proj is not None else [])
        self.qkv = packer.linear(*qkv)
        self.n_q, self.n_k, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        # per-head QK-norm weights for the q and k heads, fp32: (heads + kv, D)
        self.qk_norm = torch.cat([attn.q_norm.weight.detach().float().expand(self.n_q, -1),
                                  attn.k_norm.weight.detach().float().expand(self.n_k, -1)])
        self.eps = attn.q_norm.eps
        self.o = packer.linear(attn.o_proj)
        self.gate_up = packer.linear(mlp.gate_proj, mlp.up_proj)
        self.down = packer.linear(mlp.down_proj)
        self.router = packer.linear(router.proj, mkl=False)
        self.intermediate = mlp.gate_proj.out_features
        self.ffn_eps = layer.pre_feedforward_layernorm.eps
        self.ffn_in = None
        if isinstance(layer.experts, QuantExperts):
            if packer.copy and layer.experts.num_experts <= DENSE_EXPERTS and not packer.fp8_native:
                self.experts = QuantDenseExperts(layer.experts)
            else:
                self.experts = QuantGroupedExperts(layer.experts, native=packer.fp8_native)
        elif packer.copy and layer.experts.num_experts <= DENSE_EXPERTS:
            self.experts = DenseExperts(layer.experts, packer)
            dense_plain = not isinstance(mlp.gate_proj, QuantLinear)
            self.ffn_in = _fold_ffn_inputs(layer, packer) if packer.mkl and dense_plain else None
        else:
            self.experts = GroupedExperts(layer.experts)


def _ffn_folded_vectors(layer) -> tuple[torch.Tensor, ...]:
    return layer.pre_feedforward_layernorm.weight, layer.pre_feedforward_layernorm_2.weight, layer.router.scale


def _fold_ffn_inputs(layer, packer: _Packer) -> Linear | None:
    """(2I + E x 2I_e + E, H): [gate_up * w1; expert_gate_up * w2; router * scale / sqrt(H)], w1 and w2 the
    weights of `pre_feedforward_layernorm(_2)`. None where the three norms differ in eps."""
    router, pre1, pre2 = layer.router, layer.pre_feedforward_layernorm, layer.pre_feedforward_layernorm_2
    if pre1.weight is None or pre2.weight is None or not pre1.eps == pre2.eps == router.eps:
        return None
    mlp, experts = layer.mlp, layer.experts
    with torch.no_grad():
        gate_up = torch.cat([packer.weight(mlp.gate_proj), packer.weight(mlp.up_proj)])
        e, two_i, h = experts.gate_up_proj.shape
        rows = [gate_up * pre1.weight.float(), experts.gate_up_proj.reshape(e * two_i, h) * pre2.weight.float(),
                router.proj.weight * (router.scale.float() * router.root_size)]
        return Linear(packer.layout(torch.cat(rows)), mkl=True)


class ModelWeights:
    """Every product of a model's fast forward passes, plus the anchors that tell whether it is still current.
    `head`: the logits product h @ E^T of the tied embedding; `soft`: the self-conditioning input softmax @ E."""

    def __init__(self, model: DiffusionGemma) -> None:
        packer = _Packer(model)
        stack = model.stack
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors even when built inside a step
            self.layers = [LayerWeights(layer, packer) for layer in stack.layers]
            sc = stack.self_conditioning
            self.sc_gate_up = packer.linear(sc.gate_proj, sc.up_proj)
            self.sc_down = packer.linear(sc.down_proj)
            self.sc_intermediate = sc.gate_proj.out_features
            embed = stack.embed_tokens.weight.detach()
            head = packer.layout(embed) if packer.copy else embed
            self.head = Linear(head, mkl=False)
            self.head.mkl = mkl_pack(embed) if packer.mkl else None
            self.soft = Linear(head.T, mkl=packer.mkl)  # (H, V): probs @ E
        # the embedding scale as a number of the weight dtype, as `TextStack.embed` applies it
        self.embed_scale = stack.embed_scale.to(model.dtype).item()
        self.packed = packer.copy
        self.anchors = _anchors(model)

    def valid(self, model: DiffusionGemma) -> bool:
        """False once a parameter of `model` was replaced or updated in place since these weights were built."""
        return _anchors(model) == self.anchors

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor these products hold (packed copies, MKL packs, adapter factors, and the model's own tensors
        that are used as they are, compressed ones included), each once."""
        found: dict[int, torch.Tensor] = {}
        _collect([self.layers, self.sc_gate_up, self.sc_down, self.head, self.soft], found)
        return list(found.values())


def _collect(obj, found: dict[int, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        found[id(obj)] = obj
    elif isinstance(obj, torch.nn.Module):
        for t in (*obj.parameters(), *obj.buffers()):
            found[id(t)] = t
    elif isinstance(obj, (list, tuple, dict)):
        for item in obj.values() if isinstance(obj, dict) else obj:
            _collect(item, found)
    elif type(obj).__module__ == __name__:
        names = getattr(type(obj), "__slots__", None) or vars(obj)
        for name in names:
            _collect(getattr(obj, name), found)


def _attached_lora(model: DiffusionGemma) -> dict[int, tuple[torch.Tensor, torch.Tensor, float]]:
    """id(target linear) -> (A, B, scale) of the LoRA adapter attached to `model` (`train.lora`), if any."""
    from dgemma.train.lora import attached_adapter, target_linears  # only when an adapter is used

    adapter = attached_adapter(model)
    if adapter is None:
        return {}
    linears = target_linears(model, adapter.config.targets)
    return {id(linears[name]): (pair.lora_A.weight.detach(), pair.lora_B.weight.detach(), pair.scale)
            for name, pair in adapter.pairs().items()}


def _anchors(model: DiffusionGemma) -> tuple[tuple[int, int, int], ...]:
    """Identity, storage and version of every parameter, the attached adapter's included."""
    from dgemma.train.lora import attached_adapter

    adapter = attached_adapter(model)
    params = list(model.parameters()) + (list(adapter.parameters()) if adapter is not None else [])
    return tuple((id(p), p.data_ptr(), p._version) for p in params)


def pack_weights(model: DiffusionGemma) -> ModelWeights:
    return ModelWeights(model)
