"""OpenAI-compatible HTTP server (FastAPI): the routes and the error handling at the door.

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming with SSE, ending in `[DONE]`),
GET /v1/models, POST /tokenize and /detokenize (vLLM's helpers), GET /health (no auth), GET /metrics (Prometheus
text, `metrics.py`). With an API key, every endpoint but /health needs `Authorization: Bearer <key>`. What a
generation request goes through lives in `serving.py` (checks, prompt, constraints) and `worker.py` (the engine's
thread, streams); schemas in `protocol.py`, response bodies in `responses.py`.

Every non-2xx response has OpenAI's error body `{"error": {"message", "type", "param", "code"}}`: 400 for a
malformed body or field, 401, 404 (unknown path or model), 405, 413 (body over `max_body_bytes`), 429 (queue
full), 500 (an unexpected error: JSON body, traceback in the server log, the connection stays usable).
tests/test_server.py, tests/test_server_fuzz.py and tests/test_openai_api.py check this over HTTP.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dgemma.config import EngineConfig, GenerationConfig, ServerConfig, UserError
from dgemma.engine.engine import Engine
from dgemma.model.modeling import DiffusionGemma
from dgemma.server.metrics import Metrics
from dgemma.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ProtocolError,
    TokenizeRequest,
    error_body,
)
from dgemma.server.serving import Serving, error_response
from dgemma.server.tools import ToolDefinitionError, ToolSet
from dgemma.server.worker import EngineWorker
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
    serving = Serving(worker, tokenizer, gen, config, metrics, model.config)

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
        card = {"id": config.served_model_name, "object": "model", "created": created, "owned_by": "dgemma",
                "max_model_len": model.config.max_position_embeddings}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(worker.queue_depth(), worker.active()),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.generate(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.generate(request, CompletionRequest, "completions")

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await _tokenize(serving, request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await _detokenize(serving, request)

    return app


async def _tokenize(serving: Serving, request: Request):
    """{"tokens", "count", "max_model_len"} of a prompt or of messages rendered by the chat template."""
    try:
        body = await serving.read(request, TokenizeRequest)
        tok = serving.tokenizer
        if tok is None:
            raise ProtocolError("this model has no tokenizer")
        if (body.prompt is None) == (body.messages is None):
            raise ProtocolError("give either prompt or messages", param="prompt")
        if body.prompt is not None:
            ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            messages = [m.for_template(i) for i, m in enumerate(body.messages)]
            tools = ToolSet.from_request(body.tools).rendered() if body.tools else None
            kwargs = body.chat_template_kwargs.model_dump() if body.chat_template_kwargs else {}
            ids = tok.encode_chat(messages, add_generation_prompt=body.add_generation_prompt, tools=tools, **kwargs)
    except ToolDefinitionError as exc:
        return error_response(ProtocolError(str(exc), param=exc.param))
    except ProtocolError as exc:
        return error_response(exc)
    except UserError as exc:
        return error_response(ProtocolError(str(exc), param="messages" if body.messages else "prompt"))
    return {"tokens": ids, "count": len(ids), "max_model_len": serving.model.max_position_embeddings}


async def _detokenize(serving: Serving, request: Request):
    try:
        body = await serving.read(request, DetokenizeRequest)
        if serving.tokenizer is None:
            raise ProtocolError("this model has no tokenizer")
        vocab = serving.model.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise ProtocolError(f"token ids must lie in [0, {vocab})", param="tokens")
    except ProtocolError as exc:
        return error_response(exc)
    return {"prompt": serving.tokenizer.decode(body.tokens)}


def _install_error_handling(app: FastAPI, config: ServerConfig) -> None:
    """Authentication, the body-size limit, and OpenAI-shaped bodies for every error status."""

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {config.api_key}":
                return error_response(ProtocolError("invalid or missing API key", status=401, code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > config.max_body_bytes):
            return error_response(ProtocolError(f"request body larger than {config.max_body_bytes} bytes", status=413))
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


