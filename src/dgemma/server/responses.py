"""OpenAI response bodies: whole answers, streamed chunks, log-probabilities, and the stop-string cut.

Chat choices carry `message` {role, content, reasoning_content (with thinking), tool_calls}; completion choices
`text`. Streamed chunks carry one choice's delta each (`index` tells the choice), the finish reason in a chunk of
its own, and with `stream_options.include_usage` a last chunk with `choices: []` and the usage of all choices.

Log-probabilities (`TokenTexts`): each returned token's text is its share of the decoded answer (a token that ends
inside a character has "" and the character goes to the token that completes it), `bytes` its UTF-8. A choice
lists the tokens whose text lies within the returned text (cut at a stop string: a token that straddles the cut
is listed, one wholly after it is not). Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions:
{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}. A token a filter or a grammar ruled out
has log-probability -inf, which JSON cannot hold: it is written LOGPROB_FLOOR (-9999.0, vLLM's convention).
"""

from __future__ import annotations

import json
import time
from typing import Any

from dgemma.tokenizer import Tokenizer

LOGPROB_FLOOR = -9999.0
_WINDOW = 8  # tokens of context when measuring what a token adds to the text (a character spans at most 4)


def _lp(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def sse(obj: dict[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def body(endpoint: str, request_id: str, model: str, choices: list[dict[str, Any]], usage: dict[str, int],
         extra: dict[str, Any]) -> dict[str, Any]:
    """The non-streamed response of /v1/chat/completions (`endpoint` "chat") or /v1/completions."""
    obj = "chat.completion" if endpoint == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage, "dgemma": extra}


def chat_choice(index: int, content: str | None, reasoning: str | None, tool_calls: list[dict[str, Any]],
                finish_reason: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def text_choice(index: int, text: str, finish_reason: str, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk(endpoint: str, request_id: str, model: str, choice: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def chat_delta(index: int, delta: dict[str, Any], finish: str | None = None,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


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


class TokenTexts:
    """Each returned token's share of the decoded text (offsets into it), grown as tokens arrive."""

    def __init__(self, tokenizer: Tokenizer | None, keep: frozenset[int]) -> None:
        self.tok, self.keep = tokenizer, keep
        self.ids: list[int] = []
        self.ends: list[int] = []  # end offset of each token's text

    def add(self, ids: list[int]) -> None:
        """Each new token's end offset: what it adds to the decode of the few tokens before it (enough to complete
        any character, so the sum is the whole decode's length for a prefix-consistent decoder, as byte-level and
        byte-fallback ones are), without decoding the whole answer again per token."""
        for t in ids:
            self.ids.append(t)
            if self.tok is None:
                self.ends.append(0)
                continue
            i = len(self.ids) - 1
            window = self.ids[max(0, i - _WINDOW):]
            grown = len(self._text(window)) - len(self._text(window[:-1]))
            self.ends.append((self.ends[-1] if self.ends else 0) + max(grown, 0))

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, keep=self.keep).rstrip("\ufffd") if ids else ""

    def finish(self) -> None:
        """The answer is complete: a character left incomplete at its end (decoded as U+FFFD) belongs to its last
        token."""
        if self.ids and self.tok is not None:
            self.ends[-1] = max(self.ends[-1], len(self.tok.decode(self.ids, keep=self.keep)))

    def starts(self) -> list[int]:
        return [0, *self.ends[:-1]]

    def released(self, length: int, final: bool) -> int:
        """How many leading tokens lie within text[:length] (whole; with `final`, also those that start in it)."""
        starts = self.starts()
        n = 0
        for i, end in enumerate(self.ends):
            if end <= length or (final and starts[i] < length):
                n = i + 1
        return n

    def text_of(self, i: int, full: str) -> str:
        return full[self.starts()[i]:self.ends[i]]

    def token_text(self, token: int) -> str:
        return self.tok.decode([token], keep=self.keep) if self.tok is not None else ""


def chat_logprobs(texts: TokenTexts, full: str, lo: int, hi: int, logprobs: list[float],
                  tops: list[list[tuple[int, float]]]) -> dict[str, Any]:
    """Tokens lo..hi-1 in chat's format."""
    entry = lambda text, lp: {"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8"))}
    content = []
    for i in range(lo, hi):
        item = entry(texts.text_of(i, full), logprobs[i])
        item["top_logprobs"] = [entry(texts.token_text(t), v) for t, v in tops[i]] if tops else []
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(texts: TokenTexts, full: str, lo: int, hi: int, logprobs: list[float],
                        tops: list[list[tuple[int, float]]], offset: int = 0) -> dict[str, Any]:
    """Tokens lo..hi-1 in the legacy completions format; text offsets from `offset`."""
    starts = texts.starts()
    return {"tokens": [texts.text_of(i, full) for i in range(lo, hi)],
            "token_logprobs": [_lp(v) for v in logprobs[lo:hi]],
            "top_logprobs": [{texts.token_text(t): _lp(v) for t, v in tops[i]} for i in range(lo, hi)] if tops
            else None,
            "text_offset": [offset + starts[i] for i in range(lo, hi)]}
