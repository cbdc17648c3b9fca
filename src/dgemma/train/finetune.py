"""`dgemma finetune`: supervised fine-tuning of a checkpoint with the DiffusionGemma objective, full or LoRA, in one
process or under `torchrun` (FSDP2, expert parallelism; `train/parallel.py`).

Data and masking are `train/sft_data.py`'s. Every weight trains (the router stays frozen unless asked), or only
LoRA adapters on a frozen base (`train/lora.py`: attention q/k/v/o and the dense MLP by default, rank 16, alpha
32). AdamW (0.95, 0.99), warm-up then cosine, clipping: the released model's recipe by default.

The run directory `--out` holds the result and the checkpoints:
- `adapter_config.json` + `adapter_model.safetensors` (LoRA, peft's format) or `model/` (a Hugging Face
  checkpoint, full fine-tuning), written when the run ends (or on Ctrl-C);
- `checkpoints/step-NNNNNNNN/`: the trainable state and the optimizer moments (torch.distributed.checkpoint,
  sharded across ranks) plus `state.json` (step, resolved config, eval history), written into a temporary
  directory and renamed when complete. A run resumes from the newest; step k's batch and noise are functions of
  (seed, k), so a resumed run continues exactly (tests/test_finetune.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dgemma.bundled import resolve_model
from dgemma.config import ConfigError, FinetuneConfig, parse_dtype
from dgemma.fileio import fsync_dir, sync_tree, write_atomic
from dgemma.model.loading import CheckpointError, load_model, read_generation_config
from dgemma.model.modeling import DiffusionGemma
from dgemma.tokenizer import Tokenizer
from dgemma.train import parallel
from dgemma.train.lora import LoraConfig, attach_adapter, save_adapter
from dgemma.train.objective import Batch, objective
from dgemma.train.schedule import InterruptFlag, lr_at, step_generator
from dgemma.train.sft_data import Batches, SFTExample, collate, load_examples, split_held_out

log = logging.getLogger(__name__)
EVAL_T = (0.25, 0.5, 0.75)  # noise levels of the eval loss (fixed, so evals compare across steps)


@dataclasses.dataclass
class _Run:
    """What the loop works on."""

    cfg: FinetuneConfig
    env: parallel.Dist
    model: DiffusionGemma
    module: torch.nn.Module  # what trains: the adapter (LoRA) or the model (sharded under torchrun)
    forward: object  # batch, generator, t -> LossParts
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    pad_id: int
    adapter: object | None


def finetune(cfg: FinetuneConfig) -> Path:
    """Fine-tune (or resume) and return the result: the adapter directory (LoRA) or the checkpoint directory.
    `cfg.stop_after` ends the run early at that step, with a checkpoint to resume from."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = parallel.init_distributed()
    base = resolve_model(None if cfg.model == "bundled" else cfg.model)
    tok = Tokenizer.from_directory(base)
    if tok is None:
        raise ConfigError(f"{base} has no tokenizer.json; fine-tuning renders the data with it")
    run = _build(cfg, env, base)
    c = run.model.config.canvas_length
    end_ids = read_generation_config(base, run.model.config).eos_token_ids
    if not end_ids:
        raise ConfigError(f"{base}: the checkpoint names no end token ids; fine-tuning needs one to end answers")
    train_set, held = _data(cfg, tok, end_ids, c)
    held = held[:cfg.eval_examples]
    step, history = _resume(run)
    _say(env, f"fine-tuning {base} ({'LoRA rank ' + str(cfg.lora.lora_rank) if run.adapter else 'all weights'}, "
              f"{sum(p.numel() for p in run.params) / 1e6:.2f}M trainable) on {len(train_set)} examples "
              f"({len(held)} held out), steps {step} -> {cfg.optim.steps}, world size {env.world_size}")
    end = min(cfg.optim.steps, cfg.stop_after) if cfg.stop_after else cfg.optim.steps
    batches = Batches(train_set, cfg.data.batch_size, cfg.optim.seed)
    saved = step
    with InterruptFlag() as interrupted, _Progress(env, step, end, cfg.log_every) as progress:
        while step < end and not parallel.any_rank(interrupted.set):
            loss, tokens = _train_step(run, batches, step)
            step += 1
            progress.update(step, loss, tokens)
            if held and (step % cfg.eval_every == 0 or step == end):
                history.append({"step": step, "eval_loss": _evaluate(run, held)})
                progress.eval_loss = history[-1]["eval_loss"]
            if step % cfg.save_every == 0 or step == end:
                _save(run, step, history)
                saved = step
        if saved != step:  # Ctrl-C between checkpoints
            _save(run, step, history)
    result = _export(run, base)
    if interrupted.set:
        _say(env, f"interrupted at step {step}: checkpoint and {result} written")
    return result


