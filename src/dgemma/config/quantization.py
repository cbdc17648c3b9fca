"""The `quantization_config` of a checkpoint's config.json, translated into one `QuantizationConfig`.

Two published layouts are understood (docs/quant.md has the tensor tables):
- `fp8`: compressed-tensors `float-quantized`, 8-bit float weights with one scale per output channel, optional
  per-token dynamic 8-bit float activations (RedHatAI's FP8-dynamic release);
- `nvfp4`: modelopt `NVFP4`, 4-bit float weights in blocks of 16 with an FP8 block scale and an fp32 global
  scale per weight (NVIDIA's release).
Anything else is refused with one line that says what was found and what loads. The config.json object is kept
verbatim (`raw`) so that a saved checkpoint writes back what was loaded. Which linears a checkpoint quantizes is
read from its `ignore` list (compressed-tensors: exact names or `re:` regexes; modelopt: shell wildcards).
tests/test_quant.py checks the refusals and both round trips.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from dgemma.config.errors import ConfigError

FP8, NVFP4 = "fp8", "nvfp4"
SCHEMES = (FP8, NVFP4)
_LOADS = "dgemma loads compressed-tensors float-quantized FP8 (per-channel weights) and modelopt NVFP4"


@dataclass(frozen=True)
class QuantizationConfig:
    """scheme: `fp8` or `nvfp4`; ignore: module names/patterns kept unquantized; dynamic_activations: FP8 weights
    meant to meet per-token dynamic FP8 activations (W8A8; False: weight-only); raw: the config.json object."""

    scheme: str
    ignore: tuple[str, ...] = ()
    dynamic_activations: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def ignores(self, module: str) -> bool:
        """Whether the checkpoint keeps the linear `module` (its Hugging Face module path) unquantized."""
        for pattern in self.ignore:
            if self.scheme == NVFP4:
                if fnmatch.fnmatchcase(module, pattern):
                    return True
            elif pattern.startswith("re:"):
                if re.match(pattern[3:], module):
                    return True
            elif pattern == module:
                return True
        return False


def parse_quantization_config(data: Any) -> QuantizationConfig:
    """config.json's `quantization_config` object -> QuantizationConfig; ConfigError for anything unsupported."""
    if not isinstance(data, dict):
        raise ConfigError(f"quantization_config must be a JSON object, not {type(data).__name__}")
    method = data.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(data)
    if method == "modelopt":
        return _modelopt(data)
    raise ConfigError(f"quantization_config: quant_method {method!r} is not supported; {_LOADS}")


def _one_group(data: dict, what: str) -> dict:
    groups = data.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        n = len(groups) if isinstance(groups, dict) else 0
        raise ConfigError(f"quantization_config ({what}): {n} config_groups; dgemma loads exactly one group "
                          "(one scheme for every quantized linear)")
    group = next(iter(groups.values()))
    if not isinstance(group, dict) or group.get("targets") != ["Linear"]:
        targets = group.get("targets") if isinstance(group, dict) else group
        raise ConfigError(f"quantization_config ({what}): config group targets {targets!r}; dgemma loads "
                          "targets ['Linear'] with an ignore list")
    return group


def _need(cond: bool, what: str, found: Any) -> None:
    if not cond:
        raise ConfigError(f"quantization_config: {what} {found!r} is not supported; {_LOADS}")


def _ignore_list(data: dict) -> tuple[str, ...]:
    ignore = data.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise ConfigError("quantization_config: 'ignore' must be a list of module names")
    return tuple(ignore)


def _compressed_tensors(data: dict) -> QuantizationConfig:
    _need(data.get("format") == "float-quantized", "compressed-tensors format", data.get("format"))
    _need(data.get("quantization_status", "compressed") == "compressed", "quantization_status",
          data.get("quantization_status"))
    group = _one_group(data, "compressed-tensors")
    _need(group.get("format", "float-quantized") == "float-quantized", "group format", group.get("format"))
    w = group.get("weights")
    _need(isinstance(w, dict), "weights", w)
    found = {k: w.get(k) for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")}
    _need(found == {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
          "weights scheme", found)
    a = group.get("input_activations")
    if a is not None:
        found = {k: a.get(k) for k in ("num_bits", "type", "strategy", "dynamic")} if isinstance(a, dict) else a
        _need(found == {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
              "input_activations scheme", found)
    _need(group.get("output_activations") is None, "output_activations", group.get("output_activations"))
    return QuantizationConfig(FP8, _ignore_list(data), dynamic_activations=a is not None, raw=data)


def _modelopt(data: dict) -> QuantizationConfig:
    _need(data.get("quant_algo") == "NVFP4", "modelopt quant_algo", data.get("quant_algo"))
    if "config_groups" in data:
        w = _one_group(data, "modelopt").get("weights")
        _need(isinstance(w, dict), "weights", w)
        found = {k: w.get(k) for k in ("num_bits", "type", "group_size")}
        _need(found == {"num_bits": 4, "type": "float", "group_size": 16}, "weights scheme", found)
    elif data.get("group_size", 16) != 16:
        _need(False, "NVFP4 group_size", data.get("group_size"))
    return QuantizationConfig(NVFP4, _ignore_list(data), raw=data)
