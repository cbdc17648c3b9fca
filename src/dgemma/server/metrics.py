"""Server metrics for `GET /metrics`, with `prometheus_client`: one registry per app (a process may hold several).

Counters: responses by endpoint and status (`dgemma_requests_total`), prompt and generated tokens, canvases,
denoising steps, failed generations, constrained generations with their steps and mask time, tool calls returned
and calls that did not parse (returned as content), and the settled-prefix measurement (`sampler/prefix.py`):
canvases measured, their answer tokens, tokens that would have been locked, false locks, and the steps by which
rightly locked tokens were early. Gauges: queue depth and active rows, read from the worker at scrape time.
Histograms: time to first token, request latency, queue wait, steps per canvas, tokens per forward (per
generation), and the fraction of a canvas's steps after which its first token settles.
Each choice of a request (`n`) is one generation. tests/test_openai_api.py scrapes them over HTTP.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dgemma.sampler.prefix import PrefixStats

prometheus_client.disable_created_metrics()  # no `_created` series: counters here start with the app

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256)
TOKENS_PER_FORWARD = (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256)
FRACTION = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        c = lambda name, doc, labels=(): Counter(name, doc, labels, registry=r)
        self.requests = c("dgemma_requests", "HTTP responses of the generation routes", ("endpoint", "status"))
        self.prompt_tokens = c("dgemma_prompt_tokens", "prompt tokens of finished generations")
        self.generated_tokens = c("dgemma_generated_tokens", "tokens returned by finished generations")
        self.canvases = c("dgemma_canvases", "canvases committed")
        self.steps = c("dgemma_denoising_steps", "denoising steps (summed over generations)")
        self.failed = c("dgemma_failed_requests", "generations that failed in the engine")
        self.constrained = c("dgemma_constrained_requests", "generations with a structured-output constraint")
        self.constrained_steps = c("dgemma_constrained_steps", "steps those constraints took part in")
        self.mask_seconds = c("dgemma_constraint_mask_seconds", "time spent on their masks (or exact marginals)")
        self.tool_calls = c("dgemma_tool_calls", "tool calls returned")
        self.tool_call_failures = c("dgemma_tool_call_parse_failures", "calls that did not parse or validate "
                                    "(returned as content)")
        self.prefix_canvases = c("dgemma_prefix_canvases", "canvases whose settled prefix was measured")
        self.prefix_answer_tokens = c("dgemma_prefix_answer_tokens", "answer tokens of those canvases")
        self.prefix_locked = c("dgemma_prefix_locked_tokens", "of them, settled (would be locked) before the commit")
        self.prefix_false = c("dgemma_prefix_false_locks", "settled tokens that differ from the committed ones")
        self.prefix_lead = c("dgemma_prefix_lead_steps", "steps by which rightly settled tokens were known early")
        g = lambda name, doc: Gauge(name, doc, registry=r)
        self.queue_depth = g("dgemma_queue_depth", "requests waiting for a row")
        self.active = g("dgemma_active_requests", "rows in use")
        h = lambda name, doc, buckets: Histogram(name, doc, buckets=buckets, registry=r)
        self.ttft = h("dgemma_time_to_first_token_seconds", "submission to first returned token", SECONDS)
        self.latency = h("dgemma_request_latency_seconds", "submission to the end of a generation", SECONDS)
        self.queue_wait = h("dgemma_queue_wait_seconds", "submission to admission into a row", SECONDS)
        self.steps_per_canvas = h("dgemma_steps_per_canvas", "denoising steps of each canvas", STEPS)
        self.tokens_per_forward = h("dgemma_tokens_per_forward", "returned tokens / denoiser calls, per generation",
                                    TOKENS_PER_FORWARD)
        self.first_lock = h("dgemma_prefix_first_lock_fraction", "fraction of a canvas's steps after which its "
                            "first token settled", FRACTION)

    def count(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def record(self, prompt_tokens: int, tokens: int, steps: list[int], latency: float, ttft: float | None,
               failed: bool = False, constraint=None, queue_wait: float | None = None) -> None:
        """One finished generation: its sizes, steps per canvas, latency, time to first token and queue wait, and
        the cost of its constraint (a `CanvasConstraint`) if it had one."""
        self.failed.inc(failed)
        if constraint is not None:
            self.constrained.inc()
            self.constrained_steps.inc(constraint.steps)
            self.mask_seconds.inc(constraint.mask_seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(tokens)
        self.canvases.inc(len(steps))
        self.steps.inc(sum(steps))
        for s in steps:
            self.steps_per_canvas.observe(s)
        if sum(steps):
            self.tokens_per_forward.observe(tokens / sum(steps))
        self.latency.observe(latency)
        if ttft is not None:
            self.ttft.observe(ttft)
        if queue_wait is not None:
            self.queue_wait.observe(queue_wait)

    def record_prefix(self, stats: PrefixStats) -> None:
        self.prefix_canvases.inc(stats.canvases)
        self.prefix_answer_tokens.inc(stats.answer_tokens)
        self.prefix_locked.inc(stats.locked_tokens)
        self.prefix_false.inc(stats.false_locks)
        self.prefix_lead.inc(stats.lead_steps)
        for fraction in stats.first_lock_fraction:
            self.first_lock.observe(fraction)

    def record_tools(self, calls: int, failures: int) -> None:
        self.tool_calls.inc(calls)
        self.tool_call_failures.inc(failures)

    def render(self, queue_depth: int, active: int) -> bytes:
        self.queue_depth.set(queue_depth)
        self.active.set(active)
        return prometheus_client.generate_latest(self.registry)
