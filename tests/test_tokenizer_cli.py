"""Tokenizer + chat template (vs transformers) and the `dgemma generate` scripting interface."""

import json

import torch

from dgemma.cli import main
from dgemma.model.loading import load_model, read_generation_config
from dgemma.sampler.reference import generate
from dgemma.tokenizer import Tokenizer


def test_chat_template_matches_transformers(checkpoint_with_tokenizer):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(checkpoint_with_tokenizer)
    ours = Tokenizer.from_directory(checkpoint_with_tokenizer)
    chats = [[{"role": "user", "content": "why is the sky blue?"}],
             [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the king"},
              {"role": "assistant", "content": "said"}, {"role": "user", "content": "to the queen "}]]
    for messages in chats:
        for add in (True, False):
            expected = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add, return_dict=False)
            assert ours.encode_chat(messages, add_generation_prompt=add) == list(expected)
    ids = ours.encode("the king said")
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == "the king said"
    assert ours.encode_chat(chats[0])[0] == ours.token_to_id("<bos>")


def test_bundled_tokenizer_matches_transformers_with_digits_split():
    from transformers import AutoTokenizer

    from dgemma.bundled import bundled_model_dir

    ref = AutoTokenizer.from_pretrained(bundled_model_dir())
    ours = Tokenizer.from_directory(bundled_model_dir())
    for text in ("Sort: 98 56 15", "Add: 985+970", "| Gina | 87 |", "Genesis 1:3, 10,000 men"):
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True) == text
    pieces = [ours.decode([i]) for i in ours.encode("98 56", add_special_tokens=False)]
    assert pieces == ["9", "8", " ", "5", "6"]


def test_cli_json_interface(checkpoint_with_tokenizer, capsys):
    path = checkpoint_with_tokenizer
    argv = ["generate", "--model", str(path), "--prompt-ids", "2,17,99", "--max-new-tokens", "20", "--seed", "3",
            "--exact", "--json", "--max-denoising-steps", "5"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"token_ids", "text", "steps", "tokens_per_forward", "seconds"}
    assert len(out["token_ids"]) <= 20 and all(s <= 5 for s in out["steps"])
    # the same call through the library, same seed: same tokens
    model, _ = load_model(path)
    gen = read_generation_config(path, model.config).replace(max_new_tokens=20, max_denoising_steps=5)
    torch.manual_seed(3)
    assert generate(model, torch.tensor([[2, 17, 99]]), gen).token_ids[0] == out["token_ids"]
    assert out["text"] == Tokenizer.from_directory(path).decode(out["token_ids"])


