"""bench/showcase.py eval on a slice of the held-out tasks with the bundled model: each mode's summary adds up
its requests, the suite row adds up the families, and the target lines are read off the same numbers."""

import sys
from pathlib import Path

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
