"""Supervised fine-tuning data: JSONL examples, rendered with the checkpoint's chat template, with canvases aligned
as the model generates them and the loss on the answers only.

One line is one example: `{"messages": [...]}` (OpenAI chat format, roles system / developer / user / assistant /
tool, several turns; assistant turns may make `tool_calls`, with arguments as a JSON object or its text, and a
line may give the `tools` offered) or `{"prompt": ..., "completion": ...}` (plain text, no template). A conversation
gives one training example per assistant turn: the prompt is everything before that turn rendered with the generation
prompt (as `dgemma chat` and the server render it), the response is the turn as the template writes it, up to
and including its end token, filled with the first end id to whole canvases (the response starts a canvas, as
at generation). History and prompts are clean context: the encoder's next-token loss is masked to the answer
(`Batch.loss_mask`), and the diffusion loss covers the answer's canvases only.

`Batches` draws step k's examples as a pure function of (seed, k): every epoch is a new permutation, cut into
windows whose examples are sorted by length before they are grouped, so short examples share batches (less
padding) and a resumed run sees the same batches. tests/test_finetune.py checks the rendering, the masking and
the errors (a malformed line is named by its number).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dgemma.config import ConfigError, SFTData
from dgemma.tokenizer import Tokenizer
from dgemma.train.objective import Batch
from dgemma.train.schedule import step_generator

ROLES = ("system", "developer", "user", "assistant", "tool")
_WINDOW = 16  # batches per length-sorted window


@dataclass
class SFTExample:
    prompt: list[int]
    response: list[int]  # the answer through its end id, filled to whole canvases
    answer_length: int  # tokens of the answer through its end id (what the encoder's loss covers)
    line: int

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


@dataclass
class SFTReport:
    lines: int = 0
    examples: int = 0
    truncated: int = 0
    too_long: list[int] = field(default_factory=list)  # line numbers refused for length

    def summary(self) -> str:
        out = f"{self.lines} lines, {self.examples} examples"
        return out + (f", {self.truncated} prompts truncated" if self.truncated else "")


def load_examples(path: str | Path, tok: Tokenizer, end_ids: tuple[int, ...], canvas_length: int,
                  cfg: SFTData) -> tuple[list[SFTExample], SFTReport]:
    """Every example of a JSONL file. A malformed line raises ConfigError naming its number; examples longer than
    `cfg.max_length` are refused (all of them listed by line) unless `cfg.truncate` cuts their prompts."""
    report = SFTReport()
    examples: list[SFTExample] = []
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        report.lines += 1
        record = _parse(raw, path, number)
        for ex in _examples(record, tok, end_ids, canvas_length, number, path):
            if ex.length > cfg.max_length:
                if not cfg.truncate or len(ex.response) >= cfg.max_length:
                    report.too_long.append(number)
                    continue
                ex.prompt = ex.prompt[ex.length - cfg.max_length:]
                report.truncated += 1
            examples.append(ex)
    if report.too_long:
        lines_ = ", ".join(map(str, report.too_long[:5]))
        raise ConfigError(f"{path}: {len(report.too_long)} example(s) longer than --max-length {cfg.max_length} "
                          f"tokens (lines {lines_}{', ...' if len(report.too_long) > 5 else ''}); raise --max-length "
                          "or pass --truncate to cut their prompts")
    if not examples:
        raise ConfigError(f"{path}: no examples")
    report.examples = len(examples)
    return examples, report


def _parse(raw: str, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}:{number}: not valid JSON ({exc})") from None
    if not isinstance(record, dict) or not ({"messages"} <= set(record) or {"prompt", "completion"} <= set(record)):
        raise ConfigError(f"{path}:{number}: each line must be an object with \"messages\", or with \"prompt\" and "
                          "\"completion\"")
    return record


def _examples(record: dict, tok: Tokenizer, end_ids: tuple[int, ...], c: int, number: int,
              path: Path) -> list[SFTExample]:
    where = f"{path}:{number}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where}: \"messages\" must be a non-empty list")
        messages = [_message(m, i, where) for i, m in enumerate(messages)]
        tools = record.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ConfigError(f"{where}: \"tools\" must be a list of tool definitions")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise ConfigError(f"{where}: no assistant turn to learn from")
        return [_chat_example(messages, i, tok, end_ids, c, number, where, tools) for i in turns]
    prompt, completion = record["prompt"], record["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt:
        raise ConfigError(f"{where}: \"prompt\" and \"completion\" must be strings (the prompt non-empty)")
    answer = tok.encode(completion, add_special_tokens=False) + [end_ids[0]]
    return [_example(tok.encode(prompt), answer, end_ids, c, number)]


def _message(m: Any, i: int, where: str) -> dict[str, Any]:
    """A message checked, with tool-call arguments as objects (as chat templates read them)."""
    shape = (f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}} (an "
             "assistant message with tool_calls may have null content)")
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ConfigError(shape)
    calls = m.get("tool_calls")
    if not isinstance(m.get("content"), str) and not (m.get("content") is None and calls and m["role"] == "assistant"):
        raise ConfigError(shape)
    if calls is None:
        return m
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              and isinstance(c["function"].get("name"), str) for c in calls):
        raise ConfigError(f"{where}: message {i} tool_calls must be a list of {{\"function\": {{\"name\", "
                          "\"arguments\"}}}}")
    out = []
    for k, call in enumerate(calls):
        args = call["function"].get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: message {i} tool call {k}: arguments are not JSON ({exc})") from None
        if not isinstance(args, dict):
            raise ConfigError(f"{where}: message {i} tool call {k}: arguments must be a JSON object")
        out.append({**call, "function": {**call["function"], "arguments": args}})
    return {**m, "tool_calls": out}


def _chat_example(messages: list[dict], i: int, tok: Tokenizer, end_ids: tuple[int, ...], c: int, number: int,
                  where: str, tools: list[dict] | None = None) -> SFTExample:
    """The assistant turn i after messages[:i], as the chat template writes it."""
    prefix = tok.render_chat(messages[:i], add_generation_prompt=True, tools=tools)
    full = tok.render_chat(messages[:i + 1], add_generation_prompt=False, tools=tools)
    if not full.startswith(prefix):
        raise ConfigError(f"{where}: the chat template does not write assistant turn {i} as a continuation of its "
                          "generation prompt; use {\"prompt\", \"completion\"} lines for this checkpoint")
    answer = tok.encode(full[len(prefix):], add_special_tokens=False)
    ends = [k for k, t in enumerate(answer) if t in end_ids]
    answer = answer[:ends[0] + 1] if ends else answer + [end_ids[0]]
    return _example(tok.encode(prefix, add_special_tokens=False), answer, end_ids, c, number)


def _example(prompt: list[int], answer: list[int], end_ids: tuple[int, ...], c: int, number: int) -> SFTExample:
    fill = -len(answer) % c
    return SFTExample(prompt=prompt, response=answer + [end_ids[0]] * fill, answer_length=len(answer), line=number)


def split_held_out(examples: list[SFTExample], fraction: float, seed: int
                   ) -> tuple[list[SFTExample], list[SFTExample]]:
    """A deterministic held-out split by source line (all of a conversation's turns on one side)."""
    if fraction <= 0:
        return examples, []
    lines = sorted({e.line for e in examples})
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(seed + 17)).tolist()
    held = {lines[k] for k in order[:max(1, round(fraction * len(lines)))]} if len(lines) > 1 else set()
    return [e for e in examples if e.line not in held], [e for e in examples if e.line in held]


