"""Task families generated here (no data set is downloaded): each makes (prompt, answer) pairs from a seeded
generator and scores an answer exactly, so a model can be fine-tuned on them and measured.

| family | prompt | answer | structure |
|---|---|---|---|
| `kv_json` | Convert to JSON: name Tom, age 42 | {"name":"Tom","age":42} | yes |
| `table` | Make a table: name,age;Tom,42;Ann,7 | a markdown table with a header rule | yes |
| `fix_json` | Fix the JSON: {"name":"Tom","age":42 | {"name":"Tom","age":42} | yes |
| `sort` | Sort: 42 7 19 3 | 3 7 19 42 | no |
| `add` | Add: 47+385 | 432 | no |
| `fill` | Fill the gap: 3 7 _ 15 19 | 11 (later terms inform the gap) | no |
| `json_get` | Get city from JSON: {"name":"Tom","city":"Rome"} | Rome | no |

`json_get` (read one field of a JSON object) is kept out of the bundled model's training mix (`SHOWCASE`): the
fine-tuning demo (bench/finetune_demo.py) teaches it with a LoRA adapter.

Every scorer is exact match after stripping surrounding whitespace. Train and held-out prompts are disjoint by
construction (a hash of the prompt decides its split).
`write_jsonl` writes examples in the chat format `dgemma finetune` reads. tests/test_tasks.py checks each
family's generator against its scorer; bench/showcase.py measures models on them.
"""

from __future__ import annotations

import hashlib
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
    structured: bool  # the answer is a structure (JSON, a table) rather than a value
    showcase: bool = True  # part of the bundled model's training mix (bench/showcase.py)


def _record(rng: random.Random) -> dict:
    fields = {"name": rng.choice(NAMES), "age": rng.randint(1, 99), "city": rng.choice(CITIES),
              "color": rng.choice(COLORS)}
    keys = rng.sample(list(fields), rng.randint(2, 3))
    return {k: fields[k] for k in keys}


def _kv_json(rng: random.Random) -> tuple[str, str]:
    record = _record(rng)
    prompt = "Convert to JSON: " + ", ".join(f"{k} {v}" for k, v in record.items())
    return prompt, json.dumps(record, separators=(",", ":"))


def _fix_json(rng: random.Random) -> tuple[str, str]:
    good = json.dumps(_record(rng), separators=(",", ":"))
    cut = rng.choice(["brace", "quote", "both"])
    broken = good[:-1] if cut == "brace" else good
    if cut in ("quote", "both"):
        i = broken.rindex('"', 0, broken.index(":"))  # the closing quote of the first key
        broken = broken[:i] + broken[i + 1:]
    if cut == "both":
        broken = broken[:-1]
    return "Fix the JSON: " + broken, good


def _table(rng: random.Random) -> tuple[str, str]:
    rows = [[rng.choice(NAMES), str(rng.randint(1, 99))] for _ in range(rng.randint(2, 3))]
    header = ["name", "age"]
    prompt = "Make a table: " + ";".join(",".join(r) for r in [header, *rows])
    lines = ["| " + " | ".join(r) + " |" for r in [header, ["---", "---"], *rows]]
    return prompt, "\n".join(lines)


def _sort(rng: random.Random) -> tuple[str, str]:
    values = rng.sample(range(1, 100), rng.randint(3, 6))
    return "Sort: " + " ".join(map(str, values)), " ".join(map(str, sorted(values)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    return f"Add: {a}+{b}", str(a + b)


def _fill(rng: random.Random) -> tuple[str, str]:
    start, step, n = rng.randint(1, 60), rng.randint(2, 12), rng.randint(5, 6)
    terms = [start + step * i for i in range(n)]
    gap = rng.randint(1, n - 2)  # never the first or last term: both sides are needed
    shown = [str(t) if i != gap else "_" for i, t in enumerate(terms)]
    return "Fill the gap: " + " ".join(shown), str(terms[gap])


def _json_get(rng: random.Random) -> tuple[str, str]:
    record = _record(rng)
    key = rng.choice(list(record))
    return f"Get {key} from JSON: " + json.dumps(record, separators=(",", ":")), str(record[key])


FAMILIES = {f.name: f for f in (
    Family("kv_json", _kv_json, True), Family("table", _table, True), Family("fix_json", _fix_json, True),
    Family("sort", _sort, False), Family("add", _add, False), Family("fill", _fill, False),
    Family("json_get", _json_get, False, showcase=False),
)}
SHOWCASE = [name for name, f in FAMILIES.items() if f.showcase]  # the families of the bundled model's mix


def examples(family: str, n: int, split: str, seed: int = 0) -> list[Example]:
    """n examples of a family from the `split` ("train" or "test") stream of `seed`. The splits are disjoint by
    construction: a prompt belongs to "test" when its hash falls in one tenth of the range."""
    if family not in FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose from {sorted(FAMILIES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    fam, out = FAMILIES[family], []
    rng = random.Random(f"{family}/{split}/{seed}")
    while len(out) < n:
        prompt, answer = fam.make(rng)
        if _held_out(prompt) == (split == "test"):
            out.append(Example(family, prompt, answer))
    return out


def _held_out(prompt: str) -> bool:
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10 == 0


def score(family: str, output: str, reference: str) -> bool:
    """Exact match (surrounding whitespace ignored)."""
    return output.strip() == reference.strip()


def valid(family: str, output: str) -> bool | None:
    """For the structured families: is the output a well-formed structure of the right shape (None otherwise)."""
    text = output.strip()
    if family in ("kv_json", "fix_json"):
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False
    if family == "table":
        lines = text.split("\n")
        return (len(lines) >= 3 and all(line.startswith("| ") and line.endswith(" |") for line in lines)
                and lines[1] == "| --- | --- |")
    return None


def write_jsonl(path: str | Path, items: list[Example]) -> Path:
    """The chat-format JSONL `dgemma finetune` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": e.prompt},
                                                      {"role": "assistant", "content": e.answer}]}) + "\n"
                            for e in items))
    return path
