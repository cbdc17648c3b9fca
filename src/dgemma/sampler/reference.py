"""The reference sampler: transformers 5.24 `DiffusionGemmaForBlockDiffusion.generate()`, restated.

This is the oracle every faster path is checked against. It issues the same random-number calls in
the same order as transformers (per canvas one `randint` for the initial canvas; per step one
`multinomial` over softmax(processed logits) then one `randint` for the renoise draw, all on the
global generator of the device), so on CPU in fp32 the same seed gives the same tokens
(tests/test_generate.py).

Per canvas: encode (prefill / commit of the previous canvas); draw a random canvas; for step N..1:
denoise -> processed logits = logits / temperature(step) -> sample, argmax, entropy -> accept the
lowest-entropy positions within the entropy bound, renoise the rest -> stop when the argmax is stable
and the mean entropy is below the confidence threshold. The argmax canvas is committed. A canvas
holding an EOS ends its row; tokens after the first EOS become pad.

`generate` returns the transformers-shaped `sequences` (whole canvases) and, per row, the public
answer: exactly `max_new_tokens` tokens at most, cut before the first EOS. An optional `LogitsProcessor`
edits the processed logits before sampling, argmax and entropy (the hook the engine's fused sampler has too;
identity by default, so parity is unchanged). The filters of `gen` (top-k / top-p / min-p, `sampler.filters`) run
after it through the same hook. Each committed token's log-probability is read from the processed distribution of
its canvas's last step (the step whose argmax is committed): `GenerationResult.logprobs`, the engine's definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dgemma.config import ConfigError, GenerationConfig, check_request
from dgemma.model.kv_cache import KVCache
from dgemma.model.modeling import DiffusionGemma
from dgemma.sampler.entropy_bound import (
    LogitsProcessor,
    accept_mask,
    answer_positions,
    apply_processor,
    stable_and_confident,
    temperature,
    token_entropy,
    trim_generated,
)
from dgemma.sampler.filters import chain, filter_processor


@dataclass
class GenerationResult:
    """Output of one generate call. Lists are per batch row."""

    sequences: torch.Tensor  # (B, prompt + canvases * C): prompt, committed canvases, pad after EOS
    token_ids: list[list[int]]  # generated ids, at most max_new_tokens, cut before the first EOS
    finish_reasons: list[str]  # "stop" (an EOS was generated) or "length"
    steps: list[list[int]]  # denoising steps of each canvas
    nfe: list[int]  # denoiser calls that counted for the row (transformers' definition)
    tokens_per_forward: list[float]  # transformers' definition: non-pad new tokens / nfe
    logprobs: list[list[float]]  # per token of token_ids: log p under its canvas's last processed distribution

    @property
    def canvases(self) -> int:
        return len(self.steps[0]) if self.steps else 0


@torch.no_grad()
def denoise_canvas(model: DiffusionGemma, cache: KVCache, gen: GenerationConfig, batch: int,
                   done_rows: torch.Tensor, canvas: torch.Tensor | None = None,
                   self_cond_logits: torch.Tensor | None = None, processor: LogitsProcessor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the denoising loop of one canvas. Returns (argmax_canvas (B, C), nfe per row (B,), the last step's
    processed logits (B, C, V), those of each row's last live step)."""
    vocab, length, device = model.config.vocab_size, model.config.canvas_length, model.device
    drawn = torch.randint(0, vocab, (batch, length), device=device)  # drawn even when a canvas is given
    canvas = drawn if canvas is None else canvas
    argmax_canvas = canvas
    stopped = torch.zeros(batch, dtype=torch.bool, device=device)
    nfe = torch.zeros(batch, dtype=torch.int, device=device)
    history = None
    end_ids = torch.tensor([gen.eos_token_ids] * batch, device=device) if gen.stop_at_end else None
    processor = chain(processor, filter_processor(gen.top_k, gen.top_p, gen.min_p))
    for step in range(gen.max_denoising_steps, 0, -1):
        nfe += ~(stopped | done_rows)
        logits = model.denoise(canvas, cache, self_cond_logits)
        processed = logits / temperature(step, gen.max_denoising_steps, gen.t_min, gen.t_max, device)
        processed = apply_processor(processed, processor)
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)
        sampled = torch.multinomial(probs.view(-1, vocab), num_samples=1).view(batch, length)
        new_argmax = torch.argmax(processed, dim=-1)
        entropy = token_entropy(processed)
        accepted = accept_mask(entropy, gen.entropy_bound)
        noise = torch.randint(0, vocab, (batch, length), device=device)
        new_canvas = torch.where(accepted, sampled, noise)  # nothing stays locked across steps
        if stopped.any():  # sync: reference path; rows that stopped keep their state
            new_argmax = torch.where(stopped[:, None], argmax_canvas, new_argmax)
            new_canvas = torch.where(stopped[:, None], canvas, new_canvas)
            processed = torch.where(stopped[:, None, None], self_cond_logits, processed)
        answer = answer_positions(new_argmax, end_ids) if end_ids is not None else None
        stop, history = stable_and_confident(history, new_argmax, entropy, gen.stability_threshold,
                                             gen.confidence_threshold, answer)
        stopped |= stop
        canvas, argmax_canvas = new_canvas, new_argmax
        self_cond_logits = processed.to(model.dtype)
        if bool(stopped.all()):  # sync: reference path
            break
    return argmax_canvas, nfe, processed


