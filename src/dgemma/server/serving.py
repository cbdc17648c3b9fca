"""What the generation routes do between the door and the engine: parse and check a request, render its prompt, build
its constraints, and answer with a stream or a whole body.

A chat request with tools: `ToolSet` checks the definitions (an invalid JSON Schema is a 400 naming the tool); the
template renders the tools (a template that never reads `tools` is a 400: it would drop them silently), the
history's calls and results; `tool_choice` "required" or a named function becomes a constraint whose grammar is
the call format with each function's argument schema (`tool_grammar.py`), "auto" leaves the model free and parses
what it writes, "none" neither renders nor parses tools. The end of a tool-call turn, `<|tool_response>`, is an
end id of the request when it is one token, else a hidden stop string. With thinking on, a response format's
constraint starts after an optional thinking block (`reasoning.after_thinking`). Each of the `n` choices gets its
own compiled constraint (a grammar state per choice). tests/test_openai_*.py exercise every path over HTTP.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from dgemma.config import GenerationConfig, ModelConfig, ServerConfig, UserError
from dgemma.constrain.canvas import CanvasConstraint, canvas_constraint
from dgemma.constrain.spec import ConstraintError, ConstraintSpec
from dgemma.server.metrics import Metrics
from dgemma.server.protocol import ChatCompletionRequest, ProtocolError, error_body, parse_body
from dgemma.server.reasoning import REASONING_MARKERS, after_thinking
from dgemma.server.tool_grammar import Markers, tool_call_grammar
from dgemma.server.tools import TOOL_MARKERS, TOOL_RESPONSE_OPEN, ToolDefinitionError, ToolSet
from dgemma.server.worker import EngineWorker, Job
from dgemma.tokenizer import Tokenizer


def error_response(exc: ProtocolError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@dataclass
class _Plan:
    """What a request needs beyond its body: prompt, settings, constraint spec, tools."""

    prompt: list[int]
    gen: GenerationConfig
    spec: ConstraintSpec | None = None
    spec_param: str = "response_format"
    tools: ToolSet | None = None
    hidden_stops: tuple[str, ...] = ()
    keep: frozenset[int] = field(default_factory=frozenset)


@dataclass
class Serving:
    """What the generation routes share: the worker, the tokenizer, the checkpoint's settings, the counters."""

    worker: EngineWorker
    tokenizer: Tokenizer | None
    gen: GenerationConfig
    config: ServerConfig
    metrics: Metrics
    model: ModelConfig

    def __post_init__(self) -> None:
        names = list(TOOL_MARKERS + REASONING_MARKERS)
        self.markers = Markers(self.tokenizer.special_ids(names) if self.tokenizer is not None else {})

    async def generate(self, request: Request, schema, endpoint: str):
        """Parse, validate and submit one generation request; answer with its stream or its whole body."""
        try:
            job = await self._submit(request, schema, endpoint)
        except ProtocolError as exc:
            self.metrics.count(endpoint, exc.status)
            return error_response(exc)
        self.metrics.count(endpoint, 200)
        if job.body.stream:
            return StreamingResponse(job.sse_events(request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finished = await job.run_to_end(request)
        finally:
            job.cancel()  # no-op once done; frees the rows if this handler is cancelled
        if not finished:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if job.failed:
            return JSONResponse(error_body(job.error_message(), "server_error"), status_code=500)
        return JSONResponse(job.final_body())

    async def read(self, request: Request, schema) -> Any:
        raw = await request.body()
        if len(raw) > self.config.max_body_bytes:
            raise ProtocolError(f"request body larger than {self.config.max_body_bytes} bytes", status=413)
        body = parse_body(raw, schema)
        if getattr(body, "model", None) not in (None, self.config.served_model_name):
            raise ProtocolError(f"model {body.model!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}", status=404, param="model",
                                code="model_not_found")
        return body

    async def _submit(self, request: Request, schema, endpoint: str) -> Job:
        body = await self.read(request, schema)
        plan = self._chat_plan(body) if endpoint == "chat" else self._completion_plan(body)
        constraints = await self._constraints(plan, body.choices)
        prefix = "lock" if body.stream_mode == "prefix" else "measure" if self.config.prefix_metrics else None
        job = Job(body, plan.gen, plan.prompt, endpoint, self.config.served_model_name, self.tokenizer, self.metrics,
                  constraints=constraints, tools=plan.tools, keep=plan.keep, hidden_stops=plan.hidden_stops,
                  prefix=prefix)
        try:
            self.worker.submit(job.requests)
        except ProtocolError:
            raise
        except UserError as exc:  # the engine's validation: sizes against the context, ids, settings
            raise ProtocolError(str(exc), param="messages" if endpoint == "chat" else "prompt") from None
        return job

    def _completion_plan(self, body) -> _Plan:
        gen = body.generation_config(self.gen, self.config.default_max_tokens)
        plan = _Plan(prompt=self._prompt_ids(body), gen=gen, spec=body.constraint_spec())
        if body.structured_outputs is not None:
            plan.spec_param = "structured_outputs"
        return plan

    def _prompt_ids(self, body) -> list[int]:
        if isinstance(body.prompt, list):
            return body.prompt
        if self.tokenizer is None:
            raise ProtocolError("this model has no tokenizer: send the prompt as token ids", param="prompt")
        try:
            return self.tokenizer.encode(body.prompt)
        except UserError as exc:
            raise ProtocolError(str(exc), param="prompt") from None

    def _chat_plan(self, body: ChatCompletionRequest) -> _Plan:
        tok = self.tokenizer
        if tok is None:
            raise ProtocolError("this model has no tokenizer: use /v1/completions with token ids")
        gen = body.generation_config(self.gen, self.config.default_max_tokens)
        mode, name = body.tool_mode()
        tools = self._tools(body, mode, name)
        messages = [m.for_template(i) for i, m in enumerate(body.messages)]
        kwargs = {"enable_thinking": True} if body.thinking else {}
        try:
            prompt = tok.encode_chat(messages, tools=tools.rendered() if tools else None, **kwargs)
        except UserError as exc:
            raise ProtocolError(str(exc), param="messages") from None
        plan = _Plan(prompt=prompt, gen=gen, tools=tools, keep=frozenset(self.markers.ids.values()))
        if tools is not None:
            end = self.markers.ids.get(TOOL_RESPONSE_OPEN)
            if end is not None:
                plan.gen = gen.replace(eos_token_ids=(*gen.eos_token_ids, end))
            else:
                plan.hidden_stops = (TOOL_RESPONSE_OPEN,)
        self._chat_constraint(body, plan, mode, name)
        return plan

    def _tools(self, body: ChatCompletionRequest, mode: str, name: str | None) -> ToolSet | None:
        if mode == "none":
            return None
        try:
            tools = ToolSet.from_request(body.tools)
        except ToolDefinitionError as exc:
            raise ProtocolError(str(exc), param=exc.param) from None
        if name is not None and name not in tools.functions:
            raise ProtocolError(f"tool_choice names {name!r}, which is not one of the tools", param="tool_choice")
        if not self.tokenizer.renders_tools:
            raise ProtocolError("this model's chat template does not render tools; it cannot be offered any",
                                param="tools")
        return tools

    def _chat_constraint(self, body: ChatCompletionRequest, plan: _Plan, mode: str, name: str | None) -> None:
        spec = body.constraint_spec()
        plan.spec_param = "structured_outputs" if body.structured_outputs is not None else "response_format"
        if mode in ("required", "named"):
            if spec is not None:
                raise ProtocolError(f"tool_choice {mode!r} cannot be combined with {plan.spec_param}",
                                    param="tool_choice")
            if body.constraint_mode == "exact":
                raise ProtocolError("tool calls are constrained in the default mode only", param="constraint_mode")
            functions = [plan.tools.functions[name]] if name else list(plan.tools.functions.values())
            parallel = body.parallel_tool_calls is not False and name is None
            try:
                grammar = tool_call_grammar(functions, self.markers, parallel, body.thinking)
            except ConstraintError as exc:
                raise ProtocolError(str(exc), param="tool_choice") from None
            plan.spec, plan.spec_param = ConstraintSpec("grammar", grammar), "tool_choice"
            return
        if spec is not None and body.thinking:
            try:
                spec = after_thinking(spec, self.markers)
            except ConstraintError as exc:
                raise ProtocolError(str(exc), param=plan.spec_param) from None
        plan.spec = spec

    async def _constraints(self, plan: _Plan, n: int) -> list[CanvasConstraint | None]:
        """One compiled constraint per choice, off the event loop (an exact-mode automaton takes up to seconds);
        ProtocolError (400) when the spec cannot compile."""
        if plan.spec is None:
            return [None] * n
        if self.tokenizer is None:
            raise ProtocolError("structured outputs need the model's tokenizer (this checkpoint has none)",
                                param=plan.spec_param)
        if not plan.gen.eos_token_ids:
            raise ProtocolError("structured outputs need the model's end token ids (none are configured)",
                                param=plan.spec_param)
        build = lambda: canvas_constraint(plan.spec, self.tokenizer, self.model.vocab_size, plan.gen.eos_token_ids,
                                          self.model.canvas_length)
        try:
            return [await asyncio.to_thread(build) for _ in range(n)]
        except ConstraintError as exc:
            raise ProtocolError(str(exc), param=plan.spec_param) from None
