"""Scaled FP8 GEMMs for FP8 checkpoints on GPUs that run them natively (Hopper and later): W8A8 with the
checkpoint's per-channel weight scales and per-token dynamic activation scales, as the RedHatAI layout specifies.

UNTESTED ON A GPU: no GPU was available when this was written. It is kept small and guarded: `native_ok` says
yes only on CUDA with compute capability >= 9.0, a bf16 model and torch's `_scaled_mm` / `_scaled_grouped_mm`,
and only after a probe on that device (uneven expert groups included) matches the dequantize-then-multiply
product to FP8 accuracy; anything else (CPU, older GPUs, fp32/fp16 models, a failed probe) uses the dequantize
path of engine/weights.py, which tests/test_quant.py checks on CPU against the reference.

Shapes: M rows, K input features, N output features, E experts.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from dgemma.engine.ops import gelu_tanh

log = logging.getLogger(__name__)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> FP8 codes (M, K) and fp32 scales (M, 1) = row amax / 448 (per-token dynamic quantization)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def linear(x: torch.Tensor, parts) -> torch.Tensor:
    """x (..., K) bf16 @ [W_1; ...; W_n]^T for FP8 `QuantLinear`s, one scaled GEMM per part -> (..., N) bf16."""
    flat = x.reshape(-1, x.shape[-1])
    xq, sx = quantize_rows(flat)
    ys = [torch._scaled_mm(xq, p.weight.t(), scale_a=sx, scale_b=p.weight_scale.float().t(), out_dtype=x.dtype)
          for p in parts]
    return torch.cat(ys, dim=-1).view(*x.shape[:-1], -1)


def bank_scales(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """The banks' per-channel scales in fp32, (E, 2I) and (E, H) (kilobytes; the weights stay FP8)."""
    return experts.gate_up_proj.weight_scale.float().squeeze(-1), experts.down_proj.weight_scale.float().squeeze(-1)


def grouped_experts(xs: torch.Tensor, flat: torch.Tensor, experts, scales) -> torch.Tensor:
    """Rows sorted by expert xs (T*K, H) bf16 with their expert ids `flat` -> expert outputs (T*K, H) bf16, by two
    scaled grouped GEMMs over the FP8 banks (offsets on the device: no host sync)."""
    e = experts.num_experts
    offsets = torch.cumsum(torch.histc(flat.int(), bins=e, min=0, max=e - 1), 0).to(torch.int32)
    xq, sx = quantize_rows(xs)
    gu = torch._scaled_grouped_mm(xq, experts.gate_up_proj.weight.transpose(1, 2), sx.squeeze(-1), scales[0],
                                  offs=offsets, out_dtype=xs.dtype)
    gate, up = gu.chunk(2, dim=-1)
    aq, sa = quantize_rows(gelu_tanh(gate) * up)
    return torch._scaled_grouped_mm(aq, experts.down_proj.weight.transpose(1, 2), sa.squeeze(-1), scales[1],
                                    offs=offsets, out_dtype=xs.dtype)


def native_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this device runs the scaled FP8 GEMMs correctly for a `dtype` model (probed once per device)."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_scaled_grouped_mm"):
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return _probe(str(device))


@functools.cache
def _probe(device: str) -> bool:
    """Run both GEMMs on small random data (16-multiple shapes, uneven expert groups) against dequantized
    products; False (and a warning) if either raises or is off by more than FP8 rounding allows."""
    try:
        x, experts, ids = _probe_inputs(torch.device(device))
        ref_linear = F.linear(x, experts.gate_up_proj.dequantize(x.dtype, 0))
        got_linear = linear(x, [_Row(experts.gate_up_proj, 0)])
        xs = x[torch.argsort(ids, stable=True)]
        got = grouped_experts(xs, ids.sort().values, experts, bank_scales(experts))
        ref = _dequantized_experts(xs, ids.sort().values, experts)
        ok = _close(got_linear, ref_linear) and _close(got, ref)
    except (RuntimeError, TypeError, ValueError) as exc:
        log.warning("FP8 GEMMs unavailable on %s (%s); using dequantized weights", device, exc)
        return False
    if not ok:
        log.warning("FP8 GEMMs on %s disagree with the dequantized product; using dequantized weights", device)
    return ok


@torch.no_grad()
def _probe_inputs(device: torch.device):
    """48 bf16 rows, the tiny preset's FP8 expert banks (8 experts, H 64, I 32) from random weights, and uneven
    expert ids (expert 3 gets none)."""
    from dgemma.model.init import preset_config
    from dgemma.model.quant import QuantExperts, quantize_fp8

    g = torch.Generator().manual_seed(0)
    with torch.device(device):
        experts = QuantExperts(preset_config("tiny"), "fp8")
    for bank in (experts.gate_up_proj, experts.down_proj):
        w = torch.randn(bank.num_experts * bank.rows, bank.cols, generator=g) * 0.05
        q, scale = quantize_fp8(w)
        bank.weight.copy_(q.view(bank.weight.shape))
        bank.weight_scale.copy_(scale.view(bank.weight_scale.shape))
    ids = torch.randint(0, experts.num_experts, (48,), generator=g)
    ids[ids == 3] = 5
    x = torch.randn(48, experts.down_proj.rows, generator=g).to(device, torch.bfloat16)
    return x, experts, ids.to(device)


class _Row:
    """One expert of a bank seen as a `QuantLinear` (for the probe)."""

    def __init__(self, bank, expert: int) -> None:
        self.weight, self.weight_scale = bank.weight[expert], bank.weight_scale[expert]


def _dequantized_experts(xs: torch.Tensor, flat: torch.Tensor, experts) -> torch.Tensor:
    out = torch.empty_like(xs)
    for e in range(experts.num_experts):
        rows = flat == e
        gate, up = F.linear(xs[rows], experts.gate_up_proj.dequantize(xs.dtype, e)).chunk(2, dim=-1)
        out[rows] = F.linear(gelu_tanh(gate) * up, experts.down_proj.dequantize(xs.dtype, e))
    return out


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within 3x the ~4% relative RMS error of FP8 activations on random data (a layout fault is ~100%)."""
    err = (got.float() - ref.float()).pow(2).mean().sqrt()
    return bool(torch.isfinite(got).all() and err <= 0.12 * ref.float().pow(2).mean().sqrt())
