"""The request lifecycle between HTTP handlers and the engine.

`EngineWorker` owns the engine and the one thread that steps it while it has work; HTTP handlers never touch
tensors. A `Job` is one HTTP request's generation, with one `Choice` per `n`: each submits an engine request whose
callbacks push events (committed or locked tokens, drafts, the end) onto the job's asyncio queue through
`loop.call_soon_threadsafe`, so the event loop never blocks. A choice turns tokens into text with `TextStream` (a
character split across canvases is held back until complete; a format's marker tokens are kept), cuts it at stop
strings (the user's, and hidden ones such as a text `<|tool_response>` that ends a tool-call turn), and, in chat,
reads it with `ReplyParser` into reasoning, content and tool calls. The streamed deltas and the non-streamed answer
are built by the same code, so they are equal. A client that disconnects cancels its requests (the engine drops
the rows at its next step). A request that fails in the engine fails alone (finish_reason "error");
tests/test_server.py, tests/test_server_fuzz.py and tests/test_openai_*.py check all of this.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request as HTTPRequest

from dgemma.config import GenerationConfig
from dgemma.constrain.canvas import CanvasConstraint
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.server import responses as R
from dgemma.server.metrics import Metrics
from dgemma.server.protocol import ProtocolError, error_body
from dgemma.server.reply import ReplyParser
from dgemma.server.tools import ToolSet
from dgemma.tokenizer import TextStream, Tokenizer

log = logging.getLogger(__name__)


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

    def submit(self, requests: GenerationRequest | list[GenerationRequest]) -> None:
        """Called from the event loop: validation and deque appends, never waits for a step. All of a job's
        requests are queued, or none."""
        requests = requests if isinstance(requests, list) else [requests]
        if len(self.engine.waiting) + len(requests) > self.max_queue:
            raise ProtocolError("the server is busy (request queue full); retry later", status=429,
                                code="rate_limit_exceeded")
        for r in requests:
            self.engine.validate(r)
        for r in requests:
            self.engine.submit(r)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            if self.engine.has_work():
                try:
                    self.engine.step()  # a failure of one row's work fails that request only, inside the step
                except Exception:  # noqa: BLE001 - an error outside any row's work: end what is in flight
                    log.exception("engine step failed outside any single request")
                    self.engine.fail_all("the engine failed; retry the request")
            else:
                self._wake.wait(0.05)
                self._wake.clear()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)


class Choice:
    """One choice of a job: its engine request, its text and, in chat, its reading into reasoning / content / calls."""

    def __init__(self, index: int, request: GenerationRequest, tokenizer: Tokenizer | None, stops: list[str],
                 parser: ReplyParser | None, keep: frozenset[int]) -> None:
        self.index, self.request, self.parser = index, request, parser
        self.stream = TextStream(tokenizer, keep)
        self.matcher = R.StopMatcher(stops)
        self.texts = R.TokenTexts(tokenizer, keep) if request.logprobs is not None else None
        self.text_sent = ""
        self.stopped = False  # a stop string was found
        self.done = False  # its last tokens were read
        self.logprobs_sent = 0  # log-probability entries released
        self.calls_sent = 0

    def cancel(self) -> None:
        if not self.request.done:
            self.request.cancelled = True

    @property
    def failed(self) -> bool:
        return self.request.finish_reason == "error"

    def advance(self, tokens: list[int], final: bool) -> str:
        """Add tokens; return the new text that is safe to send (never retracted later)."""
        self.stream.push(tokens, final)
        if self.texts is not None:
            self.texts.add(tokens)
            if final:
                self.texts.finish()
        text = self.stream.text
        safe, stopped = self.matcher.feed(text)
        if final and not stopped:
            safe = text
        if stopped:
            self.stopped = True
            self.cancel()
        delta = safe[len(self.text_sent):]  # `safe` only grows: the stream's text is append-only
        self.text_sent += delta
        self.done = self.done or final or stopped
        return delta

    def finish_reason(self) -> str:
        reason = "stop" if self.stopped or self.request.finish_reason == "stop" else "length"
        if reason == "stop" and self.parser is not None and self.parser.calls:
            return "tool_calls"
        return reason

    def new_logprobs(self, final: bool) -> tuple[int, int]:
        """The token range whose log-probabilities are released now."""
        if self.texts is None:
            return 0, 0
        lo, hi = self.logprobs_sent, self.texts.released(len(self.text_sent), final)
        self.logprobs_sent = max(lo, hi)
        return lo, max(lo, hi)

    def logprobs_body(self, endpoint: str, lo: int, hi: int) -> dict[str, Any] | None:
        if self.texts is None:
            return None
        req, texts = self.request, self.texts
        full = self.stream.text
        if endpoint == "chat":
            return R.chat_logprobs(texts, full, lo, hi, req.token_logprobs, req.top_logprobs)
        return R.completion_logprobs(texts, full, lo, hi, req.token_logprobs, req.top_logprobs)

    def extension(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": self.request.steps, "token_ids": self.stream.ids}
        if self.parser is not None and self.parser.errors:
            out["tool_call_errors"] = self.parser.errors
        return out


class Job:
    """One HTTP request's generation: engine callbacks in, response bodies and SSE events out."""

    def __init__(self, body: Any, gen: GenerationConfig, prompt: list[int], endpoint: str, model_name: str,
                 tokenizer: Tokenizer | None, metrics: Metrics, constraint: CanvasConstraint | None = None, *,
                 constraints: list[CanvasConstraint] | None = None, tools: ToolSet | None = None,
                 keep: frozenset[int] = frozenset(), hidden_stops: tuple[str, ...] = (),
                 prefix: str | None = None) -> None:
        self.body, self.gen, self.prompt, self.endpoint = body, gen, prompt, endpoint
        self.model_name, self.metrics, self.tokenizer = model_name, metrics, tokenizer
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.started = time.perf_counter()
        n = getattr(body, "choices", 1)
        constraints = constraints or [constraint] * n
        seed = body.seed if body.seed is not None else uuid.uuid4().int % (2**31)
        first = GenerationRequest(prompt=prompt, gen=gen, seed=seed, constraint=constraints[0],
                                  logprobs=body.top_logprob_count() if hasattr(body, "top_logprob_count") else None,
                                  prefix=prefix)
        self.choices: list[Choice] = []
        for i, req in enumerate(first.choices(n)):
            req.constraint = constraints[i]
            req.on_tokens = self._tokens_callback(i)
            req.on_draft = self._draft_callback(i) if body.draft else None
            parser = ReplyParser(tools) if endpoint == "chat" else None
            self.choices.append(Choice(i, req, tokenizer, list(body.stop or []) + list(hidden_stops), parser, keep))

    # compatibility with a single-choice job
    @property
    def request(self) -> GenerationRequest:
        return self.choices[0].request

    @property
    def text_sent(self) -> str:
        return self.choices[0].text_sent

    def advance(self, tokens: list[int], final: bool) -> str:
        return self.choices[0].advance(tokens, final)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [c.request for c in self.choices]

    # engine thread -> event loop
    def _tokens_callback(self, index: int):
        def on_tokens(req: GenerationRequest, tokens: list[int]) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, "tokens", list(tokens), req.done))
        return on_tokens

    def _draft_callback(self, index: int):
        def on_draft(req: GenerationRequest, canvas: list[int]) -> None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, "draft", canvas, False))
        return on_draft

    def cancel(self) -> None:
        for c in self.choices:
            c.cancel()

    @property
    def failed(self) -> bool:
        return any(c.failed for c in self.choices)

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)

    async def next_event(self, http: HTTPRequest) -> tuple[int, str, Any, bool] | None:
        """The next engine event, or None once the client has gone (the requests are then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if await http.is_disconnected():
                    self.cancel()
                    return None
                for c in self.choices:
                    if c.request.done and not c.done and self.events.empty():
                        return (c.index, "tokens", [], True)

    async def run_to_end(self, http: HTTPRequest) -> bool:
        """Consume events until every choice is complete; False if the client left first."""
        while not self.finished:
            event = await self.next_event(http)
            if event is None:
                return False
            index, kind, payload, final = event
            choice = self.choices[index]
            if kind == "tokens" and not choice.done:
                choice.advance(payload, final or choice.request.done)
                if choice.done:
                    self.record(choice)
        return True

    def record(self, c: Choice) -> None:
        req = c.request
        ttft = req.first_token_at - req.submitted_at if req.first_token_at is not None else None
        wait = req.admitted_at - req.submitted_at if req.admitted_at is not None else None
        self.metrics.record(len(self.prompt) if c.index == 0 else 0, len(c.stream.ids), req.steps,
                            time.perf_counter() - self.started, ttft, c.failed, req.constraint, wait)
        if req.prefix_stats is not None:
            self.metrics.record_prefix(req.prefix_stats)
        if c.parser is not None:
            c.parser.feed(c.text_sent, final=True)
            self.metrics.record_tools(len(c.parser.calls), len(c.parser.errors))

    def usage(self) -> dict[str, int]:
        n = sum(len(c.stream.ids) for c in self.choices)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n}

    def final_body(self) -> dict[str, Any]:
        return R.body(self.endpoint, self.id, self.model_name, [self._choice_body(c) for c in self.choices],
                      self.usage(), self.choices[0].extension())

    def _choice_body(self, c: Choice) -> dict[str, Any]:
        lo, hi = c.new_logprobs(final=True)
        logprobs = c.logprobs_body(self.endpoint, 0, hi)
        if self.endpoint != "chat":
            return {**R.text_choice(c.index, c.text_sent, c.finish_reason(), logprobs), "dgemma": c.extension()}
        p = c.parser
        p.feed(c.text_sent, final=True)
        calls = [call.body() for call in p.calls]
        return {**R.chat_choice(c.index, p.content_or_none(), p.reasoning, calls, c.finish_reason(), logprobs),
                "dgemma": c.extension()}

    def error_message(self) -> str:
        failed = next((c for c in self.choices if c.failed), self.choices[0])
        return f"generation failed: {failed.request.error or 'internal error'}"

    async def sse_events(self, http: HTTPRequest) -> AsyncIterator[str]:
        """The SSE stream of this job, ending in `[DONE]` (or an error event if generation fails)."""
        opts = self.body.stream_options
        with_usage = opts is not None and opts.include_usage
        try:
            if self.endpoint == "chat":
                for c in self.choices:
                    yield self._sse(R.chat_delta(c.index, {"role": "assistant"}), with_usage)
            while not self.finished:
                event = await self.next_event(http)
                if event is None:
                    return
                index, kind, payload, final = event
                c = self.choices[index]
                if kind == "draft":
                    text = self.tokenizer.decode(payload) if self.tokenizer is not None else ""
                    yield R.sse({"id": self.id, "index": index, "canvas": payload, "text": text}, event="draft")
                    continue
                if c.done:
                    continue
                for piece in self._deltas(c, payload, final or c.request.done):
                    yield self._sse(piece, with_usage)
                if c.done:
                    self.record(c)
                    if c.failed:
                        yield R.sse(error_body(self.error_message(), "server_error"), event="error")
                        return
                    yield self._sse(self._finish(c), with_usage)
            if with_usage:
                yield R.sse({**R.chunk(self.endpoint, self.id, self.model_name, {}), "choices": [],
                             "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # client gone or stream closed: free the rows

    def _sse(self, choice: dict[str, Any], with_usage: bool) -> str:
        obj = R.chunk(self.endpoint, self.id, self.model_name, choice)
        return R.sse({**obj, "usage": None} if with_usage else obj)

    def _deltas(self, c: Choice, tokens: list[int], final: bool) -> list[dict[str, Any]]:
        """The chunks (choice objects) that one engine event of choice `c` releases."""
        text = c.advance(tokens, final)
        lo, hi = c.new_logprobs(c.done)
        logprobs = c.logprobs_body(self.endpoint, lo, hi) if hi > lo else None
        if self.endpoint != "chat":
            return [R.text_choice(c.index, text, None, logprobs)] if text or logprobs else []
        d = c.parser.feed(c.text_sent, c.done)
        delta: dict[str, Any] = {}
        if d.reasoning:
            delta["reasoning_content"] = d.reasoning
        if d.content:
            delta["content"] = d.content
        if d.tool_calls:
            delta["tool_calls"] = [call.body(index=c.calls_sent + k) for k, call in enumerate(d.tool_calls)]
            c.calls_sent += len(d.tool_calls)
        return [R.chat_delta(c.index, delta, None, logprobs)] if delta or logprobs else []

    def _finish(self, c: Choice) -> dict[str, Any]:
        if self.endpoint == "chat":
            return R.chat_delta(c.index, {}, c.finish_reason())
        return R.text_choice(c.index, "", c.finish_reason(), None)
