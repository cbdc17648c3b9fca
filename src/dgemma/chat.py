"""`dgemma chat`: an interactive terminal chat that shows diffusion decoding as it happens.

Each answer is drawn live: committed text, then the current argmax canvas (dim) as it snaps from noise
into text step by step. The conversation's KV cache is kept between turns: the next turn encodes only the
tokens that are not cached yet (when the rendered conversation extends the cached tokens; otherwise the
context is rebuilt). Commands: /reset (forget the conversation), /quit (or Ctrl-D).

A bad turn (input that is not valid UTF-8, a prompt that does not fit the context, a generation error, Ctrl-C
while the model answers) ends that turn with a message; the session and its history go on, the failed turn
left out of it. tests/test_chat.py drives a session through such turns.
"""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.live import Live
from rich.text import Text

from dgemma.config import EngineConfig, GenerationConfig, UserError
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.model.modeling import DiffusionGemma
from dgemma.sampler.stats import GenerationStats
from dgemma.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class ChatSession:
    """A conversation with its own single-row engine.

    `ids` is the conversation as the model saw it: prompts plus the model's own generated ids (not a
    re-encoding of their text). A new turn appends the template text that follows the last answer, so the
    tokens already in the KV cache stay valid and only the new ones are encoded. When the template does not
    reproduce the previous text (e.g. it trims the answer), the context is rebuilt from the rendered chat."""

    def __init__(self, model: DiffusionGemma, tokenizer: Tokenizer, gen: GenerationConfig,
                 system: str | None = None, max_context: int = 4096) -> None:
        self.model, self.tokenizer, self.gen = model, tokenizer, gen
        self.engine = Engine(model, EngineConfig(max_batch=1, max_context=max_context))
        self.system = system
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = []
        self.text = ""  # rendered text that `ids` stands for
        self.cached = 0  # tokens of `ids` in the KV cache

    def _conversation_ids(self) -> tuple[list[int], bool]:
        """Token ids of the conversation with the new user turn; whether they extend `self.ids`."""
        text = self.tokenizer.render_chat(self.messages)
        if self.ids and text.startswith(self.text):
            suffix = text[len(self.text):]
            return self.ids + self.tokenizer.encode(suffix, add_special_tokens=False), True
        return self.tokenizer.encode(text, add_special_tokens=False), False

    def answer(self, text: str, seed: int = 0, on_draft=None, on_tokens=None) -> GenerationRequest:
        """The model's answer to `text`. On any failure (UserError for a bad turn, KeyboardInterrupt, an engine
        error) the turn is undone: the history is as before and the next turn re-encodes the context."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids, request = self._generate(seed, on_draft, on_tokens)
        except BaseException:
            self.messages.pop()
            self._forget_cache()
            raise
        answer = self.tokenizer.decode(request.output)
        self.messages.append({"role": "assistant", "content": answer})
        self.text = self.tokenizer.render_chat(self.messages[:-1]) + answer
        self.ids = ids + request.output
        self.cached = self.engine.cache.lengths[0]  # prompt + every committed canvas but the last
        return request

    def _generate(self, seed: int, on_draft, on_tokens) -> tuple[list[int], GenerationRequest]:
        ids, extend = self._conversation_ids()
        cached = self.cached if extend else 0
        request = GenerationRequest(prompt=ids[cached:], gen=self.gen, seed=seed, on_draft=on_draft,
                                    on_tokens=on_tokens, extend_context=cached > 0)
        self.engine.submit(request)  # validated here: a turn that does not fit raises UserError
        while self.engine.has_work():
            self.engine.step()
        if request.finish_reason == "error":
            raise RuntimeError(request.error)
        return ids, request

    def _forget_cache(self) -> None:
        """After an interrupted or failed turn: drop whatever the engine holds; the next turn encodes the whole
        conversation again from the same ids (the model's own answers, not a re-encoding of their text)."""
        self.cached = 0
        self.engine.reset()


def _answer(session: ChatSession, tokenizer: Tokenizer, console: Console, text: str, seed: int,
            live: bool) -> GenerationRequest:
    """One answer, drawn live: committed text, then the current argmax canvas (dim)."""
    if not live:
        return session.answer(text, seed=seed)
    committed: list[int] = []
    view = Live(Text(""), console=console, refresh_per_second=30, transient=True)

    def show(draft: list[int] | None) -> None:
        out = Text("model> ", style="bold green")
        out.append(tokenizer.decode(committed))
        if draft is not None:
            out.append(tokenizer.decode(draft), style="dim magenta")
        view.update(out)

    def on_tokens(req: GenerationRequest, tokens: list[int]) -> None:
        committed.extend(tokens)
        show(None)

    with view:
        return session.answer(text, seed=seed, on_draft=lambda req, canvas: show(canvas), on_tokens=on_tokens)


def run_chat(model: DiffusionGemma, tokenizer: Tokenizer, gen: GenerationConfig, system: str | None = None,
             seed: int = 0, live: bool = True) -> int:
    console = Console()
    session = ChatSession(model, tokenizer, gen, system)
    console.print("[bold]dgemma chat[/bold]  (/reset to start over, /quit or Ctrl-D to leave)")
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # invalid UTF-8 reaches us as lone surrogates
    turn = 0
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            console.print("[dim](conversation cleared)[/dim]")
            continue
        if not _is_utf8(text):
            console.print("[red]turn skipped: that line is not valid UTF-8[/red]")
            continue
        if _turn(session, tokenizer, console, text, seed + turn, live):
            turn += 1


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _turn(session: ChatSession, tokenizer: Tokenizer, console: Console, text: str, seed: int, live: bool) -> bool:
    """One turn; a failure ends the turn with a message and leaves the session as it was."""
    t0 = time.perf_counter()
    try:
        req = _answer(session, tokenizer, console, text, seed, live)
    except UserError as exc:
        console.print(f"[red]turn skipped: {' '.join(str(exc).split())}[/red]")
        return False
    except KeyboardInterrupt:
        console.print("[yellow](answer interrupted; the conversation is as before this turn)[/yellow]")
        return False
    except Exception as exc:  # noqa: BLE001 - a failed generation ends the turn, not the session
        log.debug("turn failed", exc_info=True)
        console.print(f"[red]generation failed: {exc}; the conversation is as before this turn[/red]")
        return False
    seconds = time.perf_counter() - t0
    console.print(Text("model> ", style="bold green") + Text(tokenizer.decode(req.output)))
    stats = GenerationStats(len(req.output), req.steps, seconds)
    console.print(Text(stats.line(req.finish_reason, f", context {session.cached} tokens cached"), style="dim"))
    return True
