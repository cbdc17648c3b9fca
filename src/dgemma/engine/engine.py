"""The fast generation engine: continuous batching over a static KV cache with the fused sampler.

Each request owns a row of the cache, its own canvas, step count, random stream (seed) and settings.
One engine `step()`:
  1. admits waiting requests into free rows and prefills their prompts;
  2. runs ONE denoising step for every active row together (rows may be at different steps of
     different canvases);
  3. for rows whose canvas is done (stable and confident, or out of steps) commits the argmax canvas,
     emits its tokens, and either finishes the request (EOS or max_new_tokens reached) or encodes the
     canvas into the cache and starts a new one.
Finished rows leave and new ones join between steps. The algorithm per row is the reference sampler's
(dgemma.sampler.reference); the random draws come from dgemma.engine.rng, so a request's tokens do not
depend on what else is in the batch (tests/test_engine.py).

Shapes: B active rows, C canvas_length, V vocab, H hidden.
"""

from __future__ import annotations

import itertools
import logging
import time
import types
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dgemma.config import ConfigError, GenerationConfig, check_request, check_seed
from dgemma.engine import rng
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.engine.runner import (
    FastWeights,
    allow_mkl_in_graphs,
    denoise_masked,
    denoise_rows,
    denoise_rows_static,
    encode_canvas,
    encode_row,
    fast_weights,
)
from dgemma.engine.sampler import accept_by_rank, fused_sample
from dgemma.model.modeling import DiffusionGemma
from dgemma.sampler.entropy_bound import accept_mask
from dgemma.sampler.reference import trim_generated

log = logging.getLogger(__name__)

STREAM_INIT, STREAM_SAMPLE, STREAM_NOISE = 0, 1, 2
MAX_STABILITY = 8


