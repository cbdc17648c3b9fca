"""Load and save DiffusionGemma checkpoints in the Hugging Face layout.

Layout: `config.json`, `generation_config.json`, `model.safetensors` or sharded
`model-0000k-of-0000n.safetensors` with `model.safetensors.index.json`, tokenizer files beside them.

Loading builds the model on the meta device and assigns tensors that are memory-mapped views of the
shard files, so a bf16 checkpoint loaded as bf16 on CPU costs no second copy in RAM (only tensors
that change dtype or device are materialised, one at a time). The safetensors header is parsed here
so that truncated or inconsistent files give a clear `CheckpointError`; pickle formats are refused.

Key accounting (every key in the checkpoint is either loaded, verified or reported):
- `model.decoder.*`: the one text stack; every expected key must be present with the right shape.
- `model.encoder.language_model.layers.{L}.layer_scalar`: duplicates of the decoder's; verified equal.
- `lm_head.weight`, other `model.encoder.language_model.*`: tied duplicates; ignored, reported.
- `model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`: the vision tower (not built yet);
  reported as unused.
Anything else is an error. tests/test_loading.py covers each error and both round trips.

A config.json with a `quantization_config` builds the compressed model (`model/quant.py`): its compressed tensors
keep their stored dtypes exactly, per-expert checkpoint tensors are stacked into the expert banks, and a checkpoint
that mixes quantized and unquantized tensors is refused (tests/test_quant.py).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from dgemma.config import GenerationConfig, ModelConfig, UserError, parse_dtype
from dgemma.fileio import atomic_directory
from dgemma.model import quant
from dgemma.model.modeling import DiffusionGemma

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json")
_SHARD_NAME = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
# what a checkpoint directory may hold (train_state/: a training checkpoint's optimizer state and counters)
_CHECKPOINT_FILES = {"config.json", "generation_config.json", INDEX_FILE, "train_state", *TOKENIZER_FILES}
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# tensors the model computes with: loaded in the compute dtype; every other tensor (integer codes, fp8 values,
# scales of a compressed layout) is carried with exactly the dtype the model declares
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_ENCODER_SCALAR = re.compile(r"^model\.encoder\.language_model\.layers\.(\d+)\.layer_scalar$")
_VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
_TIED_PREFIXES = ("model.encoder.language_model.", "lm_head.")
_QUANT_SUFFIX = re.compile(r"\.(weight_scale|weight_scale_2|input_scale|weight_packed|weight_zero_point)$")
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded; the message says what to fix."""


@dataclass
class LoadReport:
    directory: Path
    loaded: int = 0
    verified_layer_scalars: int = 0
    tied_ignored: list[str] = field(default_factory=list)
    unused_vision: list[str] = field(default_factory=list)
    quantization: str | None = None  # the scheme of a compressed checkpoint

    def summary(self) -> str:
        parts = [f"{self.loaded} tensors loaded", f"{self.verified_layer_scalars} encoder layer scalars verified"]
        if self.quantization:
            parts.append(f"{self.quantization} weights kept compressed")
        if self.tied_ignored:
            parts.append(f"{len(self.tied_ignored)} tied duplicates ignored")
        if self.unused_vision:
            parts.append(f"{len(self.unused_vision)} vision-tower tensors not used (text-only model)")
        return ", ".join(parts)


