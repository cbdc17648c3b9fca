"""OpenAI-compatible request schemas, their mapping onto `GenerationConfig`, and the response bodies.

Every field is either honoured or refused with HTTP 400 (never silently ignored): unknown fields, `n > 1`,
`logprobs`, tools, `top_p`/`top_k` other than neutral values are refused. Types are strict, as OpenAI's: a
boolean is not an integer, a string is not a number or a boolean; floats are finite.
Structured outputs: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) or vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar` in Lark syntax, `json_object`), with the extensions
`constraint_mode` ("default" or "exact") and `json_whitespace` ("compact", the default, or "flexible").
Extensions (not in the OpenAI API): `max_denoising_steps`, `entropy_bound`, `confidence_threshold`, and
`draft` (stream the argmax canvas after every denoising step as `event: draft` SSE events).

Temperature: the sampler has no single temperature but a schedule from t_max to t_min (checkpoint default
0.8 -> 0.4). The OpenAI `temperature` (default 1) multiplies both ends; values below GREEDY_SCALE (0
included) are clamped to it, a near-greedy schedule. tests/test_server.py and tests/test_server_fuzz.py
exercise these rules over HTTP.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dgemma.config import (
    MAX_CONFIDENCE_THRESHOLD,
    MAX_ENTROPY_BOUND,
    SEED_RANGE,
    GenerationConfig,
    UserError,
)
from dgemma.constrain.spec import ConstraintError, ConstraintSpec

GREEDY_SCALE = 1e-4
MAX_JSON_DEPTH = 32  # nesting of a request body (objects and arrays); deeper bodies get 400
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ProtocolError(UserError):
    """A request the server refuses: HTTP `status` with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.code, self.param)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}. Text taken from a request (a
    field name) may hold lone surrogates, which have no UTF-8 form: they are written as escapes."""
    return {"error": {"message": _printable(message), "type": kind, "param": _printable(param), "code": code}}


def _printable(text: str | None) -> str | None:
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


# -- parsing a body ---------------------------------------------------------------------------------------
def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """Bytes of a request body -> a validated `schema` instance, or ProtocolError (400) saying what is wrong:
    empty, not UTF-8, not JSON (NaN and Infinity are not JSON), nested deeper than MAX_JSON_DEPTH, a string with
    a lone surrogate (no UTF-8 form), or a field the schema refuses (named in `param`)."""
    if not raw.strip():
        raise ProtocolError("request body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ProtocolError(f"request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise ProtocolError(f"request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"request body must be a JSON object, not {type(data).__name__}")
    _check_tree(data)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_path(data, first.get("loc", ()))
        message = first.get("msg", "invalid value")
        raise ProtocolError(f"{param}: {message}" if param else message, param=param or None) from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(data: Any) -> None:
    """Depth and string validity of parsed JSON, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ProtocolError(f"request body is nested deeper than {MAX_JSON_DEPTH} levels")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, value in items:
                sub = f"{path}.{key}" if path else str(key)
                if isinstance(key, str):
                    _check_string(key, sub)
                stack.append((value, depth + 1, sub))
        elif isinstance(node, str):
            _check_string(node, path)


