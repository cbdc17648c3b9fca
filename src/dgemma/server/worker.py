"""The request lifecycle between HTTP handlers and the engine.

`EngineWorker` owns the engine and the one thread that steps it while it has work; HTTP handlers never touch
tensors. A `Job` is one HTTP request's generation: it submits an engine request whose callbacks push events
(committed tokens, drafts, the end) onto the job's asyncio queue through `loop.call_soon_threadsafe`, so the
event loop never blocks. A job turns committed tokens into text with `TextStream` (a character split across
canvases is held back until complete) and cuts it at stop strings; the streamed deltas and the non-streamed
answer are built by the same code, so they are equal. A client that disconnects cancels its request (the
engine drops the row at its next step). A request that fails in the engine fails alone (finish_reason
"error"); tests/test_server.py and tests/test_server_fuzz.py check both.
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
from dgemma.server.metrics import Metrics
from dgemma.server.protocol import ProtocolError, StopMatcher, chunk_body, completion_body, error_body, sse
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

    def submit(self, request: GenerationRequest) -> None:
        """Called from the event loop: validation and a deque append, never waits for a step."""
        if len(self.engine.waiting) >= self.max_queue:
            raise ProtocolError("the server is busy (request queue full); retry later", status=429,
                                code="rate_limit_exceeded")
        self.engine.submit(request)
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


class Job:
    """One HTTP request's generation: engine callbacks in, text deltas out."""

    def __init__(self, body: Any, gen: GenerationConfig, prompt: list[int], endpoint: str, model_name: str,
                 tokenizer: Tokenizer | None, metrics: Metrics, constraint: CanvasConstraint | None = None) -> None:
        self.body, self.gen, self.prompt, self.endpoint = body, gen, prompt, endpoint
        self.model_name, self.metrics = model_name, metrics
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.stream = TextStream(tokenizer)
        self.tokenizer = tokenizer
        self.matcher = StopMatcher(body.stop or [])
        self.text_sent = ""
        self.stopped = False  # a stop string was found
        self.id = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.started = time.perf_counter()
        seed = body.seed if body.seed is not None else uuid.uuid4().int % (2**31)
        self.request = GenerationRequest(prompt=prompt, gen=gen, seed=seed, on_tokens=self._on_tokens,
                                         on_draft=self._on_draft if body.draft else None, constraint=constraint)

    # engine thread -> event loop
    def _on_tokens(self, req: GenerationRequest, tokens: list[int]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("tokens", list(tokens), req.done))

    def _on_draft(self, req: GenerationRequest, canvas: list[int]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, ("draft", canvas, False))

    def cancel(self) -> None:
        if not self.request.done:
            self.request.cancelled = True

    @property
    def failed(self) -> bool:
        return self.request.finish_reason == "error"

    def advance(self, tokens: list[int], final: bool) -> str:
        """Add committed tokens; return the new text that is safe to send (never retracted later)."""
        self.stream.push(tokens, final)
        text = self.stream.text
        safe, stopped = self.matcher.feed(text)
        if final and not stopped:
            safe = text
        if stopped:
            self.stopped = True
            self.cancel()
        delta = safe[len(self.text_sent):]  # `safe` only grows: the stream's text is append-only
        self.text_sent += delta
        return delta

    async def next_event(self, http: HTTPRequest) -> tuple[str, Any, bool] | None:
        """The next engine event, or None once the client has gone (the request is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if await http.is_disconnected():
                    self.cancel()
                    return None
                if self.request.done and self.events.empty():
                    return ("tokens", [], True)

    async def run_to_end(self, http: HTTPRequest) -> bool:
        """Consume events until the answer is complete; False if the client left first."""
        while not self.stopped:
            event = await self.next_event(http)
            if event is None:
                return False
            kind, payload, final = event
            if kind == "tokens":
                self.advance(payload, final or self.request.done)
                if final or self.request.done:
                    break
        self.record()
        return True

    def finish_reason(self) -> str:
        if self.stopped or self.request.finish_reason == "stop":
            return "stop"
        return "length"

    def record(self) -> None:
        req = self.request
        ttft = req.first_token_at - req.submitted_at if req.first_token_at is not None else None
        self.metrics.record(len(self.prompt), len(self.stream.ids), req.steps, time.perf_counter() - self.started,
                            ttft, self.failed, req.constraint)

    def usage(self) -> dict[str, int]:
        n = len(self.stream.ids)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": n, "total_tokens": len(self.prompt) + n}

    def final_body(self) -> dict[str, Any]:
        return completion_body(self.endpoint, self.id, self.model_name, self.text_sent, self.finish_reason(),
                               self.usage(), {"steps": self.request.steps, "token_ids": self.stream.ids})

    def error_message(self) -> str:
        return f"generation failed: {self.request.error or 'internal error'}"

    async def sse_events(self, http: HTTPRequest) -> AsyncIterator[str]:
        """The SSE stream of this job, ending in `[DONE]` (or an error event if generation fails)."""
        chunk = lambda delta, finish, role=False: chunk_body(self.endpoint, self.id, self.model_name, delta,
                                                             finish, role)
        try:
            if self.endpoint == "chat":
                yield sse(chunk(None, None, role=True))
            while not self.stopped:
                event = await self.next_event(http)
                if event is None:
                    return
                kind, payload, final = event
                if kind == "draft":
                    text = self.tokenizer.decode(payload) if self.tokenizer is not None else ""
                    yield sse({"id": self.id, "canvas": payload, "text": text}, event="draft")
                    continue
                delta = self.advance(payload, final or self.request.done)
                if delta:
                    yield sse(chunk(delta, None))
                if final or self.request.done:
                    break
            self.record()
            if self.failed:
                yield sse(error_body(self.error_message(), "server_error"), event="error")
                return
            yield sse(chunk(None, self.finish_reason()))
            opts = self.body.stream_options
            if opts is not None and opts.include_usage:
                yield sse({**chunk(None, None), "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # client gone or stream closed: free the row
