"""The fast generation engine: continuous batching over a static KV cache with the fused sampler.

Each request owns a row of the cache, its own canvas, step count, random stream (seed) and settings. One
engine `step()`:
  1. admits waiting requests into free rows and prefills their prompts;
  2. runs ONE denoising step for every active row together (rows may be at different steps of different
     canvases), through the engine's runner (eager, compiled or CUDA graphs: `engine.graphs`);
  3. for rows whose canvas is done (stable and confident, or out of steps) commits the argmax canvas, emits its
     tokens, and either finishes the request (EOS or max_new_tokens reached) or encodes the canvas into the
     cache and starts a new one.
Finished rows leave and new ones join between steps. Per-request options that edit the processed logits (a
constraint, top-k / top-p / min-p, a locked prefix, top log-probabilities) run through `engine.processors` in the
eager step body; requests without them take the engine's runner unchanged. Requests that share a prompt (`n > 1`:
`choices`) prefill it once: the first one's cache row is copied into the others'. The algorithm per row is the
reference sampler's (dgemma.sampler.reference); the random draws come from dgemma.engine.rng, so a request's tokens
do not depend on what else is in the batch. One request's failure (its prefill, its step, its commit, its
callbacks) fails that request alone (finish_reason "error"); the others go on unchanged. tests/test_engine.py checks
all of this; tests/test_openai_sampling.py and tests/test_openai_prefix.py the per-request options.

Shapes: B active rows, C canvas_length.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dgemma.config import ConfigError, EngineConfig, GenerationConfig, check_request, check_seed
from dgemma.engine import rng
from dgemma.engine.forward import encode_row, exact_inputs
from dgemma.engine.graphs import CompiledRunner, EagerRunner, GraphRunner
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.engine.processors import LogprobRecord, RowWork, StepProcessor
from dgemma.engine.step import MAX_STABILITY, STREAM_INIT, RowSettings, StepState, denoise_step
from dgemma.engine.weights import pack_weights
from dgemma.model.modeling import DiffusionGemma
from dgemma.sampler.entropy_bound import LogitsProcessor, trim_generated
from dgemma.sampler.prefix import PrefixRule, PrefixStats, PrefixTracker

if TYPE_CHECKING:
    from dgemma.constrain.canvas import CanvasConstraint

log = logging.getLogger(__name__)
MAX_TOP_LOGPROBS = 20  # top log-probabilities per token at most
PREFIX_MODES = ("lock", "measure")
_MASK64 = (1 << 64) - 1
_REQUEST_IDS = itertools.count()


@dataclass
class GenerationRequest:
    prompt: list[int]
    gen: GenerationConfig
    seed: int = 0
    # called from the engine's thread: on_tokens(request, new ids) after each committed canvas (the last
    # call has request.done set), on_draft(request, argmax canvas) after each denoising step
    on_tokens: Callable[[GenerationRequest, list[int]], None] | None = None
    on_draft: Callable[[GenerationRequest, list[int]], None] | None = None
    # on_step(request, argmax canvas, its log-probabilities) after each denoising step of the request's canvas
    # (what bench/prefix_replay.py records; a host sync every step, as on_draft)
    on_step: Callable[[GenerationRequest, list[int], list[float]], None] | None = None
    # the prompt continues the context already in the cache (a single-row engine owned by a chat session)
    extend_context: bool = False
    # structured output: masks or exact marginals applied at every step, the committed canvases valid
    # (`dgemma.constrain.canvas.CanvasConstraint`, built for the model's tokenizer by the caller)
    constraint: CanvasConstraint | None = None
    # log-probabilities of the returned tokens: None off, 0 the chosen token's, k also the k most probable tokens
    # (at most MAX_TOP_LOGPROBS), from the processed distribution of the canvas's last step (docs/design.md)
    logprobs: int | None = None
    # the settled prefix of each canvas (`sampler.prefix`): "lock" streams it through on_tokens as it settles and
    # locks it (an end id in it ends the request at once); "measure" only follows it (`prefix_stats`)
    prefix: str | None = None
    prefix_rule: PrefixRule = field(default_factory=PrefixRule)
    # a request with the same prompt (n > 1, `choices`): while it has committed nothing, its prefilled cache row is
    # copied instead of prefilling again
    prefill_from: GenerationRequest | None = None
    id: int = field(default_factory=_REQUEST_IDS.__next__)
    # results
    output: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)  # with logprobs: one per token of `output`
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # with logprobs > 0: (id, logprob)
    prefix_stats: PrefixStats | None = None  # with prefix "measure"
    steps: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None  # with finish_reason "error": what failed (this request only)
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None  # when it took a row (its queue wait ends)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def choices(self, n: int) -> list[GenerationRequest]:
        """n independent requests for this one's prompt (OpenAI's `n`): choice 0 is this request, choice i a copy
        with seed `derive_seed(seed, i)` whose prompt prefill is shared (`prefill_from`). Callbacks are shared;
        replace them per choice to tell the choices apart."""
        fresh = lambda: dict(output=[], steps=[], token_logprobs=[], top_logprobs=[], prefix_stats=None,
                             finish_reason=None, error=None, cancelled=False, first_token_at=None, finished_at=None,
                             admitted_at=None)  # new lists for each copy
        copies = [dataclasses.replace(self, seed=derive_seed(self.seed, i), prefill_from=self, id=next(_REQUEST_IDS),
                                      submitted_at=time.perf_counter(), **fresh())
                  for i in range(1, n)]
        return [self, *copies]



def derive_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded `seed`: `seed` itself for choice 0, else a SplitMix64 mix of
    (seed, index) in the signed 64-bit range, so choices draw independent random streams."""
    if index == 0:
        return seed
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