def _check_string(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ProtocolError(f"{path or 'body'}: string holds a lone surrogate at character {exc.start} "
                            "(not valid Unicode)", param=path or None) from None


def _param_path(data: Any, loc: tuple) -> str:
    """The input path of a validation error: the parts of `loc` that exist in the input (pydantic adds union
    member tags such as 'str' that are not part of the request)."""
    parts, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and not parts:  # a missing required field
            parts.append(str(part))
            break
        else:
            break
        parts.append(str(part))
    return ".".join(parts)


# -- schemas -----------------------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one of these."""

    model_config = _STRICT
    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class _Common(BaseModel):
    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    logprobs: bool | int | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None
    constraint_mode: Literal["default", "exact"] = "default"
    json_whitespace: Literal["compact", "flexible"] = "compact"
    # extensions
    max_denoising_steps: int | None = Field(default=None, ge=1, le=1024)
    entropy_bound: float | None = Field(default=None, gt=0.0, le=MAX_ENTROPY_BOUND)
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=MAX_CONFIDENCE_THRESHOLD)
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
        if self.logprobs not in (None, False, 0):
            raise ProtocolError("logprobs are not supported", param="logprobs")
        if self.top_p not in (None, 1.0):
            raise ProtocolError("top_p is not supported (the sampler is entropy-bounded); omit it or use 1",
                                param="top_p")

    def constraint_spec(self) -> ConstraintSpec | None:
        """The structured-output constraint the request asks for (None: free text); ProtocolError names the field
        when it is malformed (the backend compiles it later and may still refuse it)."""
        fmt, so = self.response_format, self.structured_outputs
        if fmt is not None and fmt.get("type") != "text" and so is not None:
            raise ProtocolError("give either response_format or structured_outputs, not both", param="response_format")
        try:
            kind, value = _format_kind(fmt) if so is None else _structured_kind(so)
            if kind is None:
                return None
            whitespace = self.json_whitespace if kind in ("json_schema", "json_object") else "compact"
            return ConstraintSpec(kind, value, whitespace=whitespace, mode=self.constraint_mode)
        except ConstraintError as exc:
            raise ProtocolError(str(exc), param="structured_outputs" if so is not None else "response_format") from None

    def generation_config(self, base: GenerationConfig, default_max_tokens: int) -> GenerationConfig:
        self.refuse_unsupported()
        t_min, t_max = base.t_min, base.t_max
        if self.temperature is not None:
            scale = max(self.temperature, GREEDY_SCALE)  # documented clamp: 0 and tiny values are near-greedy
            t_min, t_max = base.t_min * scale, base.t_max * scale
        try:
            return base.replace(max_new_tokens=self.max_tokens or default_max_tokens, t_min=t_min, t_max=t_max,
                                max_denoising_steps=self.max_denoising_steps, entropy_bound=self.entropy_bound,
                                confidence_threshold=self.confidence_threshold)
        except UserError as exc:
            raise ProtocolError(str(exc)) from None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
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
    best_of: int | None = Field(default=None, ge=1)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ProtocolError("echo is not supported", param="echo")
        if self.suffix:
            raise ProtocolError("suffix (infilling) is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ProtocolError("best_of is not supported", param="best_of")
        if not self.prompt:
            raise ProtocolError("prompt is empty", param="prompt")


def _format_kind(fmt: dict[str, Any] | None) -> tuple[str | None, Any]:
    """OpenAI's response_format -> (constraint kind or None, value)."""
    if fmt is None or fmt.get("type") == "text":
        if fmt is not None and set(fmt) != {"type"}:
            raise ProtocolError("response_format of type text takes no other fields", param="response_format")
        return None, None
    kind = fmt.get("type")
    if kind == "json_object":
        if set(fmt) != {"type"}:
            raise ProtocolError("response_format of type json_object takes no other fields", param="response_format")
        return "json_object", None
    if kind != "json_schema":
        raise ProtocolError(f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                            param="response_format.type")
    spec = fmt.get("json_schema")
    if set(fmt) != {"type", "json_schema"} or not isinstance(spec, dict):
        raise ProtocolError("response_format of type json_schema needs a json_schema object "
                            '{"name", "schema", "strict"}', param="response_format.json_schema")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise ProtocolError(f"response_format.json_schema has unknown fields {sorted(unknown)}",
                            param="response_format.json_schema")
    if not isinstance(spec.get("name"), str) or not isinstance(spec.get("schema", {}), dict):
        raise ProtocolError("response_format.json_schema needs a string name and an object schema",
                            param="response_format.json_schema")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ProtocolError("response_format.json_schema.strict must be a boolean",
                            param="response_format.json_schema.strict")
    return "json_schema", spec.get("schema", {})


def _structured_kind(so: StructuredOutputs) -> tuple[str | None, Any]:
    given = {k: v for k, v in (("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                ("grammar", so.grammar), ("json_object", so.json_object or None)) if v is not None}
    if len(given) != 1:
        raise ProtocolError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
                            param="structured_outputs")
    (kind, value), = given.items()
    return kind, (None if kind == "json_object" else value)


# -- responses ---------------------------------------------------------------------------------------------
def completion_body(endpoint: str, request_id: str, model: str, text: str, finish_reason: str,
                    usage: dict[str, int], extra: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed response of /v1/chat/completions (`endpoint` "chat") or /v1/completions."""
    common = {"id": request_id, "created": int(time.time()), "model": model, "usage": usage, "dgemma": extra}
    if endpoint == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"object": "chat.completion", "choices": [choice], **common}
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"object": "text_completion", "choices": [choice], **common}


def chunk_body(endpoint: str, request_id: str, model: str, delta: str | None, finish: str | None,
               role: bool = False) -> dict[str, Any]:
    """One streamed chunk (a text delta, the role announcement, or the finish reason)."""
    base = {"id": request_id, "created": int(time.time()), "model": model}
    if endpoint == "chat":
        d: dict[str, Any] = {}
        if role:
            d["role"] = "assistant"
        if delta:
            d["content"] = delta
        return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
                **base}
    return {"object": "text_completion", "choices": [{"index": 0, "text": delta or "", "finish_reason": finish,
                                                      "logprobs": None}], **base}


def sse(obj: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


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
