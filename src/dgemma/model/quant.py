"""Quantized weights: the FP8 and NVFP4 formats, the modules that hold them compressed, and their checkpoint layout.

- FP8 (compressed-tensors): `weight` float8_e4m3fn (out, in) and `weight_scale` bf16 (out, 1); w = q * scale.
- NVFP4 (modelopt): `weight` uint8 (out, in/2), two E2M1 codes per byte (element 2j in the low nibble),
  `weight_scale` float8_e4m3fn (out, in/16) per block of 16, `weight_scale_2` fp32 () global, `input_scale`
  fp32 () (activations; kept, unused: dgemma runs NVFP4 weight-only); w = e2m1 * weight_scale * weight_scale_2.
`QuantLinear` holds one such weight, `QuantExperts` one layer's experts as stacked banks (`QuantBank`: the same
tensors with a leading expert dimension; gate and up stacked as in `Experts.gate_up_proj`, with one global scale
per expert and part). The checkpoint splits experts per expert (`experts.{e}.gate_proj.weight`, ...):
`checkpoint_parts` maps each bank tensor to those names. Invariant: nothing here keeps a full-precision copy;
`dequantize(dtype)` (the oracle) forms one in fp32 and rounds it once to the dtype asked for. The code
conversions are exact bit re-encodings into float16 (checked against torch's own casts and the E2M1 table on
every code).
tests/test_quant.py checks the formats, the round trips and the resident bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dgemma.config import ConfigError, ModelConfig
from dgemma.config.quantization import FP8
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.moe import Experts

FP8_MAX = 448.0  # largest float8_e4m3fn
FP4_MAX = 6.0  # largest E2M1
BLOCK = 16  # NVFP4 elements per block scale
# E2M1 code (sign, 2 exponent bits, 1 mantissa bit) -> value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


# -- the formats --------------------------------------------------------------------------------------------
def fp8_as_half(q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float8_e4m3fn codes -> float16 values equal to the codes' values times 2^-8, exactly: exponent and mantissa
    shifted up by 7 bits (subnormals map to subnormals), the sign moved from bit 14 to 15 by adding -2^14 where
    negative. Faster on CPU than torch's own cast. `out`: an int16 tensor of q's shape to write the bits into."""
    b = q.view(torch.int8).to(torch.int16)  # sign-extended
    return torch.add(b << 7, b >> 15, alpha=1 << 14, out=out).view(torch.float16)


def _fp4_pairs(device: torch.device) -> torch.Tensor:
    """byte -> the int32 whose two float16 halves are its two E2M1 codes' values times 2^-14 (low nibble first:
    little-endian), from the codes' bits: exponent and mantissa to bits 9-11, sign to bit 15."""
    if device not in _FP4_PAIRS:
        x = torch.arange(256, dtype=torch.int32)
        pairs = ((x & 7) << 9) | ((x & 8) << 12) | ((x & 0x70) << 21) | ((x & 0x80) << 24)
        _FP4_PAIRS[device] = pairs.to(device)
    return _FP4_PAIRS[device]


_FP4_PAIRS: dict[torch.device, torch.Tensor] = {}


