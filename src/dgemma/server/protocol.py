"""OpenAI-compatible request schemas and their mapping onto `GenerationConfig`.

Every field is either honoured or refused with HTTP 400 (never silently ignored): unknown fields, `n > 1`,
`logprobs`, `response_format`, tools, `top_p`/`top_k` other than neutral values are refused.
Extensions (not in the OpenAI API): `max_denoising_steps`, `entropy_bound`, `confidence_threshold`, and
`draft` (stream the argmax canvas after every denoising step as `event: draft` SSE events).

Temperature: the sampler has no single temperature but a schedule from t_max to t_min (checkpoint default
0.8 -> 0.4). The OpenAI `temperature` (default 1) multiplies both ends; 0 gives a near-greedy schedule
(x 1e-4).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dgemma.config import GenerationConfig

GREEDY_SCALE = 1e-4


class ProtocolError(ValueError):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.code, "param": self.param, "code": None}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    user: str | None = None
    # extensions
    max_denoising_steps: int | None = Field(default=None, ge=1, le=1024)
    entropy_bound: float | None = Field(default=None, gt=0.0)
    confidence_threshold: float | None = Field(default=None, ge=0.0)
    draft: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise ProtocolError("n > 1 is not supported", param="n")
        if self.logprobs:
            raise ProtocolError("logprobs are not supported", param="logprobs")
        if self.top_p not in (None, 1, 1.0):
            raise ProtocolError("top_p is not supported (the sampler is entropy-bounded); omit it or use 1",
                                param="top_p")

    def generation_config(self, base: GenerationConfig, default_max_tokens: int) -> GenerationConfig:
        self.refuse_unsupported()
        t_min, t_max = base.t_min, base.t_max
        if self.temperature is not None:
            scale = self.temperature if self.temperature > 0 else GREEDY_SCALE
            t_min, t_max = base.t_min * scale, base.t_max * scale
        try:
            return base.replace(max_new_tokens=self.max_tokens or default_max_tokens, t_min=t_min, t_max=t_max,
                                max_denoising_steps=self.max_denoising_steps, entropy_bound=self.entropy_bound,
                                confidence_threshold=self.confidence_threshold)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ProtocolError("response_format is not supported (no constrained decoding yet)",
                                param="response_format")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ProtocolError("tools are not supported", param="tools")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ProtocolError("max_tokens and max_completion_tokens disagree", param="max_tokens")
            self.max_tokens = self.max_completion_tokens


class CompletionRequest(_Common):
    prompt: str | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ProtocolError("echo is not supported", param="echo")
        if self.suffix:
            raise ProtocolError("suffix (infilling) is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ProtocolError("best_of is not supported", param="best_of")
        if isinstance(self.prompt, str) and not self.prompt:
            raise ProtocolError("prompt is empty", param="prompt")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ProtocolError("prompt is empty", param="prompt")


class StopMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1

    def feed(self, text: str) -> tuple[str, bool]:
        """`text` is everything generated so far; returns (safe text, stopped)."""
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        return (text[: len(text) - self.hold] if self.hold else text), False
