"""OpenAI-compatible HTTP server (FastAPI) over the engine.

The engine runs in one worker thread that steps while it has work; HTTP handlers never touch tensors.
A request is submitted with callbacks that push events (committed tokens, drafts, end) onto the
handler's asyncio queue through `loop.call_soon_threadsafe`, so the event loop never blocks. A client that
disconnects cancels its request (the engine drops the row at its next step). When the wait queue is full
the server answers 429 instead of accepting more.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming with SSE, ending in `[DONE]`),
GET /v1/models, GET /health (no auth), GET /metrics (Prometheus text). With an API key, every endpoint but
/health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from dgemma.config import GenerationConfig
from dgemma.engine.engine import Engine, EngineConfig
from dgemma.engine.engine import Request as EngineRequest
from dgemma.model.modeling import DiffusionGemma
from dgemma.server.protocol import ChatCompletionRequest, CompletionRequest, ProtocolError, StopMatcher
from dgemma.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    model_name: str = "dgemma"
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 256


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    canvases: int = 0
    steps: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    ttft_sum: float = 0.0

    def render(self, engine: EngineWorker) -> str:
        lines = ["# TYPE dgemma_requests_total counter"]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'dgemma_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        lines += [
            "# TYPE dgemma_generated_tokens_total counter", f"dgemma_generated_tokens_total {self.generated_tokens}",
            "# TYPE dgemma_prompt_tokens_total counter", f"dgemma_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE dgemma_canvases_total counter", f"dgemma_canvases_total {self.canvases}",
            "# TYPE dgemma_denoising_steps_total counter", f"dgemma_denoising_steps_total {self.steps}",
            "# TYPE dgemma_steps_per_canvas gauge",
            f"dgemma_steps_per_canvas {self.steps / self.canvases if self.canvases else 0.0}",
            "# TYPE dgemma_tokens_per_forward gauge",
            f"dgemma_tokens_per_forward {self.generated_tokens / self.steps if self.steps else 0.0}",
            "# TYPE dgemma_queue_depth gauge", f"dgemma_queue_depth {engine.queue_depth()}",
            "# TYPE dgemma_active_requests gauge", f"dgemma_active_requests {engine.active()}",
            "# TYPE dgemma_request_latency_seconds summary",
            f"dgemma_request_latency_seconds_sum {self.latency_sum}",
            f"dgemma_request_latency_seconds_count {self.latency_count}",
            "# TYPE dgemma_time_to_first_token_seconds summary",
            f"dgemma_time_to_first_token_seconds_sum {self.ttft_sum}",
            f"dgemma_time_to_first_token_seconds_count {self.latency_count}",
        ]
        return "\n".join(lines) + "\n"


class EngineWorker:
    """Owns the engine and the thread that steps it."""

    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dgemma-engine", daemon=True)
        self._thread.start()

    def queue_depth(self) -> int:
        return len(self.engine.waiting)

    def active(self) -> int:
        return len(self.engine.rows)

    def submit(self, request: EngineRequest) -> None:
        """Called from the event loop: validation and a deque append, never waits for a step."""
        if len(self.engine.waiting) >= self.max_queue:
            raise ProtocolError("the server is busy (request queue full); retry later", status=429,
                                code="rate_limit_exceeded")
        self.engine.submit(request)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            busy = self.engine.has_work()
            if busy:
                try:
                    self.engine.step()
                except Exception:  # a failing step must not kill the server: fail its requests
                    log.exception("engine step failed")
                    self.engine.fail_all()
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)


def create_app(model: DiffusionGemma, tokenizer: Tokenizer | None, gen: GenerationConfig,
               config: ServerConfig | None = None, engine_config: EngineConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    engine_config = engine_config or EngineConfig()
    engine = Engine(model, engine_config)
    if engine_config.compile:
        engine.warm_up()  # build the compiled graphs before the first request rather than during it
    worker = EngineWorker(engine, config.max_queue)
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan)
    app.state.worker = worker
    created = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {config.api_key}":
                err = ProtocolError("invalid or missing API key", status=401, code="invalid_api_key")
                return JSONResponse(err.body(), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            err = ProtocolError(f"request body larger than {config.max_body_bytes} bytes", status=413)
            return JSONResponse(err.body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "active": worker.active(), "queued": worker.queue_depth()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                             "owned_by": "dgemma"}]}

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(worker), media_type="text/plain; version=0.0.4")

    async def parse(request: Request, schema):
        body = await request.body()
        if len(body) > config.max_body_bytes:
            raise ProtocolError(f"request body larger than {config.max_body_bytes} bytes", status=413)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProtocolError("request body is not valid JSON") from None
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ()))
            raise ProtocolError(f"{param}: {first.get('msg')}" if param else first.get("msg"), param=param) from None

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise ProtocolError(f"model {name!r} does not exist; this server serves {config.model_name!r}",
                                status=404, param="model", code="model_not_found")

    async def handle(request: Request, schema, endpoint: str):
        try:
            body = await parse(request, schema)
            check_model(body.model)
            gen_cfg = body.generation_config(gen, config.default_max_tokens)
            if isinstance(body, ChatCompletionRequest):
                if tokenizer is None:
                    raise ProtocolError("this model has no tokenizer: use /v1/completions with token ids")
                prompt = tokenizer.encode_chat([m.model_dump(exclude_none=True, include={"role", "content"})
                                                for m in body.messages])
            elif isinstance(body.prompt, list):
                prompt = body.prompt
            else:
                if tokenizer is None:
                    raise ProtocolError("this model has no tokenizer: send the prompt as token ids")
                prompt = tokenizer.encode(body.prompt)
            job = _Job(body, gen_cfg, prompt, endpoint, asyncio.get_running_loop())
            try:
                worker.submit(job.engine_request())
            except ValueError as exc:
                if isinstance(exc, ProtocolError):
                    raise
                raise ProtocolError(str(exc), param="messages" if endpoint == "chat" else "prompt") from None
        except ProtocolError as exc:
            metrics.requests[(endpoint, exc.status)] = metrics.requests.get((endpoint, exc.status), 0) + 1
            return JSONResponse(exc.body(), status_code=exc.status)
        metrics.requests[(endpoint, 200)] = metrics.requests.get((endpoint, 200), 0) + 1
        metrics.prompt_tokens += len(prompt)
        if body.stream:
            return StreamingResponse(_stream(job, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await job.run_to_end(request)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if job.engine_req.finish_reason == "error":
            err = ProtocolError("generation failed", status=500, code="server_error")
            return JSONResponse(err.body(), status_code=500)
        return JSONResponse(job.final_body())

    @dataclass
    class _Job:
        body: Any
        gen: GenerationConfig
        prompt: list[int]
        endpoint: str
        loop: asyncio.AbstractEventLoop
        events: asyncio.Queue = field(default_factory=asyncio.Queue)
        tokens: list[int] = field(default_factory=list)
        text_sent: str = ""
        stopped: bool = False
        engine_req: EngineRequest | None = None
        id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

        def __post_init__(self) -> None:
            self.matcher = StopMatcher(self.body.stop or [])
            self.started = time.perf_counter()

        def engine_request(self) -> EngineRequest:
            seed = self.body.seed if self.body.seed is not None else uuid.uuid4().int % (2**31)
            self.engine_req = EngineRequest(prompt=self.prompt, gen=self.gen, seed=seed, on_tokens=self._on_tokens,
                                            on_draft=self._on_draft if self.body.draft else None)
            return self.engine_req

        # engine thread -> event loop
        def _on_tokens(self, req: EngineRequest, tokens: list[int]) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("tokens", list(tokens), req.done))

        def _on_draft(self, req: EngineRequest, canvas: list[int]) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ("draft", canvas, False))

        def cancel(self) -> None:
            if self.engine_req is not None and not self.engine_req.done:
                self.engine_req.cancelled = True

        def decode(self, tokens: list[int]) -> str:
            return tokenizer.decode(tokens) if tokenizer is not None else ""

        def advance(self, tokens: list[int], final: bool) -> str:
            """Add committed tokens; return the new text that is safe to send."""
            self.tokens += tokens
            text = self.decode(self.tokens)
            safe, stopped = self.matcher.feed(text)
            if final and not stopped:
                safe = text
            if stopped:
                self.stopped = True
                self.cancel()
            delta = safe[len(self.text_sent):] if safe.startswith(self.text_sent) else ""
            self.text_sent += delta
            return delta

        async def next_event(self, request: Request):
            while True:
                try:
                    return await asyncio.wait_for(self.events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.cancel()
                        return None
                    if self.engine_req.done and self.events.empty():
                        return ("tokens", [], True)

        async def run_to_end(self, request: Request) -> None:
            while not self.stopped:
                event = await self.next_event(request)
                if event is None:
                    return
                kind, payload, final = event
                if kind == "tokens":
                    self.advance(payload, final)
                    if final or self.engine_req.done:
                        break
            self.record()

        def finish_reason(self) -> str:
            if self.stopped or self.engine_req.finish_reason == "stop":
                return "stop"
            return "length"

        def record(self) -> None:
            req = self.engine_req
            metrics.generated_tokens += len(self.tokens)
            metrics.canvases += len(req.steps)
            metrics.steps += sum(req.steps)
            metrics.latency_sum += time.perf_counter() - self.started
            metrics.latency_count += 1
            if req.first_token_at is not None:
                metrics.ttft_sum += req.first_token_at - req.submitted_at

        def usage(self) -> dict[str, int]:
            return {"prompt_tokens": len(self.prompt), "completion_tokens": len(self.tokens),
                    "total_tokens": len(self.prompt) + len(self.tokens)}

        def final_body(self) -> dict[str, Any]:
            prefix = "chatcmpl-" if self.endpoint == "chat" else "cmpl-"
            common = {"id": prefix + self.id, "created": int(time.time()), "model": config.model_name,
                      "usage": self.usage(), "dgemma": {"steps": self.engine_req.steps, "token_ids": self.tokens}}
            if self.endpoint == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": self.text_sent},
                          "finish_reason": self.finish_reason()}
                return {"object": "chat.completion", "choices": [choice], **common}
            choice = {"index": 0, "text": self.text_sent, "finish_reason": self.finish_reason(), "logprobs": None}
            return {"object": "text_completion", "choices": [choice], **common}

        def chunk(self, delta: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            base = {"id": ("chatcmpl-" if self.endpoint == "chat" else "cmpl-") + self.id,
                    "created": int(time.time()), "model": config.model_name}
            if self.endpoint == "chat":
                d: dict[str, Any] = {}
                if role:
                    d["role"] = "assistant"
                if delta:
                    d["content"] = delta
                return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d,
                                                                       "finish_reason": finish}], **base}
            return {"object": "text_completion", "choices": [{"index": 0, "text": delta or "",
                                                            "finish_reason": finish, "logprobs": None}], **base}

    async def _stream(job: _Job, request: Request):
        def sse(obj: dict[str, Any], event: str | None = None) -> str:
            head = f"event: {event}\n" if event else ""
            return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if job.endpoint == "chat":
                yield sse(job.chunk(None, None, role=True))
            while not job.stopped:
                event = await job.next_event(request)
                if event is None:
                    return
                kind, payload, final = event
                if kind == "draft":
                    yield sse({"id": job.id, "canvas": payload, "text": job.decode(payload)}, event="draft")
                    continue
                delta = job.advance(payload, final or job.engine_req.done)
                if delta:
                    yield sse(job.chunk(delta, None))
                if final or job.engine_req.done:
                    break
            if job.engine_req.finish_reason == "error":
                yield sse({"error": {"message": "generation failed", "type": "server_error"}}, event="error")
                return
            job.record()
            yield sse(job.chunk(None, job.finish_reason()))
            opts = job.body.stream_options
            if opts is not None and opts.include_usage:
                yield sse({**job.chunk(None, None), "choices": [], "usage": job.usage()})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # client gone or stream closed: free the row

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, CompletionRequest, "completions")

    return app