@dataclass
class _Row:
    request: GenerationRequest
    canvas_index: int = 0
    steps_left: int = 0
    steps_taken: int = 0
    prev_argmax: list[int] | None = None  # the last step's argmax canvas (constrained rows: their next masks)
    tracker: PrefixTracker | None = None  # the canvas's settled prefix (prefix "lock" or "measure")
    emitted: int = 0  # tokens of this canvas already returned (locked prefix)
    record: LogprobRecord = field(default_factory=LogprobRecord)


class Engine:
    def __init__(self, model: DiffusionGemma, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        mc = model.config
        self.canvas_length, self.vocab = mc.canvas_length, mc.vocab_size
        self.device = model.device  # the engine's tensors stay on this device
        b = self.config.max_batch
        self.cache = StaticKVCache(mc, b, self.config.max_context, model.device, model.dtype)
        self.state = StepState.zeros(b, mc.canvas_length, mc.hidden_size, model.dtype, self.device)
        self.settings = RowSettings.zeros(b, self.device)
        self._views: dict[int, tuple[StepState, RowSettings]] = {}
        self._since_sync = 0
        self.sync_every = self.config.sync_every or (1 if self.device.type == "cpu" else 4)
        self.rows: list[_Row] = []
        self.waiting: deque[GenerationRequest] = deque()
        self.nfe = 0  # denoiser calls (batched)
        self.weights = pack_weights(model)  # once, up front; re-checked when requests are admitted
        if self.config.cuda_graphs and not self.config.compile and self.device.type != "cuda":
            raise ConfigError("cuda_graphs needs a CUDA device")
        runner = CompiledRunner if self.config.compile else GraphRunner if self.config.cuda_graphs else EagerRunner
        self.runner: EagerRunner = runner(self)
        self._eager = self.runner if type(self.runner) is EagerRunner else EagerRunner(self)
        self._mask_pool: ThreadPoolExecutor | None = None  # computes constrained rows' masks beside the forward
        self.constraint_wait_seconds = 0.0  # time steps waited for masks (what the forward did not hide)

    # -- public ---------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> GenerationRequest:
        self.validate(request)
        self.waiting.append(request)
        return request

    def generate(self, prompts: list[list[int]], gen: GenerationConfig, seeds: list[int] | None = None
                 ) -> list[GenerationRequest]:
        """Run these prompts to completion (batched) and return the finished requests in order."""
        seeds = seeds if seeds is not None else list(range(len(prompts)))
        requests = [self.submit(GenerationRequest(prompt=list(p), gen=gen, seed=s))
                    for p, s in zip(prompts, seeds, strict=True)]
        while self.has_work():
            self.step()
        return requests

    def warm_up(self) -> None:
        """Run throwaway requests at batch 1 and (if `max_batch` allows) batch 2, two canvases of two steps each,
        so that a compiled engine has built its graphs (the step at both batch sizes, the commit pass) before
        real requests arrive. Leaves the engine idle; later requests are unaffected (each row's cache is reset on
        admission)."""
        if self.has_work():
            raise RuntimeError("warm_up needs an idle engine")
        # two canvases: the second needs a commit pass (a graph of its own when compiled)
        gen = GenerationConfig(max_new_tokens=self.canvas_length + 1, max_denoising_steps=2, eos_token_ids=())
        for batch in (1, 2) if self.config.max_batch > 1 else (1,):
            self.generate([[0]] * batch, gen)
        self.nfe = 0

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def views(self, b: int) -> tuple[StepState, RowSettings]:
        """The state and settings of the first b rows (views, made once per b)."""
        if b not in self._views:
            self._views[b] = (self.state.rows(b), self.settings.rows(b))
        return self._views[b]

    @torch.inference_mode()
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self.rows:
            return
        state, _ = self.views(len(self.rows))
        jobs = self._constraint_jobs()
        processor = self._processor(jobs, state)
        # the compiled and graph paths write the state in place as they go: keep a copy in case they fail
        saved = None if type(self.runner) is EagerRunner or processor is not None else state.clone()
        try:
            self._step_rows(self.rows, processor=processor)
            self.constraint_wait_seconds += processor.waited if processor is not None else 0.0
        except Exception:  # noqa: BLE001 - isolate the rows at fault, the others go on
            log.exception("engine step failed for a batch of %d rows; retrying each row alone", len(self.rows))
            self._step_rows_alone(saved, jobs)
            if not self.rows:
                return
        self.nfe += 1
        self._since_sync += 1
        for r in self.rows:
            r.steps_left -= 1
        self._sync_and_commit()

    def fail_all(self, message: str = "engine failure") -> None:
        """End every request with an error (the last resort after an error outside any one row's work): the
        engine is emptied first, then each request's caller is told."""
        for req in self.reset():
            self._fail(req, message)

    def reset(self) -> list[GenerationRequest]:
        """Drop every active and waiting request without telling their callers, reset the rows' cache; returns
        the dropped requests. The engine is then idle and as good as new."""
        requests = [r.request for r in self.rows] + list(self.waiting)
        for row in range(len(self.rows)):
            self.cache.reset_row(row)
        self.rows.clear()
        self.waiting.clear()
        return requests

    # -- the step ---------------------------------------------------------------------------------------
    def _step_rows(self, rows: list[_Row], alone: int | None = None,
                   processor: LogitsProcessor | None = None) -> None:
        """One denoising step of the first len(rows) rows, or (`alone`) of that one row by itself, eagerly, on
        views of its own cache row, state and settings. A step with a `processor` (constrained rows) runs
        eagerly. The seam a test injects a fault through."""
        if alone is None:
            if processor is None:
                self.runner.step(len(rows))
            else:
                self._eager.step(len(rows), processor, self._aligned_chunk())
            return
        cache = self.cache.row_view(alone)
        denoise_step(self.model, self.weights, cache, self.state.row(alone), self.settings.row(alone),
                     exact_inputs(cache, 1, self.device), self._aligned_chunk(), processor)

    def _aligned_chunk(self) -> int:
        """The sampler chunk rounded down to whole canvases (a constrained row's logits arrive in one piece)."""
        return max(self.canvas_length, self.config.sampler_chunk // self.canvas_length * self.canvas_length)

    def _constraint_jobs(self) -> list[tuple[int, CanvasConstraint, int, Future]]:
        """Start each constrained row's masks for this step on the worker thread: (row, constraint, tokens it may
        still return, the masks' future)."""
        jobs = []
        for i, r in enumerate(self.rows):
            constraint = r.request.constraint
            if constraint is not None:
                if self._mask_pool is None:
                    self._mask_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgemma-masks")
                future = self._mask_pool.submit(constraint.prepare, r.prev_argmax)
                jobs.append((i, constraint, r.request.gen.max_new_tokens - len(r.request.output), future))
        return jobs

    def _processor(self, jobs: list, state: StepState, alone: int | None = None) -> StepProcessor | None:
        """The step's logits processor (None when no row needs one): each row's constraint (`jobs`), filters,
        locked prefix and log-probability record; of row `alone` only, as row 0 of its own step."""
        work, ready = [], [f for *_, f in jobs]
        constraints = {i: (c, rem) for i, c, rem, _ in jobs}
        for i, r in enumerate(self.rows):
            if alone is not None and i != alone:
                continue
            req = r.request
            w = RowWork(row=0 if alone is not None else i)
            if i in constraints:
                w.constraint, w.remaining = constraints[i]
            if req.gen.filters:
                w.filters = (req.gen.top_k, req.gen.top_p, req.gen.min_p)
            if req.prefix == "lock" and r.tracker is not None:
                w.locked = r.tracker.tokens
            if req.logprobs is not None and (req.logprobs > 0 or w.constraint is not None):
                w.top, w.record = req.logprobs, r.record
            if w.constraint is not None or w.filters is not None or w.locked or w.record is not None:
                work.append(w)
        if not work:
            return None
        if alone is not None:
            ready = [f for i, *_, f in jobs if i == alone]
        stopped = state.row(alone).stopped if alone is not None else state.stopped
        return StepProcessor(work, self.canvas_length, ready, stopped)

    def _step_rows_alone(self, saved: StepState | None, jobs: list | None = None) -> None:
        """After a batched step raised: restore the rows' state (in-place paths may have written part of it), then
        step each row alone. A row whose step still raises fails with the error; every other row has advanced
        exactly as it would alone (batch invariance: its tokens depend on its own seed and context only)."""
        state, _ = self.views(len(self.rows))
        if saved is not None:
            state.copy_(saved)
        failed = []
        for i, r in enumerate(self.rows):
            try:
                self._step_rows([r], alone=i, processor=self._processor(jobs or [], self.state, alone=i))
            except Exception as exc:  # noqa: BLE001
                log.exception("engine step failed for request %s", r.request.id)
                self._fail(r.request, f"generation failed: {exc!r}")
                failed.append(i)
        self._release(failed)

    def _sync_and_commit(self) -> None:
        """After a step: tell drafts, follow settled prefixes, and commit the rows whose canvas is done. Rows whose
        confidence threshold is 0 never stop early (a rounding-level stop would still be committed, frozen, at the
        canvas's last step): no sync is needed for them until then."""
        drafts = any(r.request.on_draft is not None or r.request.on_step is not None or r.request.constraint is not None
                     or r.tracker is not None for r in self.rows)
        early = self._since_sync >= self.sync_every and any(r.request.gen.confidence_threshold > 0 for r in self.rows)
        if not (drafts or early or any(r.steps_left == 0 for r in self.rows)):
            return
        # sync: one per `sync_every` steps (and at a canvas's last step) decides which rows commit; every step
        # while a row is constrained (its next masks follow this step's argmax canvas) or its prefix is followed
        self._since_sync = 0
        state, _ = self.views(len(self.rows))
        stopped, taken = state.stopped.tolist(), state.steps_taken.tolist()
        failed, ended = [], []
        for row, r in enumerate(self.rows):
            r.steps_taken = taken[row]
            try:
                if self._after_step(row, r, state):
                    ended.append(row)
            except Exception as exc:  # noqa: BLE001 - a caller's callback fails its own request only
                self._fail(r.request, f"a callback (on_draft, on_step or on_tokens) failed: {exc!r}")
                failed.append(row)
        done = [r for i, r in enumerate(self.rows)
                if (stopped[i] or r.steps_left == 0) and i not in failed and i not in ended]
        self._release(failed + ended)
        self._commit([self.rows.index(r) for r in done])

    def _after_step(self, row: int, r: _Row, state: StepState) -> bool:
        """A row's host work after a synced step: its draft, its settled prefix (locked tokens are returned at once).
        True when that ended its request."""
        req = r.request
        if req.constraint is not None:
            r.prev_argmax = state.argmax_canvas[row].tolist()
        if req.on_draft is not None:
            req.on_draft(req, state.argmax_canvas[row].tolist())
        if r.tracker is None and req.on_step is None:
            return False
        argmax = r.prev_argmax or state.argmax_canvas[row].tolist()
        logprob = state.argmax_logprob[row].tolist()
        if req.on_step is not None:
            req.on_step(req, argmax, logprob)
        if r.tracker is None:
            return False
        r.tracker.update(argmax, logprob)
        if req.prefix != "lock" or r.tracker.locked == r.emitted:
            return False
        return self._return_tokens(r, argmax, logprob, r.tracker.locked)

    def _return_tokens(self, r: _Row, canvas: list[int], logprob: list[float], upto: int,
                       final: bool = False) -> bool:
        """Return canvas[r.emitted:upto] (cut at the first end id and at max_new_tokens) with their log-probabilities,
        and tell the caller. `final`: the canvas is committed. True when the request has ended."""
        req = r.request
        remaining = req.gen.max_new_tokens - len(req.output)
        emitted, reason = trim_generated(canvas[r.emitted:upto], remaining, req.gen.eos_token_ids)
        if reason == "length" and len(emitted) < remaining:
            reason = None  # neither an end token nor the last token asked for: more follows
        if req.logprobs is not None:
            self._add_logprobs(r, canvas, logprob, r.emitted, len(emitted))
        r.emitted = upto
        req.output.extend(emitted)
        if req.first_token_at is None and (emitted or final):
            req.first_token_at = time.perf_counter()
        if reason is not None:
            req.steps.append(r.steps_taken)
            req.finish_reason = reason
            req.finished_at = time.perf_counter()
        if req.on_tokens is not None and (emitted or reason is not None):
            req.on_tokens(req, emitted)  # the last call comes with req.done set
        return reason is not None

    def _add_logprobs(self, r: _Row, canvas: list[int], logprob: list[float], start: int, n: int) -> None:
        """Log-probabilities of canvas[start:start + n]: the argmax's from the step (the committed token is the argmax
        unless a constraint chose another: projection, exact mode; then read from the row's record)."""
        req, rec = r.request, r.record
        argmax = r.prev_argmax if r.prev_argmax is not None else None
        full = rec.full[start:start + n].tolist() if rec.full is not None and n else None
        for j in range(start, start + n):
            if argmax is not None and canvas[j] != argmax[j] and full is not None:
                req.token_logprobs.append(full[j - start][canvas[j]])
            else:
                req.token_logprobs.append(logprob[j])
        if req.logprobs and n:
            ids, values = rec.top_ids[start:start + n].tolist(), rec.top_logprobs[start:start + n].tolist()
            req.top_logprobs.extend([list(zip(i, v, strict=True)) for i, v in zip(ids, values, strict=True)])

    # -- admission, commits, release ---------------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
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
        if request.logprobs is not None and not (isinstance(request.logprobs, int) and not isinstance(
                request.logprobs, bool) and 0 <= request.logprobs <= MAX_TOP_LOGPROBS):
            raise ConfigError(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], "
                              f"got {request.logprobs!r}")
        if request.prefix not in (None, *PREFIX_MODES):
            raise ConfigError(f"prefix must be None, 'lock' or 'measure', got {request.prefix!r}")
        if request.prefix == "lock" and request.constraint is not None and request.constraint.exact:
            raise ConfigError("prefix locking cannot be combined with an exact-mode constraint (its Viterbi canvas "
                              "may differ from a locked prefix); use the default constraint mode")
        if request.prefill_from is not None and list(request.prefill_from.prompt) != list(request.prompt):
            raise ConfigError("prefill_from must be a request with the same prompt")
        if request.prefix == "measure" and request.prefix_stats is None:
            request.prefix_stats = PrefixStats()

    def _admit(self) -> None:
        if self.waiting and not self.weights.valid(self.model):  # parameters replaced or updated in place
            self.weights = pack_weights(self.model)
            self.runner.rebuild()
        while self.waiting and len(self.rows) < self.config.max_batch:
            request = self.waiting.popleft()
            if request.cancelled:
                continue
            row = len(self.rows)
            if not request.extend_context:
                self.cache.reset_row(row)
            source = self._prefill_source(request)
            self.rows.append(_Row(request))
            request.admitted_at = time.perf_counter()
            try:
                if source is None:
                    encode_row(self.model, self.cache, row, torch.tensor([request.prompt], device=self.device),
                               self.weights)
                else:  # the same prompt is prefilled in `source` and nothing else is cached there yet
                    self.cache.move_row(source, row)
                self._start_canvas(row)
            except Exception as exc:  # noqa: BLE001 - a request that fails its prefill fails alone
                log.exception("prefill failed for request %s", request.id)
                self._fail(request, f"prefill failed: {exc!r}")
                self.rows.pop()
                self.cache.reset_row(row)

    def _prefill_source(self, request: GenerationRequest) -> int | None:
        """The row holding `request.prefill_from` with only its prompt cached (no canvas committed yet), if any."""
        if request.prefill_from is None or request.extend_context:
            return None
        for i, r in enumerate(self.rows):
            if r.request is request.prefill_from and r.canvas_index == 0 and not r.request.done:
                return i if self.cache.lengths[i] == len(request.prompt) else None
        return None

    def _start_canvas(self, row: int) -> None:
        r = self.rows[row]
        gen, dev = r.request.gen, self.device
        r.steps_left, r.steps_taken, r.prev_argmax, r.emitted = gen.max_denoising_steps, 0, None, 0
        if r.request.prefix is not None:
            r.tracker = PrefixTracker(r.request.prefix_rule, self.canvas_length)
        st, rs = self.state, self.settings
        seed, index = torch.tensor([r.request.seed], device=dev), torch.tensor([r.canvas_index], device=dev)
        st.canvas[row] = rng.randint(seed, index, torch.tensor([0], device=dev), self.canvas_length, STREAM_INIT,
                                     self.vocab)[0]
        st.soft[row].zero_()
        st.history[row].fill_(-1)  # as the reference: no argmax equals -1 on the first step
        st.stopped[row], st.steps_taken[row], st.steps_left[row] = False, 0, gen.max_denoising_steps
        rs.seed[row], rs.canvas_index[row], rs.n_steps[row] = r.request.seed, r.canvas_index, gen.max_denoising_steps
        rs.t_min[row], rs.t_max[row], rs.stability[row] = gen.t_min, gen.t_max, gen.stability_threshold
        rs.confidence[row], rs.entropy_bound[row] = gen.confidence_threshold, gen.entropy_bound
        rs.stop_at_end[row] = gen.stop_at_end
        rs.end_ids[row] = -1
        if gen.stop_at_end:  # (validated: at most MAX_END_IDS of them)
            rs.end_ids[row, :len(gen.eos_token_ids)] = torch.tensor(gen.eos_token_ids, device=dev)

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
        """Return row `row`'s finished canvas (what its locked prefix has not returned yet); then end its request
        (True) or start its next canvas."""
        r = self.rows[row]
        req = r.request
        argmax = self.state.argmax_canvas[row].tolist()
        logprob = self.state.argmax_logprob[row].tolist() if req.logprobs is not None else []
        r.prev_argmax = argmax
        canvas = argmax
        if req.constraint is not None:  # valid by stability, or projected; exact mode: the Viterbi canvas
            canvas = req.constraint.finish(argmax)
        if req.prefix == "measure" and r.tracker is not None:
            remaining = req.gen.max_new_tokens - len(req.output)
            answer, reason = trim_generated(canvas, remaining, req.gen.eos_token_ids)
            req.prefix_stats.add(r.tracker.settle(canvas, len(answer) + (reason == "stop")))
        steps = r.steps_taken
        if self._return_tokens(r, canvas, logprob, len(canvas), final=True):
            return True
        req.steps.append(steps)
        self.runner.commit(row, torch.tensor([canvas], device=self.device))
        r.canvas_index += 1
        self._start_canvas(row)
        return False

    def _release(self, rows: list[int]) -> None:
        for row in sorted(rows, reverse=True):
            last = len(self.rows) - 1
            if row != last:  # keep active rows compact: move the last row into the freed slot
                self.cache.move_row(last, row)
                self.state.move_row(last, row)
                self.settings.move_row(last, row)
                self.rows[row] = self.rows[last]
            self.rows.pop()

    def _fail(self, req: GenerationRequest, message: str) -> None:
        """End one request with finish_reason "error" and tell its caller (the row is released by the caller)."""
        req.finish_reason, req.error = "error", message
        req.finished_at = time.perf_counter()
        if req.on_tokens is not None:
            try:
                req.on_tokens(req, [])
            except Exception:  # noqa: BLE001 - nothing more can be told to this caller
                log.exception("on_tokens callback failed while reporting an error")

    def _drop_cancelled(self) -> None:
        gone = [i for i, r in enumerate(self.rows) if r.request.cancelled]
        for i in gone:
            req = self.rows[i].request
            req.finish_reason = req.finish_reason or "cancelled"
            req.finished_at = time.perf_counter()
        self._release(gone)
