"""Chat sessions: the KV cache is reused across turns and gives the same answer as re-encoding."""

from dgemma.chat import ChatSession
from dgemma.config import EngineConfig
from dgemma.engine.engine import Engine
from dgemma.model.loading import load_model, read_generation_config
from dgemma.tokenizer import Tokenizer


def test_second_turn_reuses_cache_and_matches_fresh_context(checkpoint_with_tokenizer):
    path = checkpoint_with_tokenizer
    model, _ = load_model(path)
    tok = Tokenizer.from_directory(path)
    gen = read_generation_config(path, model.config).replace(max_new_tokens=40, max_denoising_steps=3,
                                                             eos_token_ids=())
    session = ChatSession(model, tok, gen, system="be brief", max_context=512)
    first = session.answer("the king said", seed=1)
    assert len(first.output) == 40 and session.cached > 0
    ids_before, cached_before = list(session.ids), session.cached
    assert cached_before == len(ids_before) - 40 + 32  # the last canvas (here 8 of 16 tokens) is not cached
    second = session.answer("to the queen", seed=2)
    assert second.prompt == session.ids[cached_before:len(session.ids) - 40]  # only uncached tokens encoded
    assert session.ids[: len(ids_before)] == ids_before  # the model's own ids are kept, not re-encoded text
    # the same conversation encoded from scratch gives the same answer
    fresh = Engine(model, EngineConfig(max_batch=1, max_context=512)).generate([session.ids[:-40]], gen, [2])[0]
    assert fresh.output == second.output
    session.reset()
    assert session.ids == [] and session.messages == [{"role": "system", "content": "be brief"}]


def test_a_bad_or_interrupted_turn_leaves_the_session_as_before(checkpoint_with_tokenizer):
    import pytest

    from dgemma.config import UserError

    path = checkpoint_with_tokenizer
    model, _ = load_model(path)
    tok = Tokenizer.from_directory(path)
    gen = read_generation_config(path, model.config).replace(max_new_tokens=20, max_denoising_steps=3,
                                                             eos_token_ids=())
    session = ChatSession(model, tok, gen, max_context=256)
    session.answer("the king said", seed=1)
    history = list(session.messages)
    with pytest.raises(UserError, match="context slots"):
        session.answer("the king said " * 200, seed=2)  # does not fit the context
    assert session.messages == history

    def interrupt(req, tokens):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.answer("to the queen", seed=3, on_tokens=interrupt)
    assert session.messages == history and session.cached == 0
    after = session.answer("to the queen", seed=3)
    # the same conversation in a fresh session gives the same answer: nothing of the failed turns remains
    fresh = ChatSession(model, tok, gen, max_context=256)
    fresh.answer("the king said", seed=1)
    assert fresh.answer("to the queen", seed=3).output == after.output


def test_chat_cli_survives_bad_lines(checkpoint_with_tokenizer):
    import subprocess
    import sys

    lines = b"the king\n\xff\xfe not utf-8\n" + b"word " * 3000 + b"\nthe queen\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "dgemma.cli", "chat", "--model", str(checkpoint_with_tokenizer),
                           "--no-live", "--max-new-tokens", "8", "--max-denoising-steps", "2"],
                          input=lines, capture_output=True, timeout=120)
    out = proc.stdout.decode("utf-8", "replace")
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Traceback" not in out + proc.stderr.decode()
    assert "not valid UTF-8" in out and out.count("model>") == 2