@dataclass
class EngineConfig:
    max_batch: int = 8
    max_context: int = 4096
    sampler_chunk: int = 1024  # positions per fused-sampler chunk (memory: chunk x V fp32)
    # torch.compile the whole step (forward, sampler, state update) and the commit pass: 1-1.5 minutes of
    # compiling on first use on CPU (seconds with a warm inductor cache; `Engine.warm_up` does it up front);
    # one step graph for batch 1 and one for larger batches, each serving every context length
    compile: bool = False
    # replay the whole step (forward over every context slot, sampler, state update) as a CUDA graph per
    # batch bucket (CUDA only; `compile` takes precedence)
    cuda_graphs: bool = False
    # host syncs: rows that stop are frozen on the device and committed at the next sync, every
    # `sync_every` steps (and at a canvas's last step); 0 = auto: 1 on CPU (a sync is free), 4 on GPUs
    sync_every: int = 0

    def __post_init__(self) -> None:
        for name, low in (("max_batch", 1), ("max_context", 1), ("sampler_chunk", 1), ("sync_every", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class Request:
    prompt: list[int]
    gen: GenerationConfig
    seed: int = 0
    # called from the engine's thread: on_tokens(request, new ids) after each committed canvas (the last
    # call has request.done set), on_draft(request, argmax canvas) after each denoising step
    on_tokens: Callable[[Request, list[int]], None] | None = None
    on_draft: Callable[[Request, list[int]], None] | None = None
    # the prompt continues the context already in the cache (a single-row engine owned by a chat session)
    extend_context: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    # results
    output: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None  # with finish_reason "error": what failed (this request only)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Row:
    request: Request
    canvas_index: int = 0
    steps_left: int = 0
    steps_taken: int = 0


class Engine:
    def __init__(self, model: DiffusionGemma, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        mc = model.config
        self.canvas_length = mc.canvas_length
        self.vocab = mc.vocab_size
        self.cache = StaticKVCache(mc, self.config.max_batch, self.config.max_context, model.device, model.dtype)
        b, c, h = self.config.max_batch, mc.canvas_length, mc.hidden_size
        dev = self.device = model.device  # the engine's tensors stay on this device

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        # every per-row tensor the step reads or writes, on the device; rows move together on release
        self.state: dict[str, torch.Tensor] = {
            "canvas": zeros(b, c), "argmax": zeros(b, c), "soft": zeros(b, c, h, dtype=model.dtype),
            "history": torch.full((b, MAX_STABILITY, c), -1, dtype=torch.long, device=dev),
            "frozen": zeros(b, dtype=torch.bool),  # stopped, not yet committed
            "steps_taken": zeros(b), "steps_left": zeros(b), "seed": zeros(b), "canvas_index": zeros(b),
            "n_steps": zeros(b, dtype=torch.int32), "t_min": zeros(b, dtype=torch.float32),
            "t_max": zeros(b, dtype=torch.float32), "stability": zeros(b),
            "confidence": zeros(b, dtype=torch.float32), "entropy_bound": zeros(b, dtype=torch.float32),
        }
        self.embed_scale = model.stack.embed_scale.to(model.dtype).item()  # as `TextStack.embed` applies it
        self._since_sync = 0
        self.sync_every = self.config.sync_every or (1 if dev.type == "cpu" else 4)
        self.rows: list[_Row] = []
        self.waiting: deque[Request] = deque()
        self.nfe = 0  # denoiser calls (batched)
        self._fw = fast_weights(model)  # packed once, up front; re-checked when requests are admitted
        self._views: dict[int, dict[str, torch.Tensor]] = {}
        self._context_key: tuple[int, ...] | None = None  # `_context_inputs` cache
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None
        self._compiled = self._compiled_commit = None  # the compiled step and commit pass (`compile`)
        if self.config.compile:
            self._compile_both()
        self._graphs = None
        if self.config.cuda_graphs:
            if dev.type != "cuda":
                raise ConfigError("cuda_graphs needs a CUDA device")
            self._graphs = StepGraphs(self)

    # -- public ---------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        self._validate(request)
        self.waiting.append(request)
        return request

    def generate(self, prompts: list[list[int]], gen: GenerationConfig, seeds: list[int] | None = None
                 ) -> list[Request]:
        """Run these prompts to completion (batched) and return the finished requests in order."""
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        requests = [self.submit(Request(prompt=list(p), gen=gen, seed=s)) for p, s in zip(prompts, seeds, strict=True)]
        while self.has_work():
            self.step()
        return requests

    def warm_up(self) -> None:
        """Run throwaway requests at batch 1 and (if `max_batch` allows) batch 2, two canvases of two steps
        each, so that a compiled engine has built its graphs (the step at both batch sizes, the commit
        pass) and the weights are packed before real requests arrive.
        Leaves the engine idle; later requests are unaffected (each row's cache is reset on admission)."""
        if self.has_work():
            raise RuntimeError("warm_up needs an idle engine")
        # two canvases: the second needs a commit pass (a graph of its own when compiled)
        gen = GenerationConfig(max_new_tokens=self.canvas_length + 1, max_denoising_steps=2, eos_token_ids=())
        for batch in (1, 2) if self.config.max_batch > 1 else (1,):
            self.generate([[0]] * batch, gen)
        self.nfe = 0

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self.rows:
            return
        st = self._state_views(len(self.rows))
        saved = None if self._compiled is None and self._graphs is None else {k: v.clone() for k, v in st.items()}
        try:
            self._step_rows(self.rows, self.cache, st)
        except Exception:  # noqa: BLE001 - isolate the rows at fault, the others go on
            log.exception("engine step failed for a batch of %d rows; retrying each row alone", len(self.rows))
            self._step_rows_alone(st, saved)
            if not self.rows:
                return
            st = self._state_views(len(self.rows))
        self.nfe += 1
        self._since_sync += 1
        for r in self.rows:
            r.steps_left -= 1
        drafts = any(r.request.on_draft is not None for r in self.rows)
        # rows whose confidence threshold is 0 never stop early (a rounding-level stop would still be
        # committed, frozen, at the canvas's last step): no sync needed for them until then
        early = self._since_sync >= self.sync_every and any(r.request.gen.confidence_threshold > 0 for r in self.rows)
        if not (drafts or early or any(r.steps_left == 0 for r in self.rows)):
            return
        # sync: one per `sync_every` steps (and at a canvas's last step) decides which rows commit
        self._since_sync = 0
        frozen, taken = st["frozen"].tolist(), st["steps_taken"].tolist()
        failed = []
        for row, r in enumerate(self.rows):
            r.steps_taken = taken[row]
            if r.request.on_draft is not None:
                try:
                    r.request.on_draft(r.request, st["argmax"][row].tolist())
                except Exception as exc:  # noqa: BLE001 - a caller's callback fails its own request only
                    self._fail(r.request, f"on_draft callback failed: {exc!r}")
                    failed.append(row)
        self._release(failed)
        self._commit([i for i, r in enumerate(self.rows) if frozen[i] or r.steps_left == 0])

    def _state_views(self, b: int) -> dict[str, torch.Tensor]:
        """Views of the first b rows of every state tensor (the tensors are never reallocated)."""
        st = self._views.get(b)
        if st is None:
            st = self._views[b] = {k: v[:b] for k, v in self.state.items()}
        return st

    def _step_rows(self, rows: list[_Row], cache: StaticKVCache, st: dict[str, torch.Tensor]) -> None:
        """One denoising step for `rows` (the first len(rows) rows of `cache` and `st`): forward, sampler,
        state update, written into `st`. The eager path writes `st` only after everything is computed."""
        b = len(rows)
        fw = self._fw
        if self._compiled is not None and cache is self.cache:
            lengths_t, slots = self._context_inputs(b)
            self._compiled(self.model, fw, cache, st, lengths_t, slots, self.embed_scale,
                           self.config.sampler_chunk)  # writes the new state into `st`
        elif self._graphs is not None and cache is self.cache:
            self._graphs(b)  # writes the new state of rows 0..b-1 (and of the bucket's padding rows)
        else:
            hidden = denoise_rows(self.model, cache, st["canvas"], st["soft"], fw=fw)
            _advance_in_place(self.model, fw, hidden, st, self.embed_scale, self.config.sampler_chunk)

    def _step_rows_alone(self, st: dict[str, torch.Tensor], saved: dict[str, torch.Tensor] | None) -> None:
        """After a batched step raised: restore the rows' state (in-place paths may have written part of it),
        then step each row alone on views of its own cache row and state (the eager twin of every path). A
        row whose step still raises fails with the error; every other row has advanced exactly as it would
        alone (batch invariance: its tokens depend on its own seed and context only)."""
        if saved is not None:
            for k, v in saved.items():
                st[k].copy_(v)
        failed = []
        for i, r in enumerate(self.rows):
            try:
                self._step_rows([r], self.cache.row_view(i), {k: v[i:i + 1] for k, v in st.items()})
            except Exception as exc:  # noqa: BLE001
                log.exception("engine step failed for request %s", r.request.id)
                self._fail(r.request, f"generation failed: {exc!r}")
                failed.append(i)
        self._release(failed)

    def _fail(self, req: Request, message: str) -> None:
        """End one request with finish_reason "error" and tell its caller (the row is released by the caller)."""
        req.finish_reason, req.error = "error", message
        req.finished_at = time.perf_counter()
        if req.on_tokens is not None:
            try:
                req.on_tokens(req, [])
            except Exception:  # noqa: BLE001 - nothing more can be told to this caller
                log.exception("on_tokens callback failed while reporting an error")

    # -- internals ------------------------------------------------------------------------------------
    def _context_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The compiled step's context inputs for the first b rows, made again only when the rows' context
        lengths changed (a commit or an admission): their lengths (b,) and arange(C + longest context),
        through whose (dynamic) size the context length reaches the graph (one graph for all lengths)."""
        lengths = tuple(self.cache.lengths[:b])
        if self._context_key != lengths:
            st = self._views[b]
            lengths_t = torch.tensor(lengths, device=self.device)
            slots = torch.arange(self.canvas_length + max(lengths), device=self.device)
            torch._dynamo.maybe_mark_dynamic(slots, 0)
            if b > 1:  # one graph for every batch of 2 or more rows (batch 1 keeps its own, specialised one)
                for t in (*st.values(), lengths_t):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            self._context_key, self._context = lengths, (lengths_t, slots)
        return self._context

    def _validate(self, request: Request) -> None:
        """Everything about a request that could fail later, checked before it is queued (ConfigError)."""
        if not isinstance(request.gen, GenerationConfig):
            raise ConfigError(f"request.gen must be a GenerationConfig, got {type(request.gen).__name__}")
        request.gen.validate()  # fields may have been changed since construction
        check_seed(request.seed)
        context = 0
        if request.extend_context:
            if self.config.max_batch != 1:
                raise ConfigError("extend_context needs an engine with max_batch=1 (one conversation)")
            context = self.cache.lengths[0]
        check_request(self.model.config, request.gen, request.prompt, context, self.config.max_context)
        if request.gen.stability_threshold > MAX_STABILITY:
            raise ConfigError(f"stability_threshold above {MAX_STABILITY} is not supported by the engine")

    def _compile(self, fn: Callable) -> Callable:
        """`fn` compiled for this engine alone: the whole step (forward, sampler, state update,
        `_step_in_place`) or the commit pass (`encode_canvas`).

        Guards (checked before every call, ~0.1 ms for ~1,000 of them) skip the model's modules: this
        engine's model keeps its structure, and a model whose parameters were replaced is re-packed and
        recompiled (`_admit`). So that no other engine (another model) can reuse these graphs, each engine
        compiles its own copy of the function's code object (torch.compile caches graphs per code object)."""
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_ENGINE_IDS)}")
        options: dict = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.device.type == "cpu":
            allow_mkl_in_graphs()
            options["cpp_wrapper"] = True  # a C++ wrapper calls the kernels (Python's costs ~0.4 ms per step)
        # no size/stride re-check of every input and library-call result on each call (~0.3 us each, ~140
        # inputs): the guards check the state tensors' shapes, and the weights' only change by a re-pack,
        # which recompiles
        options["size_asserts"] = False
        return torch.compile(types.FunctionType(code, fn.__globals__), options=options)

    def _compile_both(self) -> None:
        self._compiled, self._compiled_commit = self._compile(_step_in_place), self._compile(encode_canvas)

    def _admit(self) -> None:
        if self.waiting:  # re-packs if the model's parameters were replaced (e.g. `model.to(...)`)
            fw = fast_weights(self.model)
            if fw is not self._fw:  # graphs built for the old weights are rebuilt
                self._fw = fw
                if self._compiled is not None:
                    self._compile_both()
                if self._graphs is not None:
                    self._graphs = StepGraphs(self, self._graphs.capture)
        while self.waiting and len(self.rows) < self.config.max_batch:
            request = self.waiting.popleft()
            if request.cancelled:
                continue
            row = len(self.rows)
            if not request.extend_context:
                self.cache.reset_row(row)
            self.rows.append(_Row(request))
            try:
                encode_row(self.model, self.cache, row, torch.tensor([request.prompt], device=self.device), fw=self._fw)
                self._start_canvas(row)
            except Exception as exc:  # noqa: BLE001 - a request that fails its prefill fails alone
                log.exception("prefill failed for request %s", request.id)
                self._fail(request, f"prefill failed: {exc!r}")
                self.rows.pop()
                self.cache.reset_row(row)

    def _start_canvas(self, row: int) -> None:
        r = self.rows[row]
        gen = r.request.gen
        r.steps_left, r.steps_taken = gen.max_denoising_steps, 0
        st, dev = self.state, self.device
        st["canvas"][row] = rng.randint(torch.tensor([r.request.seed], device=dev),
                                        torch.tensor([r.canvas_index], device=dev),
                                        torch.tensor([0], device=dev), self.canvas_length, STREAM_INIT, self.vocab)[0]
        st["soft"][row].zero_()
        st["history"][row].fill_(-1)  # as the reference: no argmax equals -1 on the first step
        for key, value in (("frozen", False), ("steps_taken", 0), ("steps_left", gen.max_denoising_steps),
                           ("seed", r.request.seed), ("canvas_index", r.canvas_index),
                           ("n_steps", gen.max_denoising_steps), ("t_min", gen.t_min), ("t_max", gen.t_max),
                           ("stability", gen.stability_threshold), ("confidence", gen.confidence_threshold),
                           ("entropy_bound", gen.entropy_bound)):
            st[key][row] = value

    def _commit(self, done_rows: list[int]) -> None:
        finished = []
        for row in done_rows:
            try:
                if self._commit_row(row):
                    finished.append(row)
            except Exception as exc:  # noqa: BLE001 - a failing commit (or callback) ends its own request only
                log.exception("commit failed for request %s", self.rows[row].request.id)
                self._fail(self.rows[row].request, f"commit failed: {exc!r}")
                finished.append(row)
        self._release(finished)

    def _commit_row(self, row: int) -> bool:
        """Emit row `row`'s finished canvas; then end its request (True) or start its next canvas."""
        r = self.rows[row]
        req = r.request
        req.steps.append(r.steps_taken)
        remaining = req.gen.max_new_tokens - len(req.output)
        emitted, reason = trim_generated(self.state["argmax"][row].tolist(), remaining, req.gen.eos_token_ids)
        if reason == "length" and len(emitted) < remaining:
            reason = None  # neither an end token nor the last token asked for: the next canvas follows
        req.output.extend(emitted)
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if reason is not None:
            req.finish_reason = reason
            req.finished_at = time.perf_counter()
        if req.on_tokens is not None and (emitted or reason is not None):
            req.on_tokens(req, emitted)  # the last call comes with req.done set
        if reason is not None:
            return True
        self._encode_canvas(row, self.state["argmax"][row:row + 1].clone())
        r.canvas_index += 1
        self._start_canvas(row)
        return False

    def _encode_canvas(self, row: int, ids: torch.Tensor) -> None:
        """Commit pass for a finished canvas: `encode_row`, or compiled, `encode_canvas` (one graph for
        every row and context length)."""
        if self._compiled_commit is None:
            encode_row(self.model, self.cache, row, ids, fw=self._fw)
            return
        n, c = self.cache.lengths[row], self.canvas_length
        self.cache.check_room(row, c)
        slots = torch.arange(c + n, device=self.device)
        torch._dynamo.maybe_mark_dynamic(slots, 0)
        cache = self.cache
        self._compiled_commit(self.model, self._fw, [k[row:row + 1] for k in cache.keys],
                              [v[row:row + 1] for v in cache.values], cache.ring_pos[row:row + 1], ids, slots)
        cache.lengths[row] = n + c

    def _release(self, rows: list[int]) -> None:
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:  # keep active rows compact: move the last row into the freed slot
                self.cache.move_row(last, row)
                for t in self.state.values():
                    t[row] = t[last]
                self.rows[row] = self.rows[last]
            self.rows.pop()

    def fail_all(self, message: str = "engine failure") -> None:
        """End every request with an error (the last resort after an error outside any one row's work): the
        engine is emptied first, then each request's caller is told."""
        requests = self.reset()
        for req in requests:
            self._fail(req, message)

    def reset(self) -> list[Request]:
        """Drop every active and waiting request without telling their callers, reset the rows' cache; returns
        the dropped requests. The engine is then idle and as good as new."""
        requests = [r.request for r in self.rows] + list(self.waiting)
        for row in range(len(self.rows)):
            self.cache.reset_row(row)
        self.rows.clear()
        self.waiting.clear()
        return requests

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.request.cancelled]
        for i in gone:
            req = self.rows[i].request
            req.finish_reason = req.finish_reason or "cancelled"
            req.finished_at = time.perf_counter()
        self._release(gone)


