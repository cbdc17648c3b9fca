"""`dgemma train`: the training loop around `objective.objective`.

Batches mix plain-text pretraining windows (prompt = a random-length prefix, response = the following whole
canvases) and chat pairs in the chat template (response = answer + end-of-turn, EOS-filled to a whole
canvas). Every random choice of step k comes from a generator seeded with (seed, k), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would (tests/test_train.py).

Checkpoints (every `save_every` steps, at the end, and on Ctrl-C) go to `out/step-NNNNNNNN/`, written
atomically (`train/checkpoint.py`): the model in the Hugging Face layout (shards of at most 16 MB, loadable
by transformers and `load_model`), the tokenizer, and `train_state/` (optimizer moments + a JSON of counters);
the newest `keep_checkpoints` are kept. A run resumes from the newest complete checkpoint of `out/`.
AdamW(0.95, 0.99), linear warmup then cosine decay, gradient clipping; fp32 on CPU, bf16 autocast on CUDA.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dgemma.config import ConfigError, DataConfig, GenerationConfig, TrainConfig
from dgemma.model.init import random_model
from dgemma.model.loading import load_model
from dgemma.tokenizer import Tokenizer
from dgemma.train.checkpoint import find_resume_point, restore_optimizer, save_checkpoint
from dgemma.train.data import DOC_SEP
from dgemma.train.objective import Batch, objective
from dgemma.train.schedule import InterruptFlag, lr_at, step_generator

log = logging.getLogger(__name__)


class Corpus:
    """Tokenized training data: one long token stream (documents joined by EOS) and chat pairs."""

    def __init__(self, data_dir: Path, split: str, tok: Tokenizer, cfg: DataConfig, canvas_length: int) -> None:
        self.eos, self.pad = tok.token_to_id("<eos>"), tok.token_to_id("<pad>")
        self.end_turn = tok.token_to_id("<turn|>")
        docs = (data_dir / f"pretrain.{split}.txt").read_text().split(DOC_SEP)
        stream: list[int] = []
        for d in docs:
            stream += tok.encode(d, add_special_tokens=False) + [self.eos]
        self.stream = torch.tensor(stream, dtype=torch.long)
        self.chat: list[tuple[list[int], list[int]]] = []
        c = self.canvas_length = canvas_length
        for line in (data_dir / f"chat.{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            prompt = tok.encode_chat([{"role": "user", "content": row["prompt"]}])[-cfg.max_prompt:]
            answer = tok.encode(row["response"].strip(), add_special_tokens=False) + [self.end_turn]
            answer = answer[: cfg.max_canvases * c]
            self.chat.append((prompt, answer + [self.eos] * (-len(answer) % c)))
        self.cfg = cfg

    def batch(self, gen: torch.Generator) -> Batch:
        cfg, c = self.cfg, self.canvas_length
        examples = []
        for _ in range(cfg.batch_size):
            if self.chat and torch.rand(1, generator=gen).item() < cfg.chat_fraction:
                i = int(torch.randint(0, len(self.chat), (1,), generator=gen))
                examples.append(self.chat[i])
                continue
            n_canvas = int(torch.randint(1, cfg.max_canvases + 1, (1,), generator=gen))
            p = int(torch.randint(1, cfg.max_prompt + 1, (1,), generator=gen))
            start = int(torch.randint(0, len(self.stream) - p - n_canvas * c, (1,), generator=gen))
            window = self.stream[start:start + p + n_canvas * c].tolist()
            examples.append((window[:p], window[p:]))
        s = max(len(a) + len(b) for a, b in examples)
        clean = torch.full((len(examples), s), self.pad, dtype=torch.long)
        for i, (a, b) in enumerate(examples):
            clean[i, : len(a) + len(b)] = torch.tensor(a + b)
        return Batch(clean=clean, prompt_lens=torch.tensor([len(a) for a, _ in examples]),
                     resp_lens=torch.tensor([len(b) for _, b in examples]))


def _to(batch: Batch, device: str) -> Batch:
    return Batch(batch.clean.to(device), batch.prompt_lens.to(device), batch.resp_lens.to(device))


@torch.no_grad()
def evaluate(model, corpus: Corpus, cfg: TrainConfig) -> dict[str, float]:
    """Validation encoder (next-token) loss and canvas CE at fixed noise levels, on fixed batches."""
    model.eval()
    ar, by_t = [], {t: [] for t in (0.1, 0.5, 0.9)}
    for i in range(cfg.eval_batches):
        batch = _to(corpus.batch(step_generator(cfg.optim.seed + 999, i)), cfg.device)
        for t in by_t:
            parts = objective(model, batch, step_generator(cfg.optim.seed + 999, i, 1), pad_id=corpus.pad,
                              self_cond_prob=0.0, t=torch.full((batch.clean.shape[0],), t, device=cfg.device))
            by_t[t].append(parts.diffusion.item())
        ar.append(parts.encoder.item())
    model.train()
    return {"val_ar_loss": sum(ar) / len(ar), **{f"val_canvas_ce_t{t}": sum(v) / len(v) for t, v in by_t.items()}}


def train(cfg: TrainConfig, stop_after: int | None = None) -> Path:
    """Train (or resume from the newest complete checkpoint in `out`) and return the newest checkpoint's
    directory. `stop_after` ends the run early at that step (used to test resuming). Ctrl-C saves a
    checkpoint at the current step and returns."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tok_dir, data_dir, out = Path(cfg.data.tokenizer), Path(cfg.data.data), Path(cfg.out)
    tok = Tokenizer.from_directory(tok_dir)
    if tok is None:
        raise ConfigError(f"{tok_dir} has no tokenizer.json; run `dgemma data build` first")
    c = cfg.model.canvas_length
    train_data, val_data = Corpus(data_dir, "train", tok, cfg.data, c), Corpus(data_dir, "val", tok, cfg.data, c)
    resume = find_resume_point(out, fallback=cfg.resume_fallback)
    if resume is not None:
        model, _ = load_model(resume.directory, dtype="float32", device=cfg.device)
        # Own copies: the loaded tensors are memory-mapped views of the checkpoint's files.
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        model.requires_grad_(True)
    else:
        shape = cfg.model.model_config(tok.vocab_size, tok.token_to_id("<pad>"), tok.token_to_id("<bos>"),
                                       [tok.token_to_id("<eos>"), tok.token_to_id("<turn|>")])
        model = random_model(shape, seed=cfg.optim.seed, device=cfg.device).requires_grad_(True)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=(0.95, 0.99), eps=1e-8)
    step, history = 0, []
    if resume is not None:
        restore_optimizer(resume.directory, model, opt)
        step, history = resume.step, resume.history
        print(f"resuming {out} from step {step} ({resume.directory.name})", file=sys.stderr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {n_params / 1e6:.2f}M parameters, {len(train_data.stream)} stream tokens, "
          f"{len(train_data.chat)} chat pairs, from step {step} to {cfg.optim.steps}", file=sys.stderr)
    end = cfg.optim.steps if stop_after is None else min(cfg.optim.steps, stop_after)
    saved = step if resume is not None else -1
    progress = _Progress(cfg, end)
    with InterruptFlag() as interrupted:
        while step < end and not interrupted.set:
            parts, tokens = _train_step(model, opt, train_data, cfg, step)
            step += 1
            progress.log(step, parts, tokens)
            if step % cfg.eval_every == 0 or step == cfg.optim.steps:
                metrics = {"step": step, **evaluate(model, val_data, cfg)}
                history.append(metrics)
                print("eval " + json.dumps(metrics), file=sys.stderr, flush=True)
            if step % cfg.save_every == 0 or step == end:
                _save(model, opt, cfg, tok_dir, step, history)
                saved = step
        if interrupted.set and saved != step:
            _save(model, opt, cfg, tok_dir, step, history)
    if interrupted.set:
        print(f"interrupted: checkpoint saved at step {step}", file=sys.stderr)
    return out / f"step-{step:08d}"