# -- safetensors reading ---------------------------------------------------------------------------
class _Shard:
    """A memory-mapped safetensors file with a validated header."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"{path.name}: file is truncated (no safetensors header)")
                header_len = struct.unpack("<Q", raw_len)[0]
                if header_len > size - 8 or header_len > 100_000_000:
                    raise CheckpointError(
                        f"{path.name}: file is truncated or not safetensors (header size {header_len})")
                header = json.loads(f.read(header_len))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path.name}: cannot read safetensors header ({exc})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
        for key, info in header.items():
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path.name}: tensor {key!r} has unknown dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{path.name}: file is truncated ({size} bytes, tensor {key!r} needs {self.data_start + end}); "
                    "re-download or re-save this shard")
            self.entries[key] = (dtype, list(info["shape"]), begin, end)
        self._map: mmap.mmap | None = None

    def tensor(self, key: str) -> torch.Tensor:
        """A zero-copy view into the mapped file (copy-on-write: the file is never modified)."""
        dtype, shape, begin, end = self.entries[key]
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = memoryview(self._map)[self.data_start + begin:self.data_start + end]
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: no {path.name} ({what})") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: cannot parse {what} ({exc})") from None


def _check_directory(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the checkpoint directory (with config.json)")
    return path


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = _check_directory(directory)
    try:
        return ModelConfig.from_hf_dict(_read_json(path / "config.json", "the model config"))
    except UserError as exc:
        raise CheckpointError(f"{path / 'config.json'}: {exc}") from None


def read_generation_config(directory: str | os.PathLike, model_config: ModelConfig) -> GenerationConfig:
    path = Path(directory) / "generation_config.json"
    data = _read_json(path, "the generation config") if path.exists() else {}
    try:
        return GenerationConfig.from_hf_dict(data, model_config)
    except UserError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _open_shards(path: Path) -> dict[str, _Shard]:
    """Map every checkpoint key to the shard holding it."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).exists():
        weight_map, files = None, [SINGLE_FILE]
    else:
        pickles = [n for n in _PICKLE_FILES if (path / n).exists()]
        hint = (f" (found {', '.join(pickles)}: pickle checkpoints are never loaded, convert them to safetensors)"
                if pickles else "")
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    shards: dict[str, _Shard] = {}
    for name in files:
        if not (path / name).exists():
            raise CheckpointError(f"{path}: shard {name} listed in {INDEX_FILE} is missing")
        shards[name] = _Shard(path / name)
    by_key: dict[str, _Shard] = {}
    if weight_map is None:
        by_key = dict.fromkeys(shards[SINGLE_FILE].entries, shards[SINGLE_FILE])
    else:
        for key, name in weight_map.items():
            if key not in shards[name].entries:
                raise CheckpointError(f"{path / name}: tensor {key!r} listed in {INDEX_FILE} is not in this shard")
            by_key[key] = shards[name]
    return by_key


def read_shard_metadata(directory: str | os.PathLike) -> dict[str, dict[str, str]]:
    """The safetensors header metadata of every shard of a checkpoint, by file name; each header is validated
    (a missing, truncated or inconsistent shard raises CheckpointError naming the file)."""
    by_key = _open_shards(_check_directory(directory))
    return {shard.path.name: shard.metadata for shard in by_key.values()}


def load_model(directory: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", build: Callable[[ModelConfig], DiffusionGemma] | None = None
               ) -> tuple[DiffusionGemma, LoadReport]:
    """Build the model on the meta device and fill it from the checkpoint in `directory`.

    `dtype` (default: the checkpoint's own) is the compute dtype: every tensor the model declares in a float
    compute dtype is loaded in it; every other tensor must have exactly the dtype the model declares and keeps it
    (`COMPUTE_DTYPES`). `build` makes the model from its config (default `DiffusionGemma`; a model with another
    layout of some weights, e.g. compressed ones). Returns the model in eval mode and a report of what was
    loaded, verified and left unused."""
    path = _check_directory(directory)
    config = read_model_config(path)
    if dtype is None:
        dtype = config.dtype
    target = dtype if isinstance(dtype, torch.dtype) else getattr(torch, parse_dtype(dtype))
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise CheckpointError(f"invalid device {device!r}: {exc}") from None
    by_key = _open_shards(path)
    with torch.device("meta"):
        model = (build or (quant.build_quantized if config.quantization else DiffusionGemma))(config)
    report = LoadReport(directory=path, quantization=config.quantization and config.quantization.scheme)
    expected = model.state_dict()
    parts, stored = quant.checkpoint_parts(model), quant.stored_keys(model)
    _refuse_mixed(config, by_key, parts, stored)
    needed = [p.key for ps in parts.values() for p in ps]
    missing = [k for k in [*(k for k in expected if k not in parts), *needed] if k not in by_key]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        if key in parts:
            tensors[key] = _stacked(by_key, parts[key], ref, device)
            continue
        src = by_key[key]
        _check_shape(src, key, ref.shape)
        tensors[key] = _placed(src.tensor(key), ref.dtype, target, device, f"{src.path.name}: tensor {key!r}",
                               exact=key in stored)
    report.loaded = len(tensors) + len(needed) - len(parts)
    _account_extra_keys(path, by_key, set(expected) | set(needed), tensors, report)
    model.load_state_dict(tensors, assign=True, strict=True)
    model.stack.reset_buffers(device)
    model.requires_grad_(False)
    if report.unused_vision:
        log.warning("%s: vision tower present but not used (%d tensors); text-only generation",
                    path, len(report.unused_vision))
    log.info("%s: %s", path, report.summary())
    return model.eval(), report


