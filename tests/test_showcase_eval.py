"""bench/showcase.py eval on a slice of the held-out tasks with the bundled model: each mode's summary adds up
its requests, the suite row adds up the families, and the target lines are read off the same numbers."""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dgemma import tasks
from dgemma.bundled import bundled_model_dir
from dgemma.model.loading import load_model, read_generation_config
from dgemma.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import showcase  # noqa: E402


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_dir()
    model, _ = load_model(path)
    tok = Tokenizer.from_directory(path)
    return model, tok, read_generation_config(path, model.config).replace(max_new_tokens=32)


def test_suite_row_and_targets_add_up_the_families(bundled):
    model, tok, gen = bundled
    families: dict = {}
    rows_by_mode: dict = {"diffusion": [], "ar": []}
    for family in tasks.SHOWCASE:
        items = tasks.examples(family, 2, "test")
        families[family] = {}
        for mode, run in (("diffusion", showcase.run_diffusion), ("ar", showcase.run_ar)):
            rows = run(model, tok, gen, items, False)
            assert len(rows) == 2 and all(r["family"] == family for r in rows)
            rows_by_mode[mode] += rows
            families[family][mode] = showcase.summarise(rows)
            assert families[family][mode]["tokens"] == sum(r["tokens"] for r in rows)
    suite = showcase.suite(families)
    for mode, rows in rows_by_mode.items():
        s = suite[mode]
        assert s["families"] == len(tasks.SHOWCASE)
        assert s["tokens"] == sum(r["tokens"] for r in rows) and s["nfe"] == sum(r["nfe"] for r in rows)
        assert s["tokens_per_forward"] == pytest.approx(s["tokens"] / s["nfe"])
        assert s["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))  # equal-sized families
    lines = showcase.targets({"families": families, "suite": suite})
    tie = sum(m["diffusion"]["accuracy"] >= m["ar"]["accuracy"] for m in families.values())
    assert lines[0].startswith(f"Diffusion at least as accurate as AR: {tie} families")
    ratio = suite["diffusion"]["tokens_per_s"] / suite["ar"]["tokens_per_s"]
    assert lines[1].endswith(f"({ratio:.2f}x).")
    table = showcase.markdown({"families": families, "suite": suite,
                               "free_text": {"dictionary_share": 0.5, "words": 2, "generations": 1}})
    assert "| **suite** | diffusion |" in table and "| **suite** | ar |" in table


def test_split_digits_copies_the_checkpoint_with_a_digit_splitting_tokenizer(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    src, out = tmp_path / "merged", tmp_path / "split"
    shutil.copytree(bundled_model_dir(), src)
    merged = HFTokenizer.from_file(str(src / "tokenizer.json"))
    merged.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # a tokenizer from before the split
    merged.save(str(src / "tokenizer.json"))
    showcase.cmd_split_digits(SimpleNamespace(model=str(src), out=str(out)))
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    before, after = Tokenizer.from_directory(src), Tokenizer.from_directory(out)
    assert after.vocab_size == before.vocab_size
    ids = after.encode("Sort: 98 56 15", add_special_tokens=False)
    assert [after.decode([i]) for i in ids][-8:] == ["9", "8", " ", "5", "6", " ", "1", "5"]
    assert before.encode("Sort: 98 56 15", add_special_tokens=False) != ids
    assert after.encode("Sort: 98 56 15") == Tokenizer.from_directory(bundled_model_dir()).encode("Sort: 98 56 15")
    with pytest.raises(SystemExit, match="exists"):  # never over an existing directory
        showcase.cmd_split_digits(SimpleNamespace(model=str(src), out=str(out)))
    with pytest.raises(SystemExit, match="no tokenizer.json"):
        showcase.cmd_split_digits(SimpleNamespace(model=str(tmp_path / "missing"), out=str(tmp_path / "other")))
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "other").exists()


def test_data_mix_takes_per_family_counts_and_refuses_bad_ones(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "pretrain.train.txt").write_text("And God said, let there be light. " * 40)
    (corpus / "chat.train.jsonl").write_text('{"prompt": "Hi?", "response": "Hello."}\n' * 3)
    args = SimpleNamespace(corpus=str(corpus), out=str(tmp_path / "mix"), per_family=2, text=1, chat=1,
                           family=["sort=5", "add=0"])
    showcase.cmd_data(args)
    rows = [json.loads(line) for line in (tmp_path / "mix" / "train.jsonl").read_text().splitlines()]
    prompts = [r["messages"][0]["content"] for r in rows if "messages" in r]
    assert sum(p.startswith("Sort:") for p in prompts) == 5 and not any(p.startswith("Add:") for p in prompts)
    assert sum(p.startswith("Convert to JSON:") for p in prompts) == 2 and len(rows) == 2 * 4 + 5 + 1 + 1
    for bad in (["nope=3"], ["sort=-1"], ["sort"]):
        with pytest.raises(SystemExit, match="FAMILY=COUNT"):
            showcase.cmd_data(SimpleNamespace(**{**vars(args), "family": bad}))
