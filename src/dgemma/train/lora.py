"""LoRA adapters for the DiffusionGemma text stack, saved and loaded in peft's file format.

An adapter adds scale * B @ A to chosen linear layers (y = W x + scale * B A dropout(x), scale = alpha / r).
The adapter weights live in their own module (`LoraAdapter`), outside the model, and act through forward hooks
on the target `nn.Linear`s. So the model's parameter names and its `state_dict()` stay the checkpoint's
(`...q_proj.weight`, never `...q_proj.base_layer.weight`): `save_model`/`load_model` and the FSDP units see the
untouched model, and the optimizer gets `adapter.parameters()` only. The adapter's own names mirror the targets
(`model.decoder.layers.0.self_attn.q_proj.lora_A.weight`), which are peft's keys without `base_model.model.`.

One module serves the encoder and the denoiser pass in dgemma, so one adapter per target acts on both. The
transformers model has an encoder copy (`model.encoder.language_model.layers.N...`) and a decoder copy of each
layer that share one weight: the saved file targets both copies with identical tensors, so peft's unmerged model
equals dgemma's. Consequence: peft's `merge_and_unload` on that model adds the update twice into the shared
weight; `merge_adapter` here adds it once. tests/test_lora.py checks the round trip through peft onto
transformers' `DiffusionGemmaForBlockDiffusion` (encoder hidden states and denoiser logits), merge, refusal of a
mismatched base, and that only adapter weights train.

Shapes: lora_A (r, in_features), lora_B (out_features, r).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dgemma.config import UserError
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.quant import QuantLinear

log = logging.getLogger(__name__)

class AdapterError(UserError):
    """An adapter or LoRA setting that cannot be used with this model; the message says why."""


CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DECODER_LAYERS = "model.decoder.layers."
ENCODER_LAYERS = "model.encoder.language_model.layers."
# Short target name -> path inside a decoder layer. The self-conditioning MLP, the router and the experts are
# not targets (NeMo's recipe keeps them frozen; LoRA on the grouped experts is not supported).
TARGET_PATHS = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj",
}
DEFAULT_TARGETS = tuple(TARGET_PATHS)
_META_ARCH, _META_WEIGHTS, _META_TARGETS = "dgemma.architecture", "dgemma.weights_fingerprint", "dgemma.targets"


@dataclass
class LoraConfig:
    """rank r, alpha (scale alpha / r, or alpha / sqrt(r) with `rslora`), dropout on the adapter input, and the
    target linears by short name (a tuple, or a comma-separated string such as "q_proj,v_proj")."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        unknown = sorted(set(self.targets) - set(TARGET_PATHS))
        if unknown or not self.targets:
            raise AdapterError(f"unknown LoRA targets {unknown or '(none given)'}; "
                               f"choose from {', '.join(TARGET_PATHS)}")
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise AdapterError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoraPair(nn.Module):
    """The update of one target: scale * lora_B(lora_A(dropout(x)))."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig) -> None:
        super().__init__()
        self.lora_A = nn.Linear(in_features, config.rank, bias=False)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.scale = config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, (out, in) in the adapter dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale


@dataclass
class _Attachment:
    handles: list = field(default_factory=list)


class LoraAdapter(nn.Module):
    """The adapter weights of one model, one `LoraPair` per target, stored under the target's module path
    (`adapter.get_submodule("model.decoder.layers.0.self_attn.q_proj")` is the pair of that linear)."""

    def __init__(self, config: LoraConfig, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.config = config
        self.target_names = list(shapes)
        self.architecture = ""  # JSON of the base's shape-defining fields
        self.weights_fingerprint = ""  # hash of samples of the target weights ("" when unknown)
        for name, (in_features, out_features) in shapes.items():
            parent = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, LoraPair(in_features, out_features, config))

    def pairs(self) -> dict[str, LoraPair]:
        return {name: self.get_submodule(name) for name in self.target_names}


_ATTACHED: weakref.WeakKeyDictionary[nn.Module, tuple[LoraAdapter, _Attachment]] = weakref.WeakKeyDictionary()


def target_linears(model: DiffusionGemma, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Decoder-layer linears selected by short names, keyed by their module path in the model. Full-attention
    layers have no `v_proj` (K = V), so `v_proj` selects the sliding layers only, as in the checkpoint."""
    found = {}
    for i, layer in enumerate(model.stack.layers):
        for target in targets:
            owner, attr = TARGET_PATHS[target].split(".")
            module = getattr(getattr(layer, owner), attr)
            if module is not None:
                found[f"{DECODER_LAYERS}{i}.{TARGET_PATHS[target]}"] = module
    return found