def test_cli_text_prompt_and_errors(checkpoint_with_tokenizer, capsys, tmp_path):
    path = str(checkpoint_with_tokenizer)
    assert main(["generate", "--model", path, "the king", "--max-new-tokens", "8", "--max-denoising-steps", "2",
                 "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "canvases" in captured.err
    cases = [
        (["--prompt-ids", "1,a"], "comma-separated integers"),
        (["--prompt-ids", "1,999999"], "must lie in"),
        (["--t-min", "0.9"], "t_max must be greater"),
        (["--dtype", "int3", "--prompt-ids", "1"], "unknown dtype"),
        ([], "no prompt"),
    ]
    for extra, message in cases:
        assert main(["generate", "--model", path, *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "no config.json" in capsys.readouterr().err


def _bundled_tokenizer():
    from dgemma.bundled import bundled_model_dir

    return Tokenizer.from_directory(bundled_model_dir())


def test_text_stream_holds_split_characters_and_equals_the_whole_decode():
    from dgemma.tokenizer import TextStream

    tok = _bundled_tokenizer()
    text = "Caf\u00e9 \u2014 na\u00efve \u65e5\u672c\u8a9e \U0001f600 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and len(ids) > len(text.split())  # characters span several tokens
    split_inside = 0
    for cut in range(len(ids) + 1):
        for second in range(cut, len(ids) + 1):
            stream = TextStream(tok)
            pieces = [stream.push(ids[:cut]), stream.push(ids[cut:second]), stream.push(ids[second:], final=True)]
            assert "".join(pieces) == text, (cut, second)
            assert all("\ufffd" not in p for p in pieces)
            split_inside += tok.decode(ids[:cut]).endswith("\ufffd")
    assert split_inside > 0  # some cuts fell inside a character


def test_server_stream_never_loses_text_across_split_characters():
    """The server's job turns canvases of ids into deltas: for every canvas boundary, the deltas concatenate to
    the decode of all ids, with stop strings still honoured."""
    import asyncio

    from dgemma.server.metrics import Metrics
    from dgemma.server.protocol import CompletionRequest
    from dgemma.server.worker import Job

    tok = _bundled_tokenizer()
    text = "\u00e9t\u00e9 \u2014 \u65e5\u672c \u00fcber STOP after"
    ids = tok.encode(text, add_special_tokens=False)

    async def run(stop, canvas):
        body = CompletionRequest.model_validate({"model": "m", "prompt": [1], "stop": stop})
        from dgemma.config import GenerationConfig

        job = Job(body, GenerationConfig(), [1], "completions", "m", tok, Metrics())
        chunks = [ids[i:i + canvas] for i in range(0, len(ids), canvas)]
        out = [job.advance(c, final=(i == len(chunks) - 1)) for i, c in enumerate(chunks)]
        return "".join(out), job.text_sent

    for canvas in range(1, 6):
        streamed, answer = asyncio.run(run(None, canvas))
        assert streamed == answer == text
        streamed, answer = asyncio.run(run(["STOP"], canvas))
        assert streamed == answer == text[:text.index("STOP")]


def test_bad_cli_invocations_give_one_line_and_status_2(checkpoint_with_tokenizer, capsys, tmp_path):
    """Every bad flag, file or combination: `dgemma: error: ...` on one line, exit status 2, no traceback."""
    ckpt = str(checkpoint_with_tokenizer)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    (tmp_path / "nonjson").mkdir()
    (tmp_path / "nonjson" / "config.json").write_bytes(b"\xff{")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "gen").mkdir()
    import shutil

    shutil.copytree(checkpoint_with_tokenizer, tmp_path / "gen", dirs_exist_ok=True)
    (tmp_path / "gen" / "generation_config.json").write_text('"oops"')
    gen = ["generate", "--model", ckpt]
    cases = [
        [*gen[:1], "--model", str(tmp_path / "list"), "--prompt-ids", "1"],  # config.json is a JSON list
        [*gen[:1], "--model", str(tmp_path / "nonjson"), "--prompt-ids", "1"],  # config.json not UTF-8 JSON
        [*gen[:1], "--model", str(tmp_path / "file.txt"), "--prompt-ids", "1"],  # not a directory
        [*gen[:1], "--model", str(tmp_path / "missing"), "--prompt-ids", "1"],
        [*gen[:1], "--model", str(tmp_path / "gen"), "--prompt-ids", "1"],  # generation_config.json not an object
        [*gen, "--prompt-ids", "1", "--max-new-tokens", "1000000000000"],
        [*gen, "--prompt-ids", "1", "--max-new-tokens", "100000"],  # beyond the model's positions
        [*gen, "--prompt-ids", "1", "--entropy-bound", "1e308"],
        [*gen, "--prompt-ids", "1", "--entropy-bound", "nan"],
        [*gen, "--prompt-ids", "1", "--confidence-threshold", "inf"],
        [*gen, "--prompt-ids", "1", "--t-min", "1e-40", "--t-max", "2e-40"],
        [*gen, "--prompt-ids", "1", "--max-denoising-steps", "0"],
        [*gen, "--prompt-ids", "1", "--stability-threshold", "9"],
        [*gen, "--prompt-ids", "1", "--device", "mps"],
        [*gen, "--prompt-ids", "1", "--device", "nonsense"],
        [*gen, "--prompt-ids", "1", "--dtype", "int3"],
        [*gen, "--prompt-ids", "1", "--seed", str(2**64)],
        [*gen, "--prompt-ids", "1,,2"], [*gen, "--prompt-ids", ""], [*gen, "--prompt-ids", "-1"],
        [*gen, "--prompt-ids", "1", "hello"], [*gen, "--raw", ""], [*gen],
        ["random-checkpoint", "--out", str(tmp_path / "rc"), "--preset", "bogus"],
        ["random-checkpoint", "--out", str(tmp_path / "rc"), "--config", str(tmp_path / "list" / "config.json")],
        ["random-checkpoint", "--out", str(tmp_path / "file.txt")],
        ["bench", "--model", ckpt, "--baseline", "bogus"], ["bench", "--model", ckpt, "--threads", "-1"],
        ["bench", "--random-config", str(tmp_path / "list" / "config.json")],
        ["serve", "--model", ckpt, "--api-key", ""], ["serve", "--model", ckpt, "--port", "70000"],
        ["serve", "--model", ckpt, "--max-batch", "0"],
        ["train", "--data", str(tmp_path / "missing")], ["train", "--steps", "0"],
        ["chat", "--model", str(tmp_path / "missing")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("dgemma: error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)


def test_fresh_process_prints_no_warning():
    """The bundled model in a new process: nothing on stderr but the summary (numpy is a declared dependency, so
    torch does not warn that it failed to initialise it)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dgemma.cli", "generate", "--prompt-ids", "2,3",
                           "--max-new-tokens", "4", "--max-denoising-steps", "2", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
