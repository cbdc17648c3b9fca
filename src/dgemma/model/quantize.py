"""Quantize a bf16/fp32 model into the published FP8 or NVFP4 layout (`dgemma quantize`).

`quantize_model(model, scheme)` returns the compressed model `model/quant.py` describes: FP8 per-channel codes for
every attention, dense-MLP, self-conditioning and expert linear (the router and the tied head stay as they are),
as RedHatAI's FP8-dynamic release; NVFP4 codes for the experts only, as NVIDIA's release, with `input_scale` from
a short calibration pass (the experts' input amax over random tokens / (6 * 448); dgemma itself runs NVFP4
weight-only and never reads it). Unquantized tensors are shared with the source, not copied; weights are
quantized one matrix (or one expert) at a time. `save_model` then writes the checkpoint atomically, experts split
per expert. tests/test_quant.py checks that the result loads back bit-identical through the loader.
"""

from __future__ import annotations

import dataclasses
from importlib import metadata

import torch
import torch.nn.functional as F

from dgemma.config import ConfigError, ModelConfig
from dgemma.config.quantization import FP8, NVFP4, SCHEMES, QuantizationConfig
from dgemma.model import quant
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.moe import Experts

CALIBRATION_TOKENS = 256
# the module paths the published NVFP4 release keeps unquantized (shell wildcards)
_NVFP4_IGNORE = ["lm_head", "*embed_vision*", "*mlp*", "*router*", "*self_attn*", "*self_conditioning*",
                 "*vision_tower*"]


def _version() -> str:
    try:
        return metadata.version("dgemma")
    except metadata.PackageNotFoundError:
        return "unknown"


def quantization_config(scheme: str, config: ModelConfig) -> QuantizationConfig:
    """The `quantization_config` the published checkpoints carry, for this model's text stack (a dgemma checkpoint
    is text-only, so the FP8 ignore list names no vision-tower module)."""
    if scheme == FP8:
        routers = [f"model.{stack}.layers.{i}.router.proj" for i in range(config.num_hidden_layers)
                   for stack in ("decoder", "encoder.language_model")]
        ignore = [*routers, *(f"model.decoder.self_conditioning.{n}" for n in ("gate_proj", "up_proj", "down_proj")),
                  "lm_head"]
        raw = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
               "config_groups": {"group_0": {
                   "targets": ["Linear"],
                   "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                               "dynamic": False, "observer": "memoryless_minmax"},
                   "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                         "dynamic": True}}},
               "ignore": ignore}
        return QuantizationConfig(FP8, tuple(ignore), dynamic_activations=True, raw=raw)
    if scheme == NVFP4:
        fp4 = {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False}
        raw = {"quant_method": "modelopt", "quant_algo": "NVFP4", "producer": {"name": "dgemma", "version": _version()},
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": fp4, "input_activations": fp4}},
               "ignore": list(_NVFP4_IGNORE), "kv_cache_scheme": {"num_bits": 8, "type": "float", "dynamic": False}}
        return QuantizationConfig(NVFP4, tuple(_NVFP4_IGNORE), raw=raw)
    raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


@torch.no_grad()
def quantize_model(model: DiffusionGemma, scheme: str, calibration: torch.Tensor | None = None) -> DiffusionGemma:
    """The compressed twin of `model` (see the module docstring). `calibration` (1, S) token ids for NVFP4's
    `input_scale` (default: CALIBRATION_TOKENS random ids, seed 0)."""
    if quant.is_quantized(model) or model.config.quantization is not None:
        raise ConfigError("the model is already quantized; quantize its bf16/fp32 checkpoint instead")
    config = dataclasses.replace(model.config, quantization=quantization_config(scheme, model.config))
    qmodel = quant.meta_model(config, model.dtype)
    plain = model.state_dict()
    stored = quant.stored_keys(qmodel)
    state = {k: plain[k] for k in qmodel.state_dict() if k not in stored}
    amax = _expert_input_amax(model, calibration) if scheme == NVFP4 else {}
    for name, module in qmodel.named_modules():
        if isinstance(module, quant.QuantLinear):
            state.update(_linear_state(name, plain[f"{name}.weight"], scheme))
        elif isinstance(module, quant.QuantBank):
            state.update(_bank_state(name, plain[name], module, amax.get(name)))
    qmodel.load_state_dict(state, assign=True, strict=True)
    qmodel.stack.reset_buffers(model.device)
    return qmodel.eval().requires_grad_(False)


def _linear_state(name: str, w: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    if scheme == FP8:
        q, scale = quant.quantize_fp8(w)
        return {f"{name}.weight": q, f"{name}.weight_scale": scale}
    raise ConfigError(f"{name}: the NVFP4 layout quantizes experts only")  # not reached: its ignore list


def _bank_state(name: str, bank: torch.Tensor, module: quant.QuantBank,
                amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One expert bank (E, rows, cols), quantized one expert (and, NVFP4, one gate/up group) at a time."""
    specs = quant.tensor_specs(module.scheme, (module.num_experts,), module.rows, module.cols, module.groups)
    out = {s: torch.empty(shape, dtype=dtype, device=bank.device) for s, (shape, dtype) in specs.items()}
    rows = module.rows // module.groups
    for e in range(module.num_experts):
        if module.scheme == FP8:
            out["weight"][e], out["weight_scale"][e] = quant.quantize_fp8(bank[e])
            continue
        for g in range(module.groups):
            sl = slice(g * rows, (g + 1) * rows)
            out["weight"][e, sl], out["weight_scale"][e, sl], out["weight_scale_2"][e, g] = \
                quant.quantize_nvfp4(bank[e, sl])
    if module.scheme == NVFP4:
        out["input_scale"].copy_(amax[:, None].expand_as(out["input_scale"]) / (quant.FP4_MAX * quant.FP8_MAX))
    return {f"{name}.{s}": t for s, t in out.items()}


def _expert_input_amax(model: DiffusionGemma, ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per layer, the largest |input| each expert's gate/up and down saw in one causal pass over `ids`, keyed by
    the bank's module path (E,). An expert that received no token gets its layer's largest."""
    if ids is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (1, CALIBRATION_TOKENS), generator=g)
    found: dict[str, torch.Tensor] = {}

    def hook(module: Experts, args: tuple, _output) -> None:
        x, expert_ids = args[0], args[1]
        e = module.num_experts
        amax_in, amax_mid = torch.zeros(e), torch.zeros(e)
        for expert in range(e):
            rows = x[(expert_ids == expert).any(-1)]
            if rows.shape[0] == 0:
                continue
            gate, up = module.project(rows, expert, "gate_up").chunk(2, dim=-1)
            amax_in[expert] = rows.abs().max().float()
            amax_mid[expert] = (F.gelu(gate, approximate="tanh") * up).abs().max().float()
        idle = amax_in == 0
        amax_in[idle], amax_mid[idle] = x.abs().max().float(), amax_mid.max()
        name = names[module]
        found[f"{name}.gate_up_proj"], found[f"{name}.down_proj"] = amax_in, amax_mid.clamp(min=1e-12)

    names = {m: n for n, m in model.named_modules() if isinstance(m, Experts)}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        model.encode(ids.to(model.device))
    finally:
        for h in handles:
            h.remove()
    return found