def architecture(model: DiffusionGemma) -> str:
    c = model.config
    fields = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_hidden_layers, layer_types=list(c.layer_types),
                  num_attention_heads=c.num_attention_heads,
                  layer_shapes=[[s.head_dim, s.num_key_value_heads] for s in map(c.layer_shape, range(len(
                      c.layer_types)))])
    return json.dumps(fields, sort_keys=True)


def weights_fingerprint(model: DiffusionGemma, targets: tuple[str, ...] = DEFAULT_TARGETS) -> str:
    """sha256 over 64 evenly spaced elements of every target weight, rounded to bf16 (so an fp32 load of a bf16
    checkpoint has the same fingerprint). "" when the weights are not materialised (meta or sharded) or are
    compressed (a quantized base and its bf16 original share adapters, so neither can vouch for the other)."""
    digest = hashlib.sha256()
    for name, module in sorted(target_linears(model, targets).items()):
        w = module.weight
        if w.device.type == "meta" or type(w.data) is not torch.Tensor or isinstance(module, QuantLinear):
            return ""
        flat = w.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, 64, device=flat.device).long()
        sample = flat[idx].to(torch.bfloat16).float().cpu()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def attach_adapter(model: DiffusionGemma, config: LoraConfig | None = None, *, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Freeze the model, create an adapter for `config.targets` and hook it in. B starts at zero (the model is
    unchanged until training moves B); A is drawn like peft's default (kaiming-uniform, a = sqrt(5), i.e.
    U(-1/sqrt(in), 1/sqrt(in))) from a generator seeded with `seed`."""
    config = config or LoraConfig()
    _refuse_second(model)
    linears = target_linears(model, config.targets)
    adapter = LoraAdapter(config, {n: (m.in_features, m.out_features) for n, m in linears.items()})
    device = model.device
    adapter.to(device=device, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for pair in adapter.pairs().values():
            a = torch.empty(pair.lora_A.weight.shape, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            if device.type != "meta":
                pair.lora_A.weight.copy_(a)
                pair.lora_B.weight.zero_()
    adapter.architecture = architecture(model)
    adapter.weights_fingerprint = weights_fingerprint(model, config.targets)
    _hook_in(model, adapter, linears)
    return adapter


def _refuse_second(model: DiffusionGemma) -> None:
    if model in _ATTACHED:
        raise AdapterError("this model already has a LoRA adapter attached; merge_adapter or detach_adapter first")


def _hook_in(model: DiffusionGemma, adapter: LoraAdapter, linears: dict[str, nn.Linear]) -> None:
    model.requires_grad_(False)
    attachment = _Attachment()
    pairs = adapter.pairs()
    for name, module in linears.items():
        attachment.handles.append(module.register_forward_hook(_AddUpdate(pairs[name])))
    _ATTACHED[model] = (adapter, attachment)


class _AddUpdate:
    """Forward hook: output + the pair's update, computed in the adapter dtype (fp32 over a bf16 base, as peft
    does) and added in the output dtype."""

    def __init__(self, pair: LoraPair) -> None:
        self.pair = pair

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + self.pair(x.to(self.pair.lora_A.weight.dtype)).to(output.dtype)


def attached_adapter(model: DiffusionGemma) -> LoraAdapter | None:
    entry = _ATTACHED.get(model)
    return entry[0] if entry else None


def detach_adapter(model: DiffusionGemma) -> LoraAdapter:
    """Remove the hooks (the model is the base again) and return the adapter."""
    entry = _ATTACHED.pop(model, None)
    if entry is None:
        raise AdapterError("this model has no LoRA adapter attached")
    for handle in entry[1].handles:
        handle.remove()
    return entry[0]


def trainable_parameters(model: DiffusionGemma) -> dict[str, nn.Parameter]:
    """Every parameter that requires grad: the model's own (none once an adapter is attached) and the attached
    adapter's, by name."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    adapter = attached_adapter(model)
    if adapter is not None:
        params.update({n: p for n, p in adapter.named_parameters() if p.requires_grad})
    return params


@torch.no_grad()
def merge_adapter(model: DiffusionGemma) -> None:
    """Add scale * B @ A into each target weight once (one module serves both passes) and detach the adapter.
    The sum is formed in fp32 and rounded once to the weight dtype. Not undoable: keep the adapter file."""
    attached = attached_adapter(model)
    if attached is not None and any(isinstance(m, QuantLinear)
                                    for m in target_linears(model, attached.config.targets).values()):
        raise AdapterError("cannot merge an adapter into a quantized base; merge it into the bf16/fp32 checkpoint "
                           "and quantize the result (dgemma quantize)")
    adapter = detach_adapter(model)
    linears = target_linears(model, adapter.config.targets)
    for name, pair in adapter.pairs().items():
        weight = linears[name].weight
        weight.copy_((weight.float() + pair.delta_weight().float()).to(weight.dtype))