def _check_shape(src: _Shard, key: str, shape) -> None:
    if list(src.entries[key][1]) != list(shape):
        raise CheckpointError(f"{src.path.name}: tensor {key!r} has shape {src.entries[key][1]}, "
                              f"config.json implies {list(shape)}")


def _stacked(by_key: dict[str, _Shard], parts: list[quant.Part], ref: torch.Tensor,
             device: torch.device) -> torch.Tensor:
    """A bank tensor filled from its per-expert checkpoint tensors, each checked for shape and dtype."""
    out = torch.empty(ref.shape, dtype=ref.dtype, device=device)
    for p in parts:
        src = by_key[p.key]
        _check_shape(src, p.key, p.shape)
        t = _placed(src.tensor(p.key), p.dtype, p.dtype, device, f"{src.path.name}: tensor {p.key!r}", exact=True)
        rows = 1 if p.shape == () else p.shape[0]
        out[p.expert, p.start:p.start + rows].copy_(t.reshape(rows, *ref.shape[2:]))
    return out


def _refuse_mixed(config: ModelConfig, by_key: dict[str, _Shard],
                  parts: dict[str, list[quant.Part]], stored: set[str]) -> None:
    """One line naming the first tensor that is compressed where config.json says plain, or plain where it says
    compressed (shards of two checkpoints, or a config.json that does not belong to the weights)."""
    q = config.quantization
    compressed_weights = {k for k in stored if k.endswith(".weight")} | {
        p.key for k, ps in parts.items() if k.endswith(".weight") for p in ps}
    banks = {k.removesuffix(".weight") for k in parts if k.endswith(".weight")}  # fused bf16 names of those banks
    for key, shard in by_key.items():
        dtype = shard.entries[key][0]
        if key.startswith(_VISION_PREFIXES) or key.startswith(_TIED_PREFIXES):
            continue
        if q is None and (_QUANT_SUFFIX.search(key) or _PER_EXPERT.search(key)):
            raise CheckpointError(
                f"{shard.path.name}: tensor {key!r} ({dtype}) is quantized but config.json has no "
                "quantization_config: this checkpoint mixes quantized and unquantized shards, or its config.json "
                "belongs to other weights")
        if q is not None and ((key in compressed_weights and dtype in COMPUTE_DTYPES) or key in banks):
            raise CheckpointError(
                f"{shard.path.name}: tensor {key!r} is stored unquantized ({dtype}) but config.json's "
                f"quantization_config ({q.scheme}) stores it compressed: this checkpoint mixes quantized and "
                "unquantized shards")


def _placed(tensor: torch.Tensor, declared: torch.dtype, target: torch.dtype, device: torch.device,
            what: str, exact: bool = False) -> torch.Tensor:
    """A checkpoint tensor as the model holds it (see `load_model`); `exact`: a compressed tensor or scale, kept in
    exactly its declared dtype."""
    if declared in COMPUTE_DTYPES and not exact:
        if tensor.dtype not in COMPUTE_DTYPES:
            raise CheckpointError(f"{what} has dtype {tensor.dtype}; the model computes with it in floating point "
                                  "(a compressed checkpoint needs its quantization_config)")
        return tensor.to(device=device, dtype=target)
    if tensor.dtype != declared:
        raise CheckpointError(f"{what} has dtype {tensor.dtype}, the model holds it as {declared}")
    return tensor.to(device=device)