def _build(cfg: FinetuneConfig, env: parallel.Dist, base: Path) -> _Run:
    device = env.device if env.mesh is not None else torch.device(cfg.device)
    dtype = parse_dtype(cfg.dtype)
    if cfg.lora.lora_rank == 0 and dtype != "float32":
        raise ConfigError("full fine-tuning keeps fp32 master weights (--dtype float32); a LoRA base may be bf16")
    model, _ = load_model(base, dtype=dtype, device=device)
    if model.config.quantization is not None and (cfg.lora.lora_rank == 0 or env.mesh is not None):
        raise ConfigError(f"{base} is quantized ({model.config.quantization.scheme}): it fine-tunes LoRA adapters "
                          "(--lora-rank R) in one process; full or multi-process fine-tuning needs its bf16 checkpoint")
    # own copies: the loaded tensors are memory-mapped views of the checkpoint, and training writes them
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    adapter = None
    if cfg.lora.lora_rank:
        lora = LoraConfig(rank=cfg.lora.lora_rank, alpha=cfg.lora.lora_alpha, dropout=cfg.lora.lora_dropout,
                          targets=cfg.lora.lora_targets)
        adapter = attach_adapter(model, lora, seed=cfg.optim.seed)  # freezes the base
        params = list(adapter.parameters())
    else:
        model.requires_grad_(True)
        if not cfg.optim.train_router:
            for layer in model.stack.layers:
                layer.router.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
    module, pad_id = adapter or model, model.config.pad_token_id or 0

    def opts(t):  # evals (t given) use the reference objective
        return dict(pad_id=pad_id, self_cond_prob=cfg.optim.self_cond_prob, t=t,
                    lower_fill_noise=0.0 if t is not None else cfg.optim.lower_fill_noise)

    if env.mesh is not None:
        sharded = parallel.parallelize(model, env, parallel.ParallelConfig(expert_parallel=cfg.expert_parallel,
                                                                           checkpointing=cfg.checkpointing))
        module = adapter or sharded

        def forward(batch, gen, t=None):
            return sharded(objective, batch, gen, always_self_cond_pass=True, **opts(t))
    else:
        def forward(batch, gen, t=None):
            return objective(model, batch, gen, **opts(t))
    model.train()
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=(0.95, 0.99), eps=1e-8)
    return _Run(cfg, env, model, module, forward, opt, params, pad_id, adapter)


def _data(cfg: FinetuneConfig, tok: Tokenizer, end_ids: tuple[int, ...], c: int
          ) -> tuple[list[SFTExample], list[SFTExample]]:
    examples, report = load_examples(cfg.data.data, tok, end_ids, c, cfg.data)
    log.info("%s: %s", cfg.data.data, report.summary())
    if cfg.data.eval_data:
        return examples, load_examples(cfg.data.eval_data, tok, end_ids, c, cfg.data)[0]
    return split_held_out(examples, cfg.data.eval_fraction, cfg.optim.seed)


def _rank_slice(run: _Run, examples: list[SFTExample]) -> Batch:
    """This rank's share of a global batch."""
    env = run.env
    mine = examples[env.rank::env.world_size] or examples[:1]
    return _to(collate(mine, run.pad_id), run.model.device)


def _to(batch: Batch, device: torch.device) -> Batch:
    return Batch(*(None if t is None else t.to(device) for t in (batch.clean, batch.prompt_lens, batch.resp_lens,
                                                                  batch.labels, batch.loss_mask, batch.answer_lens)))


def _train_step(run: _Run, batches: Batches, step: int) -> tuple[float, int]:
    """One optimisation step; every random choice comes from generators seeded with (seed, step)."""
    cfg = run.cfg.optim
    examples = batches.batch(step)
    batch = _rank_slice(run, examples)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    parts = run.forward(batch, step_generator(cfg.seed, step, 1 + run.env.rank))
    run.opt.zero_grad(set_to_none=True)
    parts.total.backward()
    if run.adapter is not None:  # replicated adapters live outside FSDP: average their gradients here
        parallel.all_reduce_gradients(run.params)
    torch.nn.utils.clip_grad_norm_(run.params, cfg.clip)
    run.opt.step()
    return parallel.mean_over_ranks(parts.total.item()), sum(e.length for e in examples)