# -- peft file format ------------------------------------------------------------------------------
def target_regex(targets: tuple[str, ...]) -> str:
    """peft `target_modules` as one regex (peft full-matches a string against each module name): exactly the
    chosen linears of the encoder and decoder copies of every text layer; never the vision tower, the
    self-conditioning MLP or the router."""
    attn = [t for t in targets if TARGET_PATHS[t].startswith("self_attn.")]
    mlp = [t for t in targets if TARGET_PATHS[t].startswith("mlp.")]
    parts = ([rf"self_attn\.({'|'.join(attn)})"] if attn else []) + ([rf"mlp\.({'|'.join(mlp)})"] if mlp else [])
    return rf"model\.(decoder|encoder\.language_model)\.layers\.\d+\.({'|'.join(parts)})"


def _encoder_twin(decoder_name: str) -> str:
    return ENCODER_LAYERS + decoder_name.removeprefix(DECODER_LAYERS)


def save_adapter(adapter: LoraAdapter, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` as peft writes them for
    `DiffusionGemmaForBlockDiffusion` (no task type: peft's CAUSAL_LM wrapper refuses this model). Each target
    is written for the decoder and the encoder copy with identical tensors. The base's architecture and weight
    fingerprint go in the safetensors metadata (peft ignores it; `load_adapter` checks it)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = adapter.config
    tensors = {}
    for name, pair in adapter.pairs().items():
        for key in ("lora_A", "lora_B"):
            t = getattr(pair, key).weight.detach().to("cpu", dtype or getattr(pair, key).weight.dtype)
            tensors[f"{PEFT_PREFIX}{name}.{key}.weight"] = t.contiguous().clone()
            tensors[f"{PEFT_PREFIX}{_encoder_twin(name)}.{key}.weight"] = t.contiguous().clone()
    metadata = {"format": "pt", _META_ARCH: adapter.architecture, _META_WEIGHTS: adapter.weights_fingerprint,
                _META_TARGETS: ",".join(config.targets)}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=metadata)
    peft_config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": target_regex(config.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": config.rslora, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2))
    return out


def _read_peft_config(path: Path) -> dict:
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: no {CONFIG_FILE}; not a peft adapter directory") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path / CONFIG_FILE}: not valid JSON ({exc})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, allowed in (("use_dora", (False, None)), ("bias", ("none", None)), ("fan_in_fan_out", (False, None)),
                         ("modules_to_save", (None, [])), ("rank_pattern", ({}, None)), ("alpha_pattern", ({}, None))):
        if cfg.get(key) not in allowed:
            raise AdapterError(f"{path}: {key}={cfg.get(key)!r} is not supported by dgemma's LoRA")
    return cfg


def _peft_selects(target_modules: str | list[str], name: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def load_adapter(model: DiffusionGemma, directory: str | os.PathLike, *, check_weights: bool = True,
                 base_model_name_or_path: str | None = None) -> LoraAdapter:
    """Attach the adapter saved in `directory` (by `save_adapter`, or by peft when its encoder and decoder
    copies are equal). Refused with a ValueError when it does not fit this model: other architecture or
    shapes, targets this model lacks, weights missing for targeted modules, differing encoder/decoder copies,
    a different base (weight fingerprint, unless `check_weights=False`; `base_model_name_or_path` if given)."""
    path = Path(directory)
    _refuse_second(model)
    cfg = _read_peft_config(path)
    if base_model_name_or_path is not None and cfg.get("base_model_name_or_path") != base_model_name_or_path:
        raise AdapterError(f"{path}: adapter was made for base {cfg.get('base_model_name_or_path')!r}, "
                         f"not {base_model_name_or_path!r}")
    if not (path / WEIGHTS_FILE).exists():
        raise AdapterError(f"{path}: no {WEIGHTS_FILE}")
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata() or {}
        raw = {k: f.get_tensor(k) for k in f.keys()}
    arch = metadata.get(_META_ARCH)
    if arch and arch != architecture(model):
        raise AdapterError(f"{path}: adapter was made for a different base architecture:\n  adapter: {arch}\n"
                         f"  model:   {architecture(model)}")
    decoder, encoder = _split_copies(path, raw)
    short = sorted({n.rsplit(".", 1)[-1] for n in decoder})
    unknown = [s for s in short if s not in TARGET_PATHS]
    if unknown:
        raise AdapterError(f"{path}: adapter targets {unknown}, which dgemma's LoRA does not support")
    rank = int(cfg["r"])
    config = LoraConfig(rank=rank, alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout") or 0.0),
                        targets=tuple(t for t in TARGET_PATHS if t in short), rslora=bool(cfg.get("use_rslora")))
    linears = target_linears(model, DEFAULT_TARGETS)
    missing_modules = sorted(set(decoder) - set(linears))
    if missing_modules:
        raise AdapterError(f"{path}: adapter targets {len(missing_modules)} module(s) this model does not have, "
                         f"e.g. {missing_modules[:3]}; it was made for a different base")
    selected = [n for n in linears if _peft_selects(cfg["target_modules"], n)]
    without = sorted(set(selected) - set(decoder))
    if without:
        raise AdapterError(f"{path}: target_modules selects {len(without)} module(s) with no weights in "
                         f"{WEIGHTS_FILE}, e.g. {without[:3]}; the file is incomplete")
    _check_weights_fit(path, linears, decoder, encoder, rank)
    expected = metadata.get(_META_WEIGHTS)
    actual = weights_fingerprint(model, config.targets)
    if check_weights and expected and actual and expected != actual:
        raise AdapterError(f"{path}: adapter was trained on a base with different weights (fingerprint {expected[:12]} "
                         f"vs this model's {actual[:12]}); pass check_weights=False to apply it anyway")
    adapter = _build_from(model, config, decoder)
    adapter.architecture, adapter.weights_fingerprint = architecture(model), expected or actual
    _hook_in(model, adapter, {n: linears[n] for n in adapter.target_names})
    return adapter


def _check_weights_fit(path: Path, linears: dict[str, nn.Linear], decoder: dict, encoder: dict, rank: int) -> None:
    """Every decoder copy has this model's shapes; every encoder copy equals its decoder copy."""
    lone = sorted(set(encoder) - set(decoder))
    if lone:
        raise AdapterError(f"{path}: encoder copies without a decoder copy, e.g. {lone[:3]}; dgemma runs both passes "
                         "through one module and needs both copies equal")
    for name, (a, b) in decoder.items():
        module = linears[name]
        if tuple(a.shape) != (rank, module.in_features) or tuple(b.shape) != (module.out_features, rank):
            raise AdapterError(f"{path}: {name} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, but this "
                               f"model's layer maps {module.in_features} -> {module.out_features} features at rank "
                               f"{rank}; the adapter was made for a different base")
        if name in encoder and not (torch.equal(a, encoder[name][0]) and torch.equal(b, encoder[name][1])):
            raise AdapterError(f"{path}: the encoder and decoder copies of {name} differ; dgemma runs both passes "
                             "through one module, so it can only load adapters whose two copies are equal")


def _split_copies(path: Path, raw: dict[str, torch.Tensor]):
    """peft keys -> {decoder module name: (A, B)} and {decoder name of the encoder copy: (A, B)}."""
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {"decoder": {}, "encoder": {}}
    for key, tensor in raw.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        if match is None:
            raise AdapterError(f"{path}: unexpected tensor {key!r} in {WEIGHTS_FILE} (only LoRA A/B weights of "
                             "linear layers are supported)")
        module, which = match.groups()
        if module.startswith(DECODER_LAYERS):
            parts["decoder"].setdefault(module, {})[which] = tensor
        elif module.startswith(ENCODER_LAYERS):
            twin = DECODER_LAYERS + module.removeprefix(ENCODER_LAYERS)
            parts["encoder"].setdefault(twin, {})[which] = tensor
        else:
            raise AdapterError(f"{path}: adapter targets {module!r}, outside the text layers dgemma adapts")
    out = {}
    for side, modules in parts.items():
        for name, ab in modules.items():
            if set(ab) != {"lora_A", "lora_B"}:
                raise AdapterError(f"{path}: {side} copy of {name} lacks {({'lora_A', 'lora_B'} - set(ab)).pop()}")
        out[side] = {name: (ab["lora_A"], ab["lora_B"]) for name, ab in modules.items()}
    if not out["decoder"]:
        raise AdapterError(f"{path}: no decoder-layer LoRA weights in {WEIGHTS_FILE}")
    return out["decoder"], out["encoder"]


def _build_from(model: DiffusionGemma, config: LoraConfig, weights: dict) -> LoraAdapter:
    order = [n for n in target_linears(model, config.targets) if n in weights]
    shapes = {n: (weights[n][0].shape[1], weights[n][1].shape[0]) for n in order}
    adapter = LoraAdapter(config, shapes).to(model.device)
    with torch.no_grad():
        for name, pair in adapter.pairs().items():
            a, b = weights[name]
            pair.lora_A.weight.copy_(a.float())
            pair.lora_B.weight.copy_(b.float())
    return adapter
