"""Task families generated here (no data set is downloaded): each makes (prompt, answer) pairs from a seeded
generator and scores an answer exactly, so a model can be fine-tuned on them and measured.

- `kv_json`: "Convert to JSON: name Tom, age 42, city Paris" -> `{"name":"Tom","age":42,"city":"Paris"}`
  (keys in the order given; compact separators). Exact match, or validity (parses as the same object).

Train and held-out splits draw from disjoint seed streams. `write_jsonl` writes a family in the chat format
`dgemma finetune` reads. tests/test_finetune.py uses them; bench/finetune_demo.py runs the fine-tuning demo.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Tom", "Anna", "Ben", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo", "Ivy", "Jack", "Kate", "Leo", "Mia",
         "Ned", "Olga", "Paul", "Rosa", "Sam", "Tina", "Uma", "Vic", "Will", "Zoe"]
CITIES = ["Paris", "Rome", "London", "Berlin", "Madrid", "Oslo", "Vienna", "Dublin", "Prague", "Lisbon"]
COLORS = ["red", "blue", "green", "black", "white", "gold"]


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[random.Random], tuple[str, str]]
    score: Callable[[str, str], bool]  # (output, reference) -> correct


def _kv_json(rng: random.Random) -> tuple[str, str]:
    fields = {"name": rng.choice(NAMES), "age": rng.randint(1, 99), "city": rng.choice(CITIES),
              "color": rng.choice(COLORS)}
    keys = rng.sample(list(fields), rng.randint(2, 3))
    prompt = "Convert to JSON: " + ", ".join(f"{k} {fields[k]}" for k in keys)
    return prompt, json.dumps({k: fields[k] for k in keys}, separators=(",", ":"))


def _same_json(output: str, reference: str) -> bool:
    try:
        return json.loads(output) == json.loads(reference) and output.strip() == reference
    except ValueError:
        return False


FAMILIES = {"kv_json": Family("kv_json", _kv_json, _same_json)}


def examples(family: str, n: int, split: str, seed: int = 0) -> list[Example]:
    """n examples of a family; "train" and "test" use disjoint seed streams (and test drops exact repeats of
    train prompts of the same seed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose from {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    rng = random.Random(f"{family}/{split}/{seed}")
    out = [Example(family, *fam.make(rng)) for _ in range(n)]
    if split == "test":
        seen = {e.prompt for e in examples(family, n * 4, "train", seed)}
        out = [e for e in out if e.prompt not in seen] or out
    return out


def write_jsonl(path: str | Path, items: list[Example]) -> Path:
    """The chat-format JSONL `dgemma finetune` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": e.prompt},
                                                      {"role": "assistant", "content": e.answer}]}) + "\n"
                            for e in items))
    return path


def score(family: str, output: str, reference: str) -> bool:
    return FAMILIES[family].score(output, reference)