def _account_extra_keys(path: Path, by_key: dict[str, _Shard], accounted: set[str], tensors: dict,
                        report: LoadReport) -> None:
    for key, shard in by_key.items():
        if key in accounted:
            continue
        match = _ENCODER_SCALAR.match(key)
        if match:
            twin = f"model.decoder.layers.{match.group(1)}.layer_scalar"
            if twin not in tensors:
                raise CheckpointError(f"{shard.path.name}: {key!r} has no decoder layer to match")
            dec = tensors[twin]
            enc = shard.tensor(key).to(device=dec.device, dtype=dec.dtype)  # compared as loaded
            if not torch.equal(enc, dec):
                raise CheckpointError(f"{shard.path.name}: {key!r} = {enc.tolist()} differs from the decoder's "
                                      f"{dec.tolist()}; the two stacks must share weights")
            report.verified_layer_scalars += 1
        elif key.startswith(_VISION_PREFIXES):
            report.unused_vision.append(key)
        elif key.startswith(_TIED_PREFIXES):
            report.tied_ignored.append(key)
        else:
            raise CheckpointError(f"{shard.path.name}: unexpected tensor {key!r} (not a DiffusionGemma key)")


# -- saving ----------------------------------------------------------------------------------------
def save_model(model: DiffusionGemma, directory: str | os.PathLike, *,
               generation_config: GenerationConfig | None = None, max_shard_bytes: int = 2 * 1024**3,
               tokenizer_dir: str | os.PathLike | None = None, dtype: str | None = None,
               metadata: dict[str, str] | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model` in the Hugging Face layout (loadable by transformers and by `load_model`).

    The directory appears (or replaces an earlier checkpoint) only when every file is written and synced
    (`fileio.atomic_directory`); a directory holding anything but checkpoint files is refused rather than
    replaced. `metadata` goes into every shard's safetensors header (training writes its step there); `extra`
    writes more files into the directory before it is made visible (training's optimizer state). The
    encoder's duplicate layer scalars are written as transformers expects. The vision tower is not part of
    this model: a saved checkpoint is text-only (its config has no vision_config)."""
    out = Path(directory)
    _check_replaceable(out)
    config = model.config
    dtype_name = parse_dtype(dtype) if dtype else _dtype_name_of(model.dtype)
    target = getattr(torch, dtype_name)
    stored = quant.stored_keys(model)  # compressed tensors and their scales: written exactly as held
    state = {k: v.detach().to("cpu", target if v.dtype in COMPUTE_DTYPES and k not in stored else v.dtype)
             for k, v in model.state_dict().items()}
    state = quant.split_banks(model, state)
    for i in range(config.num_hidden_layers):
        twin = state[f"model.decoder.layers.{i}.layer_scalar"]
        state[f"model.encoder.language_model.layers.{i}.layer_scalar"] = twin.clone()
    hf_config = config.to_hf_dict()
    hf_config["dtype"] = dtype_name
    if config.vision_config is not None:
        log.warning("saving a text-only checkpoint: the vision tower is not carried over")
        hf_config.pop("vision_config")
    gen = generation_config or GenerationConfig(eos_token_ids=config.eos_token_ids, pad_token_id=config.pad_token_id)
    with atomic_directory(out) as tmp:
        _write_shards(state, tmp, max_shard_bytes, {"format": "pt", **(metadata or {})})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(gen.to_hf_dict(), indent=2))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    (tmp / name).write_bytes(src.read_bytes())
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        if extra is not None:
            extra(tmp)
    return out


def _check_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    others = sorted(p.name for p in out.iterdir()
                    if p.name not in _CHECKPOINT_FILES and not _SHARD_NAME.fullmatch(p.name))
    if others:
        raise CheckpointError(f"{out}: holds files that are not part of a checkpoint ({', '.join(others[:3])}); "
                              "save to a new directory")


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int, metadata: dict[str, str]) -> None:
    shards = _plan_shards(state, max_shard_bytes)
    n = len(shards)
    weight_map, total = {}, 0
    for i, keys in enumerate(shards, 1):
        name = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: _own(state[k]) for k in keys}, str(out / name), metadata=metadata)
        for k in keys:
            weight_map[k] = name
            total += state[k].numel() * state[k].element_size()
    if n > 1:
        index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def _own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor with a storage of its own (a slice of an expert bank is copied as it is written)."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _plan_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def _dtype_name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