@torch.no_grad()
def generate(model: DiffusionGemma, input_ids: torch.Tensor, gen: GenerationConfig,
             cache: KVCache | None = None, processor: LogitsProcessor | None = None) -> GenerationResult:
    """Generate for a batch of equal-length prompts `input_ids` (B, S).

    With `cache`, `input_ids` are the tokens not yet in it (multi-turn reuse); the cache is extended
    in place by the prompt and every committed canvas except the last one (as in transformers)."""
    if input_ids.ndim != 2:
        raise ConfigError(f"input_ids must be a (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    config = model.config
    cache = cache if cache is not None else model.new_cache()
    for row in input_ids.tolist():  # sync: reference path
        check_request(config, gen, row, cache.length)
    batch, length = input_ids.shape[0], config.canvas_length
    device = model.device
    input_ids = input_ids.to(device)
    prompt_len = input_ids.shape[1]
    eos = torch.tensor(gen.eos_token_ids, device=device, dtype=torch.long) if gen.eos_token_ids else None
    done_rows = torch.zeros(batch, dtype=torch.bool, device=device)
    nfe = torch.zeros(batch, dtype=torch.int, device=device)
    steps: list[list[int]] = [[] for _ in range(batch)]
    logprobs: list[list[float]] = [[] for _ in range(batch)]
    sequences, pending = input_ids, input_ids
    for _ in range(math.ceil(gen.max_new_tokens / length)):
        model.encode(pending, cache)
        argmax_canvas, canvas_nfe, processed = denoise_canvas(model, cache, gen, batch, done_rows,
                                                              processor=processor)
        nfe += canvas_nfe
        chosen = torch.log_softmax(processed.float(), dim=-1).gather(-1, argmax_canvas[..., None]).squeeze(-1)
        for row, (n, lp) in enumerate(zip(canvas_nfe.tolist(), chosen.tolist(), strict=True)):
            steps[row].append(n)
            logprobs[row].extend(lp)
        sequences = torch.cat([sequences, argmax_canvas], dim=-1)
        done_rows = _finalize_canvas(sequences, done_rows, eos, gen.pad_token_id, length)
        if bool(done_rows.all()):
            break
        pending = sequences[:, -length:]
    new_tokens = sequences[:, prompt_len:]
    valid = (new_tokens != gen.pad_token_id).sum(-1) if gen.pad_token_id is not None else \
        torch.full((batch,), new_tokens.shape[1], device=device)
    tokens_per_forward = (valid / nfe).tolist()
    token_ids, reasons = [], []
    for row, lps in zip(new_tokens.tolist(), logprobs, strict=True):
        ids, reason = trim_generated(row, gen.max_new_tokens, gen.eos_token_ids)
        token_ids.append(ids)
        reasons.append(reason)
        del lps[len(ids):]
    return GenerationResult(sequences=sequences, token_ids=token_ids, finish_reasons=reasons, steps=steps,
                            nfe=nfe.tolist(), tokens_per_forward=tokens_per_forward, logprobs=logprobs)


def _finalize_canvas(sequences: torch.Tensor, done_rows: torch.Tensor, eos: torch.Tensor | None,
                     pad_id: int | None, length: int) -> torch.Tensor:
    """EOS handling after a commit, in place on `sequences`: rows done earlier get a pad
    canvas, rows ending now get pad after their first EOS. Returns the new done mask."""
    new = sequences[:, -length:]
    done_now = torch.isin(new, eos).any(-1) if eos is not None else torch.zeros_like(done_rows)
    done = done_rows | done_now
    if pad_id is not None and bool(done.any()):
        new[done_rows] = pad_id
        if eos is not None and bool(done_now.any()):
            is_eos = torch.isin(new, eos)
            count = is_eos.cumsum(dim=-1)
            new[(count > 0) & ~((count == 1) & is_eos)] = pad_id
    return done