@torch.no_grad()
def _evaluate(run: _Run, held: list[SFTExample]) -> float:
    """Mean objective over the held-out examples at fixed noise levels, without self-conditioning."""
    run.model.eval()
    losses = []
    size = run.cfg.data.batch_size
    for i in range(0, len(held), size):
        batch = _rank_slice(run, held[i:i + size])
        for t in EVAL_T:
            gen = step_generator(run.cfg.optim.seed + 999, i, int(t * 100))
            b = batch.clean.shape[0]
            parts = run.forward(batch, gen, torch.full((b,), t, device=batch.clean.device))
            losses.append(parts.total.item())
    run.model.train()
    return parallel.mean_over_ranks(sum(losses) / len(losses))


# -- checkpoints and the result ------------------------------------------------------------------------------
def _checkpoints(cfg: FinetuneConfig) -> Path:
    return Path(cfg.out) / "checkpoints"


def _save(run: _Run, step: int, history: list[dict]) -> None:
    """Checkpoint `step` atomically: every rank writes its shards into a temporary directory; rank 0 adds
    state.json, syncs and renames it, then drops all but the newest `keep_checkpoints`."""
    root = _checkpoints(run.cfg)
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if run.env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    parallel.barrier()
    parallel.save_training_state(tmp, run.module, run.opt)
    parallel.barrier()
    if run.env.is_main:
        state = {"step": step, "config": dataclasses.asdict(run.cfg), "history": history}
        (tmp / "state.json").write_text(json.dumps(state))
        sync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()


def _resume(run: _Run) -> tuple[int, list[dict]]:
    """Restore the newest complete checkpoint (0 and no history when there is none)."""
    root = _checkpoints(run.cfg)
    for tmp in root.glob(".tmp-step-*") if run.env.is_main else ():
        shutil.rmtree(tmp, ignore_errors=True)
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    for directory in found:
        try:
            state = json.loads((directory / "state.json").read_text())
            if state.get("step") != int(directory.name.removeprefix("step-")) or not (directory / ".metadata").exists():
                raise CheckpointError(f"{directory}: incomplete or of another step")
            parallel.load_training_state(directory, run.module, run.opt)
        except (OSError, ValueError, RuntimeError) as exc:
            if not run.cfg.resume_fallback:
                raise CheckpointError(f"{directory}: cannot resume from it ({exc}); --resume-fallback takes the "
                                      "previous checkpoint") from None
            log.warning("skipping damaged checkpoint %s: %s", directory, exc)
            continue
        _say(run.env, f"resuming {run.cfg.out} from step {state['step']} ({directory.name})")
        return state["step"], state.get("history", [])
    return 0, []


def _export(run: _Run, base: Path) -> Path:
    """The result: the adapter files in `out` (each written atomically, the config last) or `out/model`."""
    out = Path(run.cfg.out)
    if run.adapter is None:
        gen = read_generation_config(base, run.model.config)  # the base's sampler settings go with its weights
        model_dir = parallel.export_hf_checkpoint(run.model, out / "model", tokenizer_dir=base, generation_config=gen)
        return model_dir or out / "model"
    if run.env.is_main:
        staging = out / ".tmp-adapter"
        shutil.rmtree(staging, ignore_errors=True)
        save_adapter(run.adapter, staging, base_model_name_or_path=str(base))
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            write_atomic(out / name, (staging / name).read_bytes())
        shutil.rmtree(staging)
    parallel.barrier()
    return out


def _say(env: parallel.Dist, message: str) -> None:
    if env.is_main:
        print(message, file=sys.stderr, flush=True)


class _Progress:
    """A progress bar (rich) with loss, eval loss, tokens/s and ETA on a terminal; a log line every
    `log_every` steps otherwise. Rank 0 only."""

    def __init__(self, env: parallel.Dist, start: int, end: int, every: int) -> None:
        self.env, self.start, self.end, self.every, self.eval_loss = env, start, end, every, None
        self.bar = None
        self.t0, self.tokens = time.perf_counter(), 0

    def __enter__(self) -> _Progress:
        if self.env.is_main and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.description}"), TimeRemainingColumn(), transient=False)
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=self.end, completed=self.start)
        return self

    def update(self, step: int, loss: float, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.t0)
        ev = f", eval {self.eval_loss:.3f}" if self.eval_loss is not None else ""
        text = f"loss {loss:.3f}{ev}, {rate:.0f} tok/s"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, description=text)
        elif self.env.is_main and (step % self.every == 0 or step == self.end):
            print(f"step {step}/{self.end} {text}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False
