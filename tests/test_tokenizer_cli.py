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
