"""One denoising step of the engine, as a function of tensors: the forward, the fused sampler, acceptance,
renoise, the stopping test, and the new state written in place.

The state is typed: `RowSettings` (per row, written when a canvas starts: the request's sampler settings and
its random-stream coordinates) and `StepState` (per row, written by every step). Both are dataclasses of
(max_batch, ...) tensors; `rows(b)` gives views of the first b rows, which is what a step reads and writes.
The same body runs three ways (`engine.graphs`): eagerly with the exact context (`denoise_step` with
`exact_inputs`), compiled with the context width as a dynamic size, and recorded in CUDA graphs over every
context slot (`masked_step`, no host value inside). tests/test_engine.py checks the three against each other
and the step's pieces against the reference sampler.

Shapes: B rows, C canvas_length, V vocab, H hidden, W the stability window (MAX_STABILITY).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dgemma.config.generation import MAX_END_IDS
from dgemma.engine import rng
from dgemma.engine.forward import ForwardInputs, denoise, masked_inputs
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.engine.sampler import accept_by_rank, fused_sample
from dgemma.engine.weights import ModelWeights
from dgemma.model.modeling import DiffusionGemma
from dgemma.sampler.entropy_bound import LogitsProcessor, accept_mask, answer_positions, temperature

STREAM_INIT, STREAM_SAMPLE, STREAM_NOISE = 0, 1, 2
MAX_STABILITY = 8


class RowTensors:
    """A dataclass whose fields are tensors with one row per request slot."""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def rows(self, b: int):
        """Views of the first b rows (the tensors themselves are never reallocated)."""
        return type(self)(**{k: v[:b] for k, v in self.tensors().items()})

    def row(self, i: int):
        return type(self)(**{k: v[i:i + 1] for k, v in self.tensors().items()})

    def clone(self):
        return type(self)(**{k: v.clone() for k, v in self.tensors().items()})

    def copy_(self, other) -> None:
        for k, v in self.tensors().items():
            v.copy_(getattr(other, k))

    def move_row(self, src: int, dst: int) -> None:
        for t in self.tensors().values():
            t[dst] = t[src]


@dataclass
class RowSettings(RowTensors):
    seed: torch.Tensor  # (B,) long: the request's seed
    canvas_index: torch.Tensor  # (B,) long: which canvas of the request
    n_steps: torch.Tensor  # (B,) int32: max_denoising_steps
    t_min: torch.Tensor  # (B,) fp32
    t_max: torch.Tensor  # (B,) fp32
    stability: torch.Tensor  # (B,) long: stability_threshold
    confidence: torch.Tensor  # (B,) fp32: confidence_threshold
    entropy_bound: torch.Tensor  # (B,) fp32
    stop_at_end: torch.Tensor  # (B,) bool: the stopping test looks at the answer through its end token only
    end_ids: torch.Tensor  # (B, MAX_END_IDS) long: the request's end ids, -1 padded

    @classmethod
    def zeros(cls, b: int, device: torch.device) -> RowSettings:
        long, f32 = dict(dtype=torch.long, device=device), dict(dtype=torch.float32, device=device)
        return cls(seed=torch.zeros(b, **long), canvas_index=torch.zeros(b, **long),
                   n_steps=torch.zeros(b, dtype=torch.int32, device=device), t_min=torch.zeros(b, **f32),
                   t_max=torch.zeros(b, **f32), stability=torch.zeros(b, **long), confidence=torch.zeros(b, **f32),
                   entropy_bound=torch.zeros(b, **f32), stop_at_end=torch.zeros(b, dtype=torch.bool, device=device),
                   end_ids=torch.full((b, MAX_END_IDS), -1, **long))


@dataclass
class StepState(RowTensors):
    canvas: torch.Tensor  # (B, C) long: the tokens the next step denoises
    argmax_canvas: torch.Tensor  # (B, C) long: the last step's argmax (committed when the canvas ends)
    argmax_logprob: torch.Tensor  # (B, C) fp32: its log-probability under that step's processed distribution
    soft: torch.Tensor  # (B, C, H) model dtype: self-conditioning input, softmax(processed) @ E * embed_scale
    history: torch.Tensor  # (B, W, C) long: the last W argmax canvases (-1 before a canvas's first step)
    stopped: torch.Tensor  # (B,) bool: stopped early (stable and confident), not yet committed
    steps_taken: torch.Tensor  # (B,) long: steps this canvas before it stopped
    steps_left: torch.Tensor  # (B,) long: steps remaining in this canvas's budget

    @classmethod
    def zeros(cls, b: int, c: int, h: int, dtype: torch.dtype, device: torch.device) -> StepState:
        long = dict(dtype=torch.long, device=device)
        return cls(canvas=torch.zeros(b, c, **long), argmax_canvas=torch.zeros(b, c, **long),
                   argmax_logprob=torch.zeros(b, c, dtype=torch.float32, device=device),
                   soft=torch.zeros(b, c, h, dtype=dtype, device=device),
                   history=torch.full((b, MAX_STABILITY, c), -1, **long),
                   stopped=torch.zeros(b, dtype=torch.bool, device=device), steps_taken=torch.zeros(b, **long),
                   steps_left=torch.zeros(b, **long))


def update_state(model: DiffusionGemma, w: ModelWeights, hidden: torch.Tensor, state: StepState,
                 settings: RowSettings, chunk: int, processor: LogitsProcessor | None = None) -> StepState:
    """Everything after the forward for rows 0..B-1, on the device: fused sampler, acceptance, renoise, the
    stopping test; returns the rows' new state. Rows that already stopped (between host syncs) keep theirs, as
    the reference freezes them."""
    c = hidden.shape[1]
    steps_left = state.steps_left
    temp = temperature(steps_left.to(torch.int32), settings.n_steps, settings.t_min, settings.t_max)
    cfg = model.config
    u, noise = rng.uniform_and_randint(settings.seed, settings.canvas_index, steps_left, c, STREAM_SAMPLE,
                                       STREAM_NOISE, cfg.vocab_size)
    out = fused_sample(hidden, w.head, w.soft, w.embed_scale, cfg.final_logit_softcapping, temp, u, chunk, processor)
    accept = accept_by_rank if torch.compiler.is_compiling() else accept_mask
    accepted = accept(out.entropy, settings.entropy_bound[:, None])
    canvas = torch.where(accepted, out.sampled, noise)
    # each row compares its argmax with its last k argmax canvases (k = its stability_threshold); with stop_at_end,
    # over its answer through the first end token only
    history = state.history
    width = history.shape[1]
    ignored = torch.arange(width, device=hidden.device)[None] < (width - settings.stability)[:, None]
    answer = answer_positions(out.argmax_canvas, settings.end_ids) | ~settings.stop_at_end[:, None]
    stable = (((history == out.argmax_canvas[:, None]) | ~answer[:, None]).all(-1) | ignored).all(-1)
    mean = torch.where(settings.stop_at_end, (out.entropy * answer).sum(-1) / answer.sum(-1), out.entropy.mean(-1))
    stop = stable & (mean < settings.confidence)
    live = ~state.stopped
    return StepState(
        canvas=torch.where(live[:, None], canvas, state.canvas),
        argmax_canvas=torch.where(live[:, None], out.argmax_canvas, state.argmax_canvas),
        argmax_logprob=torch.where(live[:, None], out.argmax_logprob, state.argmax_logprob),
        soft=torch.where(live[:, None, None], out.soft_embeds, state.soft),
        history=torch.where(live[:, None, None], torch.cat([history[:, 1:], out.argmax_canvas[:, None]], 1), history),
        stopped=state.stopped | stop,
        steps_taken=state.steps_taken + live,
        steps_left=steps_left - 1,
    )


def denoise_step(model: DiffusionGemma, w: ModelWeights, cache: StaticKVCache, state: StepState,
                 settings: RowSettings, inputs: ForwardInputs, chunk: int,
                 processor: LogitsProcessor | None = None) -> None:
    """One whole step of rows 0..B-1 (the views `state`, `settings`), the new state written into `state` (compiled,
    the copies fuse into the kernels that produce the values). `state` is written only once everything is
    computed, so a step that raises leaves it as it was (on the eager path)."""
    hidden = denoise(model, w, cache, state.canvas, state.soft, inputs)
    state.copy_(update_state(model, w, hidden, state, settings, chunk, processor))


def masked_step(model: DiffusionGemma, w: ModelWeights, cache: StaticKVCache, state: StepState,
                settings: RowSettings, lengths: torch.Tensor, slots: torch.Tensor, chunk: int) -> None:
    """`denoise_step` with no host value inside: context lengths (B,) on the device and `slots` =
    arange(C + context slots) (a dynamic size when compiled, every slot in a CUDA graph); masks always applied."""
    denoise_step(model, w, cache, state, settings, masked_inputs(cache, lengths, slots), chunk)
