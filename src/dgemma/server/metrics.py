"""Server counters and their Prometheus text rendering (`GET /metrics`).

Counters only grow; gauges (queue depth, active rows) are read from the worker at render time. The worker
records a request when it ends; `Metrics.count` records every response status per endpoint.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Metrics:
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    canvases: int = 0
    steps: int = 0
    failed: int = 0
    constrained: int = 0  # requests with a structured-output constraint
    constrained_steps: int = 0
    mask_seconds: float = 0.0  # time spent on their masks (or exact-mode marginals), summed
    latency_sum: float = 0.0
    latency_count: int = 0
    ttft_sum: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def record(self, prompt_tokens: int, tokens: int, steps: list[int], latency: float, ttft: float | None,
               failed: bool = False, constraint: Any = None) -> None:
        """One finished generation: its sizes, its steps per canvas, its latency and time to first token, and the
        cost of its constraint (a `CanvasConstraint`) if it had one."""
        with self._lock:
            self.failed += failed
            if constraint is not None:
                self.constrained += 1
                self.constrained_steps += constraint.steps
                self.mask_seconds += constraint.mask_seconds
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += tokens
            self.canvases += len(steps)
            self.steps += sum(steps)
            self.latency_sum += latency
            self.latency_count += 1
            if ttft is not None:
                self.ttft_sum += ttft

    def render(self, queue_depth: int, active: int) -> str:
        with self._lock:
            lines = ["# TYPE dgemma_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'dgemma_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            lines += [
                "# TYPE dgemma_generated_tokens_total counter",
                f"dgemma_generated_tokens_total {self.generated_tokens}",
                "# TYPE dgemma_prompt_tokens_total counter", f"dgemma_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE dgemma_canvases_total counter", f"dgemma_canvases_total {self.canvases}",
                "# TYPE dgemma_denoising_steps_total counter", f"dgemma_denoising_steps_total {self.steps}",
                "# TYPE dgemma_steps_per_canvas gauge",
                f"dgemma_steps_per_canvas {self.steps / self.canvases if self.canvases else 0.0}",
                "# TYPE dgemma_tokens_per_forward gauge",
                f"dgemma_tokens_per_forward {self.generated_tokens / self.steps if self.steps else 0.0}",
                "# TYPE dgemma_failed_requests_total counter", f"dgemma_failed_requests_total {self.failed}",
                "# TYPE dgemma_constrained_requests_total counter",
                f"dgemma_constrained_requests_total {self.constrained}",
                "# TYPE dgemma_constrained_steps_total counter",
                f"dgemma_constrained_steps_total {self.constrained_steps}",
                "# TYPE dgemma_constraint_mask_seconds_total counter",
                f"dgemma_constraint_mask_seconds_total {self.mask_seconds}",
                "# TYPE dgemma_queue_depth gauge", f"dgemma_queue_depth {queue_depth}",
                "# TYPE dgemma_active_requests gauge", f"dgemma_active_requests {active}",
                "# TYPE dgemma_request_latency_seconds summary",
                f"dgemma_request_latency_seconds_sum {self.latency_sum}",
                f"dgemma_request_latency_seconds_count {self.latency_count}",
                "# TYPE dgemma_time_to_first_token_seconds summary",
                f"dgemma_time_to_first_token_seconds_sum {self.ttft_sum}",
                f"dgemma_time_to_first_token_seconds_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"