def fp4_as_half(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n/2), two E2M1 codes per byte (low nibble first) -> float16 (..., n) equal to the values times
    2^-14, exactly."""
    pairs = _fp4_pairs(packed.device).index_select(0, packed.reshape(-1).to(torch.int32))
    return pairs.view(torch.float16).view(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """q (..., out, in) float8 codes, scale (..., out, 1) -> (..., out, in) in `dtype` (into `out` when given),
    formed in fp32 and rounded once."""
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.mul(fp8_as_half(q), scale.float() * 256.0, out=out)


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """packed (..., out, in/2), block_scale (..., out, in/16), global_scale (...) or (..., G) with G row groups of
    equal size (gate and up of a bank) -> (..., out, in) in `dtype` (into `out` when given), formed in fp32 and
    rounded once."""
    *lead, rows, half = packed.shape
    cols = half * 2
    groups = global_scale.shape[-1] if global_scale.dim() > len(lead) else 1
    g = global_scale.float().reshape(*lead, groups, 1, 1) * 2.0**14  # undoes the float16 offset of the values
    s = block_scale.float().reshape(*lead, groups, rows // groups, cols // BLOCK) * g
    if out is None:
        out = torch.empty((*lead, rows, cols), dtype=dtype, device=packed.device)
    values = fp4_as_half(packed).view(*lead, groups, rows // groups, cols // BLOCK, BLOCK)
    torch.mul(values, s[..., None], out=out.view(values.shape))
    return out


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) weight -> float8 codes (out, in), bf16 scale (out, 1) = amax / 448 per output channel. The codes
    are rounded against the stored (bf16) scale, so dequantizing reproduces them exactly."""
    w = w.float()
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.bfloat16)
    q = (w / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) weight, in a multiple of 16 -> (packed uint8 (out, in/2), float8 block scales (out, in/16),
    fp32 global scale ()). global = amax / (6 * 448); block scale = block amax / 6 / global, rounded to e4m3;
    values rounded to the nearest E2M1 against the stored scales (ties toward zero)."""
    w = w.float()
    out, cols = w.shape
    amax = w.abs().amax()
    global_scale = torch.where(amax > 0, amax / (FP4_MAX * FP8_MAX), torch.ones_like(amax))
    blocks = w.view(out, cols // BLOCK, BLOCK)
    block_scale = (blocks.abs().amax(-1) / FP4_MAX / global_scale).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    step = block_scale.float() * global_scale
    scaled = torch.where(step[..., None] > 0, blocks / step[..., None], torch.zeros_like(blocks))
    mid = torch.tensor(_E2M1_MIDPOINTS, device=w.device)
    codes = torch.bucketize(scaled.abs().clamp(max=FP4_MAX), mid).to(torch.uint8)
    codes = torch.where((scaled < 0) & (codes > 0), codes | 8, codes).view(out, cols)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.contiguous(), block_scale, global_scale.reshape(())


# -- the modules ------------------------------------------------------------------------------------------
def tensor_specs(scheme: str, lead: tuple[int, ...], rows: int, cols: int,
                 groups: int = 1) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The compressed tensors of a (rows, cols) weight (with leading dims `lead`: experts), by checkpoint suffix."""
    if scheme == FP8:
        return {"weight": ((*lead, rows, cols), torch.float8_e4m3fn),
                "weight_scale": ((*lead, rows, 1), torch.bfloat16)}
    if cols % BLOCK:
        raise ConfigError(f"NVFP4 needs input widths that are multiples of {BLOCK}; a weight has {cols}")
    scalar = (*lead, groups) if lead else ()
    return {"weight": ((*lead, rows, cols // 2), torch.uint8),
            "weight_scale": ((*lead, rows, cols // BLOCK), torch.float8_e4m3fn),
            "weight_scale_2": (scalar, torch.float32), "input_scale": (scalar, torch.float32)}


class _Compressed(nn.Module):
    """Holds the compressed tensors of one weight (or of a bank of them), as frozen parameters named as in the
    checkpoint."""

    def __init__(self, scheme: str, lead: tuple[int, ...], rows: int, cols: int, groups: int = 1) -> None:
        super().__init__()
        self.scheme = scheme
        for name, (shape, dtype) in tensor_specs(scheme, lead, rows, cols, groups).items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False))

    def dequantize(self, dtype: torch.dtype, index: int | slice | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight in `dtype` (the oracle), written into `out` when given; `index` selects experts of a bank."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if index is None else t[index]

        if self.scheme == FP8:
            return dequantize_fp8(pick(self.weight), pick(self.weight_scale), dtype, out)
        return dequantize_nvfp4(pick(self.weight), pick(self.weight_scale), pick(self.weight_scale_2), dtype, out)


class _LinearOfDequantized(torch.autograd.Function):
    """y = x @ W^T with W dequantized for the product and again in backward (never kept alive between them), so a
    frozen compressed base costs no full-precision copy while adapters train through it (QLoRA)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_of: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
        ctx.weight_of = weight_of
        return F.linear(x, weight_of(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight_of(grad.dtype), None


def linear_of_dequantized(x: torch.Tensor, weight_of: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _LinearOfDequantized.apply(x, weight_of)
    return F.linear(x, weight_of(x.dtype))


class QuantLinear(_Compressed):
    """A bias-free linear layer whose (out, in) weight stays compressed; forward dequantizes it for the product."""

    def __init__(self, in_features: int, out_features: int, scheme: str) -> None:
        super().__init__(scheme, (), out_features, in_features)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_of_dequantized(x, self.dequantize)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


class QuantBank(_Compressed):
    """One projection of every expert: (E, rows, cols) compressed; `groups` row groups with their own global scale
    (2 for gate/up, 1 for down)."""

    def __init__(self, num_experts: int, rows: int, cols: int, scheme: str, groups: int) -> None:
        super().__init__(scheme, (num_experts,), rows, cols, groups)
        self.num_experts, self.rows, self.cols, self.groups = num_experts, rows, cols, groups


class QuantExperts(Experts):
    """`Experts` with compressed banks: gate_up_proj (E, 2I, H), down_proj (E, H, I). The reference loop
    dequantizes one expert at a time."""

    def __init__(self, config: ModelConfig, scheme: str) -> None:
        nn.Module.__init__(self)
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = e
        self.gate_up_proj = QuantBank(e, 2 * i, h, scheme, groups=2)
        self.down_proj = QuantBank(e, h, i, scheme, groups=1)

    def project(self, x: torch.Tensor, expert: int, which: str) -> torch.Tensor:
        bank = self.gate_up_proj if which == "gate_up" else self.down_proj
        return linear_of_dequantized(x, lambda dtype: bank.dequantize(dtype, expert))


# -- which modules a scheme quantizes, and building the model ----------------------------------------------
DECODER = "model.decoder"


def _linear_slots(model: DiffusionGemma) -> list[tuple[str, nn.Module, str]]:
    """(Hugging Face module path, owner, attribute) of every linear a quantization config may cover."""
    slots = []
    for i, layer in enumerate(model.stack.layers):
        for owner_name, owner, names in (("self_attn", layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                         ("mlp", layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
            slots += [(f"{DECODER}.layers.{i}.{owner_name}.{n}", owner, n) for n in names
                      if getattr(owner, n) is not None]
    sc = model.stack.self_conditioning
    slots += [(f"{DECODER}.self_conditioning.{n}", sc, n) for n in ("gate_proj", "up_proj", "down_proj")]
    return slots


def _experts_quantized(config: ModelConfig, layer: int) -> bool:
    q = config.quantization
    names = [f"{DECODER}.layers.{layer}.experts.{e}.{p}" for e in range(config.num_experts)
             for p in ("gate_proj", "up_proj", "down_proj")]
    kept = [q.ignores(n) for n in names]
    if any(kept) and not all(kept):
        raise ConfigError(f"quantization_config ignores some experts of layer {layer} but not all; dgemma holds a "
                          "layer's experts as one bank, quantized or not")
    return not kept[0]


def build_quantized(config: ModelConfig) -> DiffusionGemma:
    """The model with the linears and expert banks that `config.quantization` covers replaced by compressed
    modules (built under the caller's device context: meta when loading). The router and the tied head stay in the
    compute dtype; a config that quantizes them is refused."""
    q = config.quantization
    if q is None:
        raise ConfigError("build_quantized needs a config with a quantization scheme")
    for name in ("lm_head", *(f"{DECODER}.layers.{i}.router.proj" for i in range(config.num_hidden_layers))):
        if not q.ignores(name):
            raise ConfigError(f"quantization_config quantizes {name}; dgemma keeps the router and the tied head "
                              "unquantized (add them to 'ignore')")
    model = DiffusionGemma(config)
    for name, owner, attr in _linear_slots(model):
        if not q.ignores(name):
            old = getattr(owner, attr)
            setattr(owner, attr, QuantLinear(old.in_features, old.out_features, q.scheme))
    for i, layer in enumerate(model.stack.layers):
        if _experts_quantized(config, i):
            layer.experts = QuantExperts(config, q.scheme)
    return model


def meta_model(config: ModelConfig, dtype: torch.dtype | None = None) -> DiffusionGemma:
    """The model `config` describes (quantized when it says so) on the meta device, compute tensors in `dtype`
    (default: the config's): the memory plan without allocating anything."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or getattr(torch, config.dtype))
    try:
        with torch.device("meta"):
            return build_quantized(config) if config.quantization else DiffusionGemma(config)
    finally:
        torch.set_default_dtype(previous)


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: every parameter and buffer once, in its own dtype (compressed tensors at
    their compressed size). Works on the meta device."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, _Compressed) for m in model.modules())


# -- the checkpoint layout --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One checkpoint tensor that is a slice of a model tensor: expert `expert`, rows [start, start + n)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    expert: int
    start: int


def stored_keys(model: nn.Module) -> set[str]:
    """State-dict names of the compressed tensors: held exactly as stored (scales included, never converted to
    the compute dtype)."""
    return {f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, _Compressed)
            for name, _ in m.named_parameters(recurse=False)}


def checkpoint_parts(model: nn.Module) -> dict[str, list[Part]]:
    """Bank tensor name -> the per-expert checkpoint tensors it is stacked from, in order. gate_up rows are gate's
    then up's (`experts.{e}.gate_proj.*`, `experts.{e}.up_proj.*`); a per-weight scalar becomes one entry of the
    bank's (E, groups) tensor."""
    out: dict[str, list[Part]] = {}
    for prefix, bank in model.named_modules():
        if not isinstance(bank, QuantBank):
            continue
        owner, which = prefix.rsplit(".", 1)
        names = ("gate_proj", "up_proj") if which == "gate_up_proj" else ("down_proj",)
        for suffix, param in bank.named_parameters(recurse=False):
            scalar = suffix in ("weight_scale_2", "input_scale")  # (E, groups): one per checkpoint weight
            rows = 1 if scalar else param.shape[1] // len(names)
            shape = () if scalar else (rows, *param.shape[2:])
            out[f"{prefix}.{suffix}"] = [Part(f"{owner}.{e}.{n}.{suffix}", shape, param.dtype, e, j * rows)
                                         for e in range(bank.num_experts) for j, n in enumerate(names)]
    return out


def split_banks(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every bank tensor replaced by its per-expert checkpoint tensors (views; the writer copies
    each as it writes it)."""
    parts = checkpoint_parts(model)
    out = {}
    for key, tensor in state.items():
        if key not in parts:
            out[key] = tensor
            continue
        for p in parts[key]:
            rows = 1 if p.shape == () else p.shape[0]
            out[p.key] = tensor[p.expert, p.start:p.start + rows].reshape(p.shape)
    return out