_ENGINE_IDS = itertools.count()


def advance(model: DiffusionGemma, head: torch.Tensor, hidden: torch.Tensor, st: dict[str, torch.Tensor],
            embed_scale: float, chunk: int, mkl: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Everything after the forward for rows 0..B-1, on the device, from the state tensors `st` (sliced
    to B rows): fused sampler, acceptance, renoise, the stopping test; returns the rows' new state.
    Rows that already stopped (between host syncs) keep theirs, as the reference freezes them."""
    c = hidden.shape[1]
    steps_left = st["steps_left"]
    # the reference's fp32 schedule: t_min + (t_max - t_min) * (step / N)
    temperature = st["t_min"] + (st["t_max"] - st["t_min"]) * (steps_left.to(torch.int32) / st["n_steps"])
    cfg = model.config
    u, noise = rng.uniform_and_randint(st["seed"], st["canvas_index"], steps_left, c, STREAM_SAMPLE, STREAM_NOISE,
                                       cfg.vocab_size)
    out = fused_sample(hidden, model.stack.embed_tokens.weight, embed_scale, cfg.final_logit_softcapping,
                       temperature, u, chunk, head, mkl)
    accept = accept_by_rank if torch.compiler.is_compiling() else accept_mask
    accepted = accept(out.entropy, st["entropy_bound"][:, None])
    canvas = torch.where(accepted, out.sampled, noise)
    # each row compares its argmax with its last k argmax canvases (k = its stability_threshold)
    history = st["history"]
    width = history.shape[1]
    ignored = torch.arange(width, device=hidden.device)[None] < (width - st["stability"])[:, None]
    stable = ((history == out.argmax[:, None]).all(-1) | ignored).all(-1)
    stop = stable & (out.entropy.mean(-1) < st["confidence"])
    live = ~st["frozen"]
    return {
        "canvas": torch.where(live[:, None], canvas, st["canvas"]),
        "argmax": torch.where(live[:, None], out.argmax, st["argmax"]),
        "history": torch.where(live[:, None, None], torch.cat([history[:, 1:], out.argmax[:, None]], 1), history),
        "soft": torch.where(live[:, None, None], out.soft_embeds, st["soft"]),
        "steps_taken": st["steps_taken"] + live,
        "frozen": st["frozen"] | stop,
        "steps_left": steps_left - 1,
    }


def _advance_in_place(model: DiffusionGemma, fw: FastWeights, hidden: torch.Tensor, st: dict[str, torch.Tensor],
                      embed_scale: float, chunk: int) -> None:
    """`advance`, its new state written into `st` (the eager step and the CUDA graphs' body)."""
    for k, v in advance(model, fw.head, hidden, st, embed_scale, chunk, fw.mkl).items():
        st[k].copy_(v)


def _denoise_and_advance(model: DiffusionGemma, fw: FastWeights, cache: StaticKVCache, st: dict[str, torch.Tensor],
                         lengths: torch.Tensor, slots: torch.Tensor, embed_scale: float, chunk: int
                         ) -> dict[str, torch.Tensor]:
    """One whole step as a function of tensors: the body `torch.compile` captures. `slots` is
    arange(canvas_length + longest context); masks are always applied, so no host value picks a branch."""
    hidden = denoise_masked(model, fw, cache, st["canvas"], st["soft"], lengths, slots)
    return advance(model, fw.head, hidden, st, embed_scale, chunk, fw.mkl)


def _step_in_place(model: DiffusionGemma, fw: FastWeights, cache: StaticKVCache, st: dict[str, torch.Tensor],
                   lengths: torch.Tensor, slots: torch.Tensor, embed_scale: float, chunk: int) -> None:
    """`_denoise_and_advance` writing the new state into `st` (compiled, the copies fuse into the kernels
    that produce the values instead of running as separate calls after the graph)."""
    for k, v in _denoise_and_advance(model, fw, cache, st, lengths, slots, embed_scale, chunk).items():
        st[k].copy_(v)


def _static_step(model: DiffusionGemma, fw: FastWeights, cache: StaticKVCache, st: dict[str, torch.Tensor],
                 lengths: torch.Tensor, embed_scale: float, chunk: int) -> None:
    """One whole step whose shapes depend only on the row count (the forward attends to every context slot,
    masked): the body `StepGraphs` captures. Writes the new state into `st`."""
    hidden = denoise_rows_static(model, cache, st["canvas"], st["soft"], lengths, fw)
    _advance_in_place(model, fw, hidden, st, embed_scale, chunk)


class StepGraphs:
    """The whole engine step as CUDA graphs, one per batch bucket (1, 2, 4, ... max_batch), captured on first
    use and replayed for every context length: `_static_step` over the first `bucket` rows of the engine's
    state and cache, which never move. Rows past the active ones (a bucket's padding) get context 0; their
    state is meaningless and is reset when a request takes the row. Each replay queues the step without a
    host sync. `capture=False` runs the same body eagerly instead: its twin, usable on any device."""

    def __init__(self, engine: Engine, capture: bool = True) -> None:
        self.engine, self.capture = engine, capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lengths = torch.zeros(engine.config.max_batch, dtype=torch.long, device=engine.device)
        self._lengths_key: tuple[int, ...] | None = None
        self._pool = None

    def bucket(self, b: int) -> int:
        size = 1
        while size < b:
            size *= 2
        return min(size, self.engine.config.max_batch)

    def __call__(self, b: int) -> None:
        e = self.engine
        key = tuple(e.cache.lengths[:b])
        if key != self._lengths_key:  # context lengths change only on commits and admissions
            self.lengths.zero_()
            self.lengths[:b] = torch.tensor(key, device=e.device)
            self._lengths_key = key
        size = self.bucket(b)
        if not self.capture:
            self._run(size)
        else:
            if size not in self.graphs:
                self.graphs[size] = self._capture(size)
            self.graphs[size].replay()

    def _run(self, size: int) -> None:
        e = self.engine
        st = {k: v[:size] for k, v in e.state.items()}
        _static_step(e.model, e._fw, e.cache, st, self.lengths[:size], e.embed_scale, e.config.sampler_chunk)

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        state = self.engine.state
        saved = {k: v[:size].clone() for k, v in state.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and the allocator outside the graph
            for _ in range(2):
                self._run(size)
        torch.cuda.current_stream().wait_stream(stream)
        for k, v in saved.items():  # the warm-up steps advanced the state: undo them
            state[k][:size].copy_(v)
        graph = torch.cuda.CUDAGraph()
        # one memory pool for every bucket: a step leaves nothing alive in it (its results are copied into
        # the state) and replays never overlap, so the buckets can share their scratch memory
        with torch.cuda.graph(graph, pool=self._pool):  # recorded, not run
            self._run(size)
        self._pool = self._pool or graph.pool()
        return graph
