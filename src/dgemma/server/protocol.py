"""OpenAI-compatible request schemas and their mapping onto `GenerationConfig` (response bodies: responses.py).

Every field is either honoured or refused with HTTP 400 naming it (never silently ignored): unknown fields,
`presence_penalty` / `frequency_penalty` other than 0, `echo`, `suffix`, `best_of` > 1, `n` above MAX_N, and every
unsupported combination (`refuse_unsupported`, `ChatCompletionRequest.check_tools`). Types are strict, as OpenAI's:
a boolean is not an integer, a string is not a number or a boolean; floats are finite.
Sampling: `temperature`, `top_p`, `top_k` (vLLM's; -1 or 0: off), `min_p`, `seed`, `n` (choice i > 0 draws with
a seed derived from (seed, i)), `logprobs` (+ `top_logprobs` in chat; an integer in completions).
Tools (chat): `tools`, `tool_choice` ("auto", "none", "required", or a named function), `parallel_tool_calls`,
assistant messages with `tool_calls` and `tool` messages in the history; `chat_template_kwargs.enable_thinking`.
Structured outputs: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) or vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `grammar` in Lark syntax, `json_object`), with the extensions
`constraint_mode` ("default" or "exact") and `json_whitespace` ("compact", the default, or "flexible").
Extensions (not in the OpenAI API): `max_denoising_steps`, `entropy_bound`, `confidence_threshold`, `draft`
(stream the argmax canvas after every denoising step as `event: draft` SSE events) and `stream_mode` ("canvas",
the default, or "prefix": each canvas's settled prefix is streamed and locked as it settles, sampler/prefix.py).

Temperature: the sampler has no single temperature but a schedule from t_max to t_min (checkpoint default
0.8 -> 0.4). The OpenAI `temperature` (default 1) multiplies both ends; values below GREEDY_SCALE (0
included) are clamped to it, a near-greedy schedule. tests/test_server.py and tests/test_server_fuzz.py
exercise these rules over HTTP.
"""

from __future__ import annotations

import json
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
MAX_N = 8  # choices per request (each takes a row of the engine)
MAX_TOP_LOGPROBS = 20
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


# -- schemas ---------------------------------------------------------------------------------------------
class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class FunctionCallIn(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCallIn(BaseModel):
    model_config = _STRICT
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    def for_template(self, i: int) -> dict[str, Any]:
        """The message as a chat template reads it: text parts joined, tool-call arguments as objects."""
        content = "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content
        where = f"messages.{i}"
        if content is None and not (self.role == "assistant" and self.tool_calls):
            raise ProtocolError(f"{where}.content is required (only an assistant message with tool_calls may omit "
                                "it)", param=f"{where}.content")
        if self.tool_calls and self.role != "assistant":
            raise ProtocolError(f"{where}.tool_calls: only assistant messages make tool calls",
                                param=f"{where}.tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ProtocolError(f"{where}.tool_call_id is required in a tool message", param=f"{where}.tool_call_id")
        out: dict[str, Any] = {"role": self.role, "content": content}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": _arguments(c.function.arguments, f"{where}.tool_calls.{k}")}}
                for k, c in enumerate(self.tool_calls)]
        return out


def _arguments(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{where}.function.arguments is not JSON ({exc})", param=f"{where}.function.arguments") \
            from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}.function.arguments must be a JSON object", param=f"{where}.function.arguments")
    return value


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


class TemplateKwargs(BaseModel):
    """vLLM's `chat_template_kwargs`, as far as dgemma's templates read them."""

    model_config = _STRICT
    enable_thinking: bool = False


class _Common(BaseModel):
    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    n: int | None = Field(default=None, ge=1)
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
    stream_mode: Literal["canvas", "prefix"] = "canvas"

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @property
    def choices(self) -> int:
        return self.n or 1

    def top_logprob_count(self) -> int | None:
        """The engine's `logprobs` setting: None (off), 0 (the chosen token's), or k alternatives too."""
        raise NotImplementedError

    def refuse_unsupported(self) -> None:
        if self.choices > MAX_N:
            raise ProtocolError(f"n must be at most {MAX_N}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0.0):
                raise ProtocolError(f"{name} is not supported (a canvas is sampled in parallel: there is no earlier "
                                    "token of the same canvas to penalise); omit it or use 0", param=name)
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed with stream: true", param="stream_options")
        if self.stream_mode == "prefix" and self.constraint_mode == "exact":
            raise ProtocolError("stream_mode 'prefix' cannot lock a prefix of an exact-mode constraint's canvas; use "
                                "constraint_mode 'default'", param="stream_mode")

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
        top_k = None if self.top_k is None else max(self.top_k, 0)
        try:
            return base.replace(max_new_tokens=self.max_tokens or default_max_tokens, t_min=t_min, t_max=t_max,
                                max_denoising_steps=self.max_denoising_steps, entropy_bound=self.entropy_bound,
                                confidence_threshold=self.confidence_threshold, top_k=top_k, top_p=self.top_p,
                                min_p=self.min_p)
        except UserError as exc:
            raise ProtocolError(str(exc)) from None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: TemplateKwargs | None = None

    def top_logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def thinking(self) -> bool:
        return self.chat_template_kwargs is not None and self.chat_template_kwargs.enable_thinking

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ProtocolError("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ProtocolError("max_tokens and max_completion_tokens disagree", param="max_tokens")
            self.max_tokens = self.max_completion_tokens

    def tool_mode(self) -> tuple[str, str | None]:
        """("none" | "auto" | "required" | "named", the named function); checks tool_choice against tools."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none", "auto"):
                raise ProtocolError("tool_choice needs tools", param="tool_choice")
            return "none", None
        if choice is None or isinstance(choice, str):
            return choice or "auto", None
        fn = choice.get("function")
        if set(choice) != {"type", "function"} or choice.get("type") != "function" or not isinstance(fn, dict) \
                or set(fn) != {"name"} or not isinstance(fn.get("name"), str):
            raise ProtocolError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                                '"function": {"name": ...}}', param="tool_choice")
        return "named", fn["name"]


class CompletionRequest(_Common):
    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)

    def top_logprob_count(self) -> int | None:
        return self.logprobs

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise ProtocolError("echo is not supported", param="echo")
        if self.suffix:
            raise ProtocolError("suffix (infilling) is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise ProtocolError("best_of is not supported (use n)", param="best_of")
        if not self.prompt:
            raise ProtocolError("prompt is empty", param="prompt")


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or messages rendered by the chat template."""

    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: list[int]


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
