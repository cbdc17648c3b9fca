"""How the engine runs its step and its commit pass: eagerly, compiled (`torch.compile`), or replayed as CUDA
graphs. Each runner has the same two calls, `step(b)` (one denoising step of the first b rows, the new state
written in place) and `commit(row, ids)` (encode a finished canvas into the row's context), over the engine's
model, weights, cache and typed state.

- `EagerRunner`: `denoise_step` with the exact context of each step (`exact_inputs`) and `encode_row`: the twin
  the other two are tested against (tests/test_engine.py).
- `CompiledRunner`: `masked_step` and `encode_canvas` compiled for this engine alone; one step graph for batch 1
  and one for larger batches, each serving every context length (its size is dynamic).
- `GraphRunner`: the whole step as a CUDA graph per batch bucket (1, 2, 4, ... max_batch) over every context
  slot; `capture=False` runs the same body eagerly on any device (its CPU test).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Protocol

import torch

from dgemma.config import EngineConfig
from dgemma.engine.forward import encode_canvas, encode_row, exact_inputs
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.engine.step import RowSettings, StepState, denoise_step, masked_step
from dgemma.engine.weights import ModelWeights, allow_mkl_in_graphs
from dgemma.model.modeling import DiffusionGemma
from dgemma.sampler.entropy_bound import LogitsProcessor

_ENGINE_IDS = itertools.count()


class Engine(Protocol):
    """What a runner reads of the engine that owns it (`engine.Engine`)."""

    model: DiffusionGemma
    weights: ModelWeights
    cache: StaticKVCache
    state: StepState
    settings: RowSettings
    config: EngineConfig
    device: torch.device
    canvas_length: int

    def views(self, b: int) -> tuple[StepState, RowSettings]: ...


class EagerRunner:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def step(self, b: int, processor: LogitsProcessor | None = None, chunk: int | None = None) -> None:
        e = self.engine
        state, settings = e.views(b)
        denoise_step(e.model, e.weights, e.cache, state, settings, exact_inputs(e.cache, b, e.device),
                     chunk or e.config.sampler_chunk, processor)

    def commit(self, row: int, ids: torch.Tensor) -> None:
        e = self.engine
        encode_row(e.model, e.cache, row, ids, e.weights)

    def rebuild(self) -> None:
        """After the weights were re-packed (nothing to do eagerly)."""


class CompiledRunner(EagerRunner):
    """`torch.compile` of the whole step and of the commit pass, for this engine alone.

    Guards (checked before every call, ~0.1 ms for ~1,000 of them) skip the model's modules: this engine's model
    keeps its structure, and a model whose parameters change is re-packed and recompiled (`rebuild`). So that no
    other engine (another model) can reuse these graphs, each engine compiles its own copy of the functions'
    code objects (torch.compile caches graphs per code object)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self._context_key: tuple[int, ...] | None = None
        self._context: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rebuild()

    def rebuild(self) -> None:
        self._step, self._commit = self._compile(masked_step), self._compile(encode_canvas)

    def _compile(self, fn: Callable) -> Callable:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{next(_ENGINE_IDS)}")
        options: dict = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.engine.device.type == "cpu":
            allow_mkl_in_graphs()
            options["cpp_wrapper"] = True  # a C++ wrapper calls the kernels (Python's costs ~0.4 ms per step)
        # no size/stride re-check of every input and library-call result on each call (~0.3 us each, ~140
        # inputs): the guards check the state tensors' shapes, and the weights' only change by a re-pack,
        # which recompiles
        options["size_asserts"] = False
        return torch.compile(types.FunctionType(code, fn.__globals__), options=options)

    def step(self, b: int) -> None:
        e = self.engine
        state, settings = e.views(b)
        lengths, slots = self._context_inputs(b)
        self._step(e.model, e.weights, e.cache, state, settings, lengths, slots, e.config.sampler_chunk)

    def _context_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first b rows' context lengths (b,) and arange(C + longest context), through whose (dynamic) size the
        context length reaches the graph (one graph for all lengths); made again only when the lengths changed
        (a commit or an admission)."""
        e = self.engine
        lengths = tuple(e.cache.lengths[:b])
        if self._context_key != lengths:
            lengths_t = torch.tensor(lengths, device=e.device)
            slots = torch.arange(e.canvas_length + max(lengths), device=e.device)
            torch._dynamo.maybe_mark_dynamic(slots, 0)
            if b > 1:  # one graph for every batch of 2 or more rows (batch 1 keeps its own, specialised one)
                state, settings = e.views(b)
                for t in (*state.tensors().values(), *settings.tensors().values(), lengths_t):
                    torch._dynamo.maybe_mark_dynamic(t, 0)
            self._context_key, self._context = lengths, (lengths_t, slots)
        return self._context

    def commit(self, row: int, ids: torch.Tensor) -> None:
        """The compiled commit pass: one graph for every row and context length."""
        e, cache = self.engine, self.engine.cache
        n, c = cache.lengths[row], e.canvas_length
        cache.check_room(row, c)
        slots = torch.arange(c + n, device=e.device)
        torch._dynamo.maybe_mark_dynamic(slots, 0)
        self._commit(e.model, e.weights, [k[row:row + 1] for k in cache.keys], [v[row:row + 1] for v in cache.values],
                     cache.ring_pos[row:row + 1], ids, slots)
        cache.lengths[row] = n + c


class GraphRunner(EagerRunner):
    """The whole engine step as CUDA graphs, one per batch bucket, captured on first use and replayed for every
    context length: `masked_step` over the first `bucket` rows of the engine's state and cache (which never move)
    and every context slot. Rows past the active ones (a bucket's padding) get context 0; their state is
    meaningless and is reset when a request takes the row. Each replay queues the step without a host sync.
    `capture=False` runs the same body eagerly instead: its twin, usable on any device."""

    def __init__(self, engine: Engine, capture: bool = True) -> None:
        super().__init__(engine)
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.lengths = torch.zeros(engine.config.max_batch, dtype=torch.long, device=engine.device)
        self._lengths_key: tuple[int, ...] | None = None
        self._pool = None

    def rebuild(self) -> None:
        self.graphs.clear()

    def bucket(self, b: int) -> int:
        size = 1
        while size < b:
            size *= 2
        return min(size, self.engine.config.max_batch)

    def step(self, b: int) -> None:
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
        state, settings = e.state.rows(size), e.settings.rows(size)
        slots = torch.arange(e.canvas_length + e.cache.max_context, device=e.device)
        masked_step(e.model, e.weights, e.cache, state, settings, self.lengths[:size], slots, e.config.sampler_chunk)

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        state = self.engine.state.rows(size)
        saved = state.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels and the allocator outside the graph
            for _ in range(2):
                self._run(size)
        torch.cuda.current_stream().wait_stream(stream)
        state.copy_(saved)  # the warm-up steps advanced the state: undo them
        graph = torch.cuda.CUDAGraph()
        # one memory pool for every bucket: a step leaves nothing alive in it (its results are copied into
        # the state) and replays never overlap, so the buckets can share their scratch memory
        with torch.cuda.graph(graph, pool=self._pool):  # recorded, not run
            self._run(size)
        self._pool = self._pool or graph.pool()
        return graph
