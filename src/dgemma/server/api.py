"""OpenAI-compatible HTTP server (FastAPI): the routes and the error handling at the door.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming with SSE, ending in `[DONE]`),
GET /v1/models, GET /health (no auth), GET /metrics (Prometheus text). With an API key, every endpoint but
/health needs `Authorization: Bearer <key>`. The request lifecycle lives in `worker.py`, schemas and
response bodies in `protocol.py`, counters in `metrics.py`.

Every non-2xx response has OpenAI's error body `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed body or field, 401, 404 (unknown path or model), 405, 413 (body over `max_body_bytes`), 429 (queue
full), 500 (an unexpected error: JSON body, traceback in the server log, the connection stays usable).
tests/test_server.py and tests/test_server_fuzz.py check this over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgemma.config import EngineConfig, GenerationConfig, ModelConfig, ServerConfig, UserError
from dgemma.constrain.canvas import CanvasConstraint, canvas_constraint
from dgemma.constrain.spec import ConstraintError
from dgemma.engine.engine import Engine
from dgemma.model.modeling import DiffusionGemma
from dgemma.server.metrics import Metrics
from dgemma.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ProtocolError,
    error_body,
    parse_body,
)
from dgemma.server.worker import EngineWorker, Job
from dgemma.tokenizer import Tokenizer

log = logging.getLogger(__name__)
_STATUS_TYPES = {401: "invalid_api_key", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 429: "rate_limit_exceeded"}


def create_app(model: DiffusionGemma, tokenizer: Tokenizer | None, gen: GenerationConfig,
               config: ServerConfig | None = None, engine_config: EngineConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    engine_config = engine_config or EngineConfig()
    engine = Engine(model, engine_config)
    if engine_config.compile:
        engine.warm_up()  # build the compiled graphs before the first request rather than during it
    worker = EngineWorker(engine, config.max_queue)
    metrics = Metrics()
    serving = _Serving(worker, tokenizer, gen, config, metrics, model.config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="dgemma", version="0.1.0", lifespan=lifespan)
    app.state.worker = worker
    created = int(time.time())
    _install_error_handling(app, config)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "active": worker.active(), "queued": worker.queue_depth()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.served_model_name, "object": "model", "created": created,
                                             "owned_by": "dgemma"}]}

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(worker.queue_depth(), worker.active()),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.generate(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.generate(request, CompletionRequest, "completions")

    return app


def _install_error_handling(app: FastAPI, config: ServerConfig) -> None:
    """Authentication, the body-size limit, and OpenAI-shaped bodies for every error status."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {config.api_key}":
                return _error(ProtocolError("invalid or missing API key", status=401, code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return _error(ProtocolError(f"request body larger than {config.max_body_bytes} bytes", status=413))
        try:
            return await call_next(request)
        except Exception:  # noqa: BLE001 - the last line of defence: a JSON 500, the traceback in the log
            log.exception("unhandled error serving %s %s", request.method, request.url.path)
            return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        message = {404: "no such endpoint", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error")
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=exc.headers)


def _error(exc: ProtocolError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@dataclass
class _Serving:
    """What the generation routes share: the worker, the tokenizer, the checkpoint's settings, the counters."""

    worker: EngineWorker
    tokenizer: Tokenizer | None
    gen: GenerationConfig
    config: ServerConfig
    metrics: Metrics
    model: ModelConfig

    async def generate(self, request: Request, schema, endpoint: str):
        """Parse, validate and submit one generation request; answer with its stream or its whole body."""
        try:
            job = await self._submit(request, schema, endpoint)
        except ProtocolError as exc:
            self.metrics.count(endpoint, exc.status)
            return _error(exc)
        self.metrics.count(endpoint, 200)
        if job.body.stream:
            return StreamingResponse(job.sse_events(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finished = await job.run_to_end(request)
        finally:
            job.cancel()  # no-op once done; frees the row if this handler is cancelled
        if not finished:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if job.failed:
            return JSONResponse(error_body(job.error_message(), "server_error"), status_code=500)
        return JSONResponse(job.final_body())

    async def _submit(self, request: Request, schema, endpoint: str) -> Job:
        config = self.config
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise ProtocolError(f"request body larger than {config.max_body_bytes} bytes", status=413)
        body = parse_body(raw, schema)
        if body.model != config.served_model_name:
            raise ProtocolError(f"model {body.model!r} does not exist; this server serves {config.served_model_name!r}",
                                status=404, param="model", code="model_not_found")
        gen = body.generation_config(self.gen, config.default_max_tokens)
        prompt = _prompt_ids(body, endpoint, self.tokenizer)
        constraint = await self._constraint(body, gen)
        job = Job(body, gen, prompt, endpoint, config.served_model_name, self.tokenizer, self.metrics, constraint)
        try:
            self.worker.submit(job.request)
        except ProtocolError:
            raise
        except UserError as exc:  # the engine's validation: sizes against the context, ids, settings
            raise ProtocolError(str(exc), param="messages" if endpoint == "chat" else "prompt") from None
        return job


    async def _constraint(self, body, gen: GenerationConfig) -> CanvasConstraint | None:
        """The request's structured-output constraint, compiled for this model off the event loop (an exact-mode
        automaton takes up to seconds); ProtocolError (400) when it cannot be."""
        spec = body.constraint_spec()
        if spec is None:
            return None
        param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        if self.tokenizer is None:
            raise ProtocolError("structured outputs need the model's tokenizer (this checkpoint has none)", param=param)
        if not gen.eos_token_ids:
            raise ProtocolError("structured outputs need the model's end token ids (none are configured)", param=param)
        try:
            return await asyncio.to_thread(canvas_constraint, spec, self.tokenizer, self.model.vocab_size,
                                           gen.eos_token_ids, self.model.canvas_length)
        except ConstraintError as exc:
            raise ProtocolError(str(exc), param=param) from None


def _prompt_ids(body, endpoint: str, tokenizer: Tokenizer | None) -> list[int]:
    if endpoint == "chat":
        if tokenizer is None:
            raise ProtocolError("this model has no tokenizer: use /v1/completions with token ids")
        messages = [m.model_dump(exclude_none=True, include={"role", "content"}) for m in body.messages]
        try:
            return tokenizer.encode_chat(messages)
        except UserError as exc:
            raise ProtocolError(str(exc), param="messages") from None
    if isinstance(body.prompt, list):
        return body.prompt
    if tokenizer is None:
        raise ProtocolError("this model has no tokenizer: send the prompt as token ids", param="prompt")
    try:
        return tokenizer.encode(body.prompt)
    except UserError as exc:
        raise ProtocolError(str(exc), param="prompt") from None