def _train_step(model, opt, data: Corpus, cfg: TrainConfig, step: int) -> tuple:
    """One optimisation step; every random choice comes from generators seeded with (seed, step)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device.startswith("cuda") else _null()
    optim = cfg.optim
    batch = _to(data.batch(step_generator(optim.seed, step)), cfg.device)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, optim)
    with autocast:
        parts = objective(model, batch, step_generator(optim.seed, step, 1), pad_id=data.pad,
                          self_cond_prob=optim.self_cond_prob)
    opt.zero_grad(set_to_none=True)
    parts.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), optim.clip)
    opt.step()
    return parts, int((batch.prompt_lens + batch.resp_lens).sum())


class _Progress:
    """A log line every `log_every` steps: losses, learning rate, tokens per second since the last line."""

    def __init__(self, cfg: TrainConfig, end: int) -> None:
        self.cfg, self.end, self.tokens, self.since = cfg, end, 0, time.perf_counter()

    def log(self, step: int, parts, tokens: int) -> None:
        self.tokens += tokens
        if step % self.cfg.log_every and step != self.end:
            return
        now = time.perf_counter()
        print(f"step {step}/{self.cfg.optim.steps} loss {parts.total.item():.3f} (canvas "
              f"{parts.diffusion.item():.3f}, ar {parts.encoder.item():.3f}) lr {lr_at(step - 1, self.cfg.optim):.2e} "
              f"{self.tokens / (now - self.since):.0f} tok/s", file=sys.stderr, flush=True)
        self.tokens, self.since = 0, now


def _save(model, opt, cfg: TrainConfig, tok_dir: Path, step: int, history: list[dict]) -> None:
    gen = GenerationConfig(max_new_tokens=4 * cfg.model.canvas_length, max_denoising_steps=16,
                           eos_token_ids=model.config.eos_token_ids, pad_token_id=model.config.pad_token_id)
    save_checkpoint(Path(cfg.out), step, model, opt, {"config": asdict(cfg), "history": history}, tok_dir, gen,
                    keep=cfg.keep_checkpoints)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
