"""Training checkpoints: written atomically, verified before a resume.

A run directory holds complete checkpoints `step-00000150/`, each a loadable Hugging Face checkpoint (model
shards, config, tokenizer) plus `train_state/` (`optimizer.safetensors`, `state.json` with the step, the
resolved config and the eval history). A checkpoint is written into a temporary directory, synced, then
renamed into place (`fileio.atomic_directory`), so a killed run leaves only complete checkpoints; the newest
`keep` are kept. The step is recorded three times (state.json, every model shard's and the optimizer file's
safetensors metadata), and a resume checks that all three agree with the directory name: weights, optimizer
state and counters belong to the same step. A damaged newest checkpoint is an error naming the file; the
previous one is used only when the caller asks (`fallback`). tests/test_train_kill.py kills runs mid-step and
mid-save and checks that the resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dgemma.config import GenerationConfig, UserError
from dgemma.fileio import recover_directory
from dgemma.model.loading import CheckpointError, read_shard_metadata, save_model
from dgemma.model.modeling import DiffusionGemma

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step-(\d{8})")
STATE_DIR = "train_state"


@dataclass
class TrainState:
    """What a resume restores besides the weights."""

    step: int
    history: list[dict[str, Any]]
    config: dict[str, Any]
    directory: Path


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint in `run_dir`, newest first (temporaries are not listed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found, reverse=True)


def save_checkpoint(run_dir: Path, step: int, model: DiffusionGemma, opt: torch.optim.Optimizer,
                    state: dict[str, Any], tokenizer_dir: Path | None, gen: GenerationConfig, keep: int = 2,
                    max_shard_bytes: int = 16 * 2**20) -> Path:
    """Write checkpoint `step` atomically (model, tokenizer, optimizer, `state`), then drop all but the newest
    `keep` checkpoints."""
    run_dir = Path(run_dir)
    target = checkpoint_dir(run_dir, step)
    meta = {"step": str(step)}
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"{names[id(p)]}::{k}": v.detach().cpu().contiguous()
               for group in opt.param_groups for p in group["params"]
               for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)}

    def write_state(directory: Path) -> None:
        state_dir = directory / STATE_DIR
        state_dir.mkdir()
        save_file(tensors, str(state_dir / "optimizer.safetensors"), metadata=meta)
        (state_dir / "state.json").write_text(json.dumps({**state, "step": step}))

    save_model(model, target, generation_config=gen, max_shard_bytes=max_shard_bytes, tokenizer_dir=tokenizer_dir,
               metadata=meta, extra=write_state)
    for _, old in list_checkpoints(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def verify_checkpoint(directory: Path) -> TrainState:
    """Check that a checkpoint is complete and that weights, optimizer state and counters are of one step;
    CheckpointError names the first file that is missing, damaged or of another step."""
    m = _STEP_DIR.fullmatch(directory.name)
    if m is None:
        raise CheckpointError(f"{directory}: not a checkpoint directory (step-NNNNNNNN)")
    step = int(m.group(1))
    state_file = directory / STATE_DIR / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_file}: cannot read ({exc})") from None
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"{state_file}: records step {state.get('step') if isinstance(state, dict) else '?'}, "
                              f"the directory says {step}")
    try:
        shards = read_shard_metadata(directory)
    except CheckpointError as exc:
        raise CheckpointError(f"{directory}: {exc}") from None
    for name, meta in shards.items():
        if meta.get("step") != str(step):
            raise CheckpointError(f"{directory / name}: weights of step {meta.get('step')}, expected {step}")
    opt_file = directory / STATE_DIR / "optimizer.safetensors"
    try:
        from safetensors import safe_open

        with safe_open(str(opt_file), "pt") as f:
            opt_step = (f.metadata() or {}).get("step")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{opt_file}: cannot read ({exc})") from None
    if opt_step != str(step):
        raise CheckpointError(f"{opt_file}: optimizer state of step {opt_step}, expected {step}")
    return TrainState(step=step, history=state.get("history", []), config=state.get("config", {}),
                      directory=directory)


def find_resume_point(run_dir: Path, fallback: bool = False) -> TrainState | None:
    """The newest complete checkpoint of `run_dir` (None if it has none). A damaged newest checkpoint raises
    CheckpointError unless `fallback`, which then takes the newest one that verifies (logged)."""
    recover_directory_all(run_dir)
    errors = []
    for _, directory in list_checkpoints(run_dir):
        try:
            return verify_checkpoint(directory)
        except CheckpointError as exc:
            if not fallback:
                raise CheckpointError(f"{exc} (resume from the previous checkpoint with --resume-fallback)") from None
            log.warning("skipping damaged checkpoint: %s", exc)
            errors.append(str(exc))
    if errors:
        raise CheckpointError(f"{run_dir}: no checkpoint verifies ({errors[-1]})")
    return None


def recover_directory_all(run_dir: Path) -> None:
    """Finish or undo checkpoint writes a killed run left behind."""
    for _, directory in list_checkpoints(run_dir):
        recover_directory(directory)
    if Path(run_dir).is_dir():
        for aside in Path(run_dir).glob(".old-step-*"):
            recover_directory(aside.with_name(aside.name.removeprefix(".old-")))
        for tmp in Path(run_dir).glob(".tmp-step-*"):
            shutil.rmtree(tmp, ignore_errors=True)


def restore_optimizer(directory: Path, model: DiffusionGemma, opt: torch.optim.Optimizer) -> None:
    """Load the optimizer moments saved beside the weights of `directory` into `opt`."""
    tensors = load_file(str(directory / STATE_DIR / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, k = key.split("::")
        if name not in params:
            raise CheckpointError(f"{directory}: optimizer state for unknown parameter {name!r}")
        opt.state[params[name]][k] = value.to(params[name].device)


def resolve_run_directory(path: Path) -> Path:
    """A checkpoint directory, or for a training run directory its newest complete checkpoint."""
    if (path / "config.json").exists() or not path.is_dir():
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        return path
    try:
        return find_resume_point(path).directory
    except UserError:
        return checkpoints[0][1]  # loading it reports what is wrong