class Batches:
    """Step k's examples, a pure function of (seed, k) (see the module docstring)."""

    def __init__(self, examples: list[SFTExample], batch_size: int, seed: int) -> None:
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = max(1, len(examples) // batch_size)
        self._epoch, self._batches = -1, []

    def batch(self, step: int) -> list[SFTExample]:
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._plan(epoch)
        return self._batches[step % self.per_epoch]

    def _plan(self, epoch: int) -> list[list[SFTExample]]:
        gen = step_generator(self.seed + 31, epoch)
        order = torch.randperm(len(self.examples), generator=gen).tolist()
        if len(order) < self.batch_size:  # fewer examples than a batch: repeat them
            order = (order * (self.batch_size // len(order) + 1))[:self.batch_size]
        window = self.batch_size * _WINDOW
        batches = []
        for start in range(0, self.per_epoch * self.batch_size, window):
            chunk = sorted(order[start:start + window], key=lambda k: self.examples[k].length)
            batches += [[self.examples[k] for k in chunk[i:i + self.batch_size]]
                        for i in range(0, len(chunk) - self.batch_size + 1, self.batch_size)]
        perm = torch.randperm(len(batches), generator=gen).tolist()  # batch order: not sorted by length
        return [batches[k] for k in perm]


def collate(examples: list[SFTExample], pad_id: int) -> Batch:
    """A padded `Batch` whose encoder loss covers the answers (through their end id) only."""
    s = max(e.length for e in examples)
    clean = torch.full((len(examples), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), s), dtype=torch.bool)
    for i, e in enumerate(examples):
        p = len(e.prompt)
        clean[i, :e.length] = torch.tensor(e.prompt + e.response)
        mask[i, p:p + e.answer_length] = True
    return Batch(clean=clean, prompt_lens=torch.tensor([len(e.prompt) for e in examples]),
                 resp_lens=torch.tensor([len(e.response) for e in examples]), labels=clean.clone(), loss_mask=mask,
                 answer_lens=torch.tensor([e.answer_length for e in examples]))
