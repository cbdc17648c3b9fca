"""Tokenizer and chat template read from a checkpoint directory, without transformers.

Files: `tokenizer.json` (the `tokenizers` library format), the chat template from
`chat_template.jinja`, `chat_template.json` or `tokenizer_config.json["chat_template"]`, and special
token names from `tokenizer_config.json`. The template is rendered in a sandboxed Jinja environment
with the variables transformers passes (`messages`, `tools`, `add_generation_prompt`, `bos_token`,
`eos_token`, `raise_exception`, plus template keyword arguments such as `enable_thinking`), with
transformers' lenient undefined values (a message without `tool_calls` reads as empty), and the
rendered text is encoded without adding special tokens, as `apply_chat_template(tokenize=True)` does.
Messages may carry OpenAI's tool fields (`tool_calls` with arguments as objects, role `tool` with
`tool_call_id`), which a template such as Gemma 4's renders in its own format.
`decode(keep=...)` keeps chosen special tokens in the text (a format's markers, e.g. Gemma 4's
`<|tool_call>`) while dropping the others. tests/test_tokenizer.py compares with transformers.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from dgemma.config import UserError

log = logging.getLogger(__name__)


class TokenizerError(UserError):
    """Tokenizer files that cannot be used; the message says which."""


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, config: dict[str, Any], chat_template: str | None) -> None:
        self._tok = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.bos_token = _token_name(config.get("bos_token"))
        self.eos_token = _token_name(config.get("eos_token"))
        self.pad_token = _token_name(config.get("pad_token"))
        self._template = None
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_template_error
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            try:
                self._template = env.from_string(chat_template)
            except TemplateError as exc:
                raise TokenizerError(f"chat template does not parse: {exc}") from None

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> Tokenizer | None:
        """The tokenizer of a checkpoint, or None when it has no `tokenizer.json`."""
        path = Path(directory)
        tok_file = path / "tokenizer.json"
        if not tok_file.exists():
            return None
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise TokenizerError(f"{tok_file}: cannot load ({exc})") from None
        config = _read_json(path / "tokenizer_config.json")
        template = None
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = _read_json(path / "chat_template.json").get("chat_template")
        else:
            template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        return cls(tok, config, template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_text(text)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True, keep: frozenset[int] = frozenset()) -> str:
        """The text of `ids`; special tokens are dropped (skip_special_tokens) except those in `keep`, written as
        their names (the runs between them are decoded on their own)."""
        if not keep or not skip_special_tokens:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        parts, run = [], []
        for t in ids:
            if t in keep:
                parts += [self._tok.decode(run, skip_special_tokens=True), self._tok.id_to_token(t)]
                run = []
            else:
                run.append(t)
        parts.append(self._tok.decode(run, skip_special_tokens=True))
        return "".join(parts)

    def special_ids(self, names: list[str]) -> dict[str, int]:
        """Those of `names` that are single special tokens of this tokenizer: name -> id."""
        added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return {name: added[name] for name in names if name in added}

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template reads `tools` (a template that does not would drop them silently)."""
        return self.chat_template is not None and "tools" in self.chat_template

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        if self._template is None:
            raise TokenizerError("this checkpoint has no chat template; pass plain text (--raw) instead")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"message {i} must be an object with 'role' and 'content'")
            if m["content"] is not None or not (m.get("tool_calls") or m["role"] == "tool"):
                _check_text(m["content"], f"message {i}")
        try:
            return self._template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **template_kwargs)
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise TokenizerError(f"chat template failed: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools, **template_kwargs)
        return self.encode(text, add_special_tokens=False)


def _check_text(text: Any, what: str = "text") -> None:
    """Text the tokenizer can take: a str of valid Unicode (no lone surrogates, which have no UTF-8 form)."""
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise TokenizerError(f"{what} is not valid Unicode: lone surrogate {text[exc.start]!r} at "
                             f"character {exc.start}") from None


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot parse ({exc})") from None


class TextStream:
    """The text of a growing list of generated token ids, released in pieces that never change.

    `push(ids)` returns the newly final text. A character whose UTF-8 bytes are split across pushes decodes as
    trailing U+FFFD until its last byte arrives, so trailing U+FFFD are held back until more ids come or the
    stream is finished (`push(ids, final=True)`, which releases everything). The concatenation of the pieces
    equals `tokenizer.decode(all ids)`, which tests/test_tokenizer_cli.py checks for every split point.
    """

    def __init__(self, tokenizer: Tokenizer | None, keep: frozenset[int] = frozenset()) -> None:
        self._tok = tokenizer
        self.keep = keep  # special tokens kept in the text (`Tokenizer.decode`)
        self.ids: list[int] = []
        self.text = ""  # released so far

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids += ids
        if self._tok is None:
            return ""
        full = self._tok.decode(self.ids, keep=self.keep)
        if not final:
            full = full.rstrip("\ufffd")
        if not full.startswith(self.text):
            # a decoder whose output for a prefix is not a prefix of its output for the whole (none of ours):
            # release nothing until it agrees again or the stream ends
            if not final:
                return ""
            log.warning("detokenised text changed after it was streamed; sending what follows the common prefix")
            common = len(os.path.commonprefix([full, self.text]))
            delta = full[common:]
            self.text += delta
            return delta
        delta = full[len(self.text):]
        self.text = full
        return delta
