"""Structured-output evaluation: 64 tasks (JSON objects, nested objects, arrays with bounds, enums, numeric
ranges, patterns, optional fields, anyOf; regexes such as dates, versions, identifiers; choices; Lark
grammars), each with a prompt, run on one model in five modes with the same weights:

- `diffusion`: the engine with default-mode constraints (masks along the draft, projection at budget end);
- `diffusion-exact`: exact mode (canvas dynamic programming), on the tasks that compile to an automaton;
- `ar`: autoregressive greedy decoding of the same weights with the same library's masks;
- `diffusion-free`, `ar-free`: each without constraints.

Per mode: answers valid and complete within the budget (%), finish reasons, valid among "stop" answers (%),
steps per canvas, tokens per forward, tokens/s, mask time per constrained step. Validity is judged
independently of the constraint engine: `jsonschema` for schemas, `re.fullmatch` for regexes and grammars
(each grammar task has an equivalent regex), membership for choices.

    python bench/structured_eval.py                       # the bundled model, 3 seeds, the table on stdout
    python bench/structured_eval.py --model DIR --seeds 3 --out results.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dgemma.bundled import bundled_model_dir  # noqa: E402
from dgemma.config import EngineConfig  # noqa: E402
from dgemma.constrain import ConstraintError, ConstraintSpec  # noqa: E402
from dgemma.constrain.canvas import canvas_constraint  # noqa: E402
from dgemma.engine.engine import Engine, GenerationRequest  # noqa: E402
from dgemma.model.loading import load_model, read_generation_config  # noqa: E402
from dgemma.sampler.autoregressive import generate_autoregressive  # noqa: E402
from dgemma.sampler.stats import GenerationStats  # noqa: E402
from dgemma.tokenizer import Tokenizer  # noqa: E402


@dataclass
class Task:
    name: str
    prompt: str
    spec: ConstraintSpec
    check: object  # text -> bool (independent of the constraint engine)


def _obj(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def _s(n: int = 12, **kw) -> dict:
    return {"type": "string", "maxLength": n, **kw}


def _i(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


SCHEMAS = {
    "person": _obj({"name": _s(), "age": _i(0, 120)}),
    "city": _obj({"city": _s(16), "country": _s(16)}),
    "point": _obj({"x": _i(-100, 100), "y": _i(-100, 100)}),
    "flag": _obj({"ok": {"type": "boolean"}}),
    "color": _obj({"color": {"enum": ["red", "green", "blue"]}}),
    "rating": _obj({"item": _s(10), "stars": _i(1, 5)}),
    "book": _obj({"title": _s(20), "year": _i(1500, 2030), "author": _s(16)}),
    "nested": _obj({"user": _obj({"id": _i(1, 999), "name": _s(8)}), "active": {"type": "boolean"}}),
    "tags": _obj({"tags": {"type": "array", "items": _s(8), "minItems": 1, "maxItems": 3}}),
    "scores": _obj({"scores": {"type": "array", "items": _i(0, 10), "minItems": 2, "maxItems": 4}}),
    "optional": _obj({"name": _s(10), "nick": _s(8)}, required=["name"]),
    "level": _obj({"level": {"enum": ["low", "mid", "high"]}, "count": _i(0, 9)}),
    "code": _obj({"code": _s(8, pattern="^[A-Z]{3}[0-9]{2}$")}),
    "either": _obj({"value": {"anyOf": [_i(0, 99), {"type": "boolean"}]}}),
    "verse": _obj({"book": _s(12), "chapter": _i(1, 150), "verse": _i(1, 176)}),
    "weather": _obj({"day": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}, "temp": _i(-30, 50)}),
    "pair": _obj({"key": _s(8), "value": _s(8)}),
    "pets": _obj({"pets": {"type": "array", "items": _obj({"kind": {"enum": ["cat", "dog"]}, "age": _i(0, 30)}),
                           "minItems": 1, "maxItems": 2}}),
    "price": _obj({"amount": _i(0, 10000), "currency": {"enum": ["USD", "EUR", "GBP"]}}),
    "answer": _obj({"answer": {"enum": ["yes", "no"]}, "reason": _s(20)}),
    "vote": _obj({"choice": {"enum": ["a", "b", "c"]}, "confidence": _i(0, 100)}),
    "event": _obj({"name": _s(12), "day": _i(1, 31), "month": _i(1, 12), "public": {"type": "boolean"}}),
}
SCHEMA_PROMPTS = {
    "person": "Give a person with a name and an age as JSON.", "city": "Name a city and its country in JSON.",
    "point": "A point with integer x and y, as JSON.", "flag": "Is the sky blue? Answer as JSON with ok.",
    "color": "Pick a color (red, green or blue) as JSON.", "rating": "Rate a book from 1 to 5 stars in JSON.",
    "book": "Describe a book: title, year, author, as JSON.", "nested": "A user record with id and name, in JSON.",
    "tags": "Give up to three tags for a story, as JSON.", "scores": "List two to four scores from 0 to 10 in JSON.",
    "optional": "A name and maybe a nickname, in JSON.", "level": "Report a level and a count as JSON.",
    "code": "Give a product code of three capitals and two digits in JSON.",
    "either": "Give a value that is a number or a boolean, as JSON.",
    "verse": "Cite a Bible verse as JSON with book, chapter and verse.",
    "weather": "The weather for a day of the week, as JSON.", "pair": "A key and a value, in JSON.",
    "pets": "List one or two pets as JSON.", "price": "A price with amount and currency as JSON.",
    "answer": "Is it raining? Answer yes or no with a reason, in JSON.",
    "vote": "Vote a, b or c with a confidence from 0 to 100, in JSON.",
    "event": "Describe an event with a day, a month and whether it is public, in JSON.",
}
REGEXES = {
    "date": (r"\d{4}-\d{2}-\d{2}", "Give a date as YYYY-MM-DD."),
    "time": (r"([01]\d|2[0-3]):[0-5]\d", "Give a time as HH:MM."),
    "version": (r"\d{1,2}\.\d{1,2}\.\d{1,3}", "Give a version number like 1.2.3."),
    "identifier": (r"[a-z_][a-z0-9_]{0,11}", "Name a Python variable."),
    "hex": (r"#[0-9a-f]{6}", "Give a color as a hex code."),
    "phone": (r"\d{3}-\d{3}-\d{4}", "Give a phone number like 555-123-4567."),
    "word": (r"[A-Z][a-z]{2,9}", "Say one capitalised word."),
    "two_words": (r"[a-z]+ [a-z]+", "Say two lowercase words."),
    "integer": (r"-?\d{1,4}", "Give a whole number."),
    "decimal": (r"\d{1,3}\.\d{2}", "Give a price like 12.50."),
    "email": (r"[a-z]{3,8}@[a-z]{3,8}\.(com|org)", "Give an email address."),
    "ipv4": (r"(\d{1,3}\.){3}\d{1,3}", "Give an IP address."),
    "yesno": (r"(yes|no)\.", "Answer yes or no, with a full stop."),
    "roman": (r"[IVX]{1,5}", "Write a small Roman numeral."),
    "verse_ref": (r"[A-Z][a-z]+ \d{1,3}:\d{1,3}", "Cite a verse like John 3:16."),
    "sentence": (r"[A-Z][a-z]+( [a-z]+){2,6}\.", "Write a short sentence."),
    "uuid_short": (r"[0-9a-f]{8}-[0-9a-f]{4}", "Give a short id like 1a2b3c4d-5e6f."),
    "semver_tag": (r"v\d\.\d{1,2}(-(alpha|beta))?", "Give a release tag like v1.2-beta."),
}
CHOICES = {
    "sky": (["blue", "green", "red"], "What colour is the sky?"),
    "yes_no": (["yes", "no"], "Is water wet?"),
    "day": (["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"], "Name a weekday."),
    "animal": (["cat", "dog", "horse", "bird"], "Name an animal."),
    "king": (["the king", "the queen", "the prince"], "Who spoke first?"),
    "mood": (["happy", "sad", "angry", "calm"], "How do you feel?"),
    "number": (["one", "two", "three", "four", "five"], "Say a number word."),
    "book": (["Genesis", "Exodus", "Psalms", "John"], "Name a book of the Bible."),
    "season": (["spring", "summer", "autumn", "winter"], "Name a season."),
    "answer": (["true", "false"], "Is two greater than one?"),
    "play": (["Hamlet", "Macbeth", "Othello", "King Lear"], "Name a play by Shakespeare."),
    "direction": (["north", "south", "east", "west"], "Name a direction."),
}
GRAMMARS = {
    "list": ('start: "[" item ("," item)* "]"\nitem: /[a-z]{1,8}/', r"\[[a-z]{1,8}(,[a-z]{1,8})*\]",
             "List some words in brackets."),
    "sum": ('start: num ("+" num)+ "=" num\nnum: /[0-9]{1,3}/', r"[0-9]{1,3}(\+[0-9]{1,3})+=[0-9]{1,3}",
            "Write a sum like 1+2=3."),
    "kv": ('start: pair (";" pair)*\npair: key "=" val\nkey: /[a-z]{1,6}/\nval: /[0-9]{1,4}/',
           r"[a-z]{1,6}=[0-9]{1,4}(;[a-z]{1,6}=[0-9]{1,4})*", "Write settings like a=1;b=2."),
    "call": ('start: name "(" (arg ("," arg)*)? ")"\nname: /[a-z]{1,8}/\narg: /[0-9]{1,3}/',
             r"[a-z]{1,8}\(([0-9]{1,3}(,[0-9]{1,3})*)?\)", "Write a function call like f(1,2)."),
    "speaker": ('start: NAME ":" " " WORDS "."\nNAME: /[A-Z]{2,8}/\nWORDS: /[a-z]+( [a-z]+){0,5}/',
                r"[A-Z]{2,8}: [a-z]+( [a-z]+){0,5}\.", "Write a line of a play, like HAMLET: to be."),
    "csv": ('start: row ("\\n" row){1,2}\nrow: cell "," cell\ncell: /[a-z0-9]{1,6}/',
            r"[a-z0-9]{1,6},[a-z0-9]{1,6}(\n[a-z0-9]{1,6},[a-z0-9]{1,6}){1,2}", "Write two or three CSV rows."),
}


def tasks() -> list[Task]:
    import jsonschema

    def schema_check(schema):
        def check(text):
            try:
                jsonschema.validate(json.loads(text), schema)
                return True
            except (ValueError, jsonschema.ValidationError):
                return False
        return check

    out = [Task(f"schema/{k}", SCHEMA_PROMPTS[k], ConstraintSpec("json_schema", v), schema_check(v))
           for k, v in SCHEMAS.items()]
    out += [Task(f"json_object/{k}", SCHEMA_PROMPTS[k], ConstraintSpec("json_object"),
                 lambda t: isinstance(_loads(t), dict)) for k in ("person", "city", "book", "pets")]
    out += [Task(f"regex/{k}", p, ConstraintSpec("regex", r), lambda t, r=r: re.fullmatch(r, t, re.ASCII) is not None)
            for k, (r, p) in REGEXES.items()]
    out += [Task(f"choice/{k}", p, ConstraintSpec("choice", c), lambda t, c=c: t in c) for k, (c, p) in CHOICES.items()]
    out += [Task(f"grammar/{k}", p, ConstraintSpec("grammar", g), lambda t, r=r: re.fullmatch(r, t) is not None)
            for k, (g, r, p) in GRAMMARS.items()]
    return out


def _loads(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


MODES = ("diffusion", "diffusion-exact", "ar", "diffusion-free", "ar-free")


def run_diffusion(model, tok, gen, tasks_: list[Task], seeds: int, mode: str, batch: int) -> list[dict]:
    """Every task x seed through one engine, `batch` requests at a time; one record per answer."""
    engine = Engine(model, EngineConfig(max_batch=batch, max_context=1024))
    c, v = model.config.canvas_length, model.config.vocab_size
    jobs = []
    for t in tasks_:
        for seed in range(seeds):
            try:
                spec = None if mode == "diffusion-free" else t.spec
                if mode == "diffusion-exact":
                    spec = ConstraintSpec(t.spec.kind, t.spec.value, mode="exact")
                constraint = None if spec is None else canvas_constraint(spec, tok, v, gen.eos_token_ids, c)
            except ConstraintError as exc:  # not a finite automaton: exact mode does not apply
                jobs.append((t, seed, None, str(exc)))
                continue
            prompt = tok.encode_chat([{"role": "user", "content": t.prompt}])
            jobs.append((t, seed, GenerationRequest(prompt=prompt, gen=gen, seed=seed, constraint=constraint), None))
    t0 = time.perf_counter()
    for _, _, req, _ in jobs:
        if req is not None:
            engine.submit(req)
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - t0
    return [_record(t, seed, tok, req, seconds, skipped) for t, seed, req, skipped in jobs]


def _record(t: Task, seed: int, tok, req, seconds: float, skipped: str | None) -> dict:
    if req is None:
        return {"task": t.name, "seed": seed, "skipped": skipped}
    text = tok.decode(req.output)
    c = req.constraint
    return {"task": t.name, "seed": seed, "text": text, "finish_reason": req.finish_reason,
            "valid": bool(t.check(text)), "tokens": len(req.output), "steps": req.steps, "mode_seconds": seconds,
            "mask_seconds": c.mask_seconds if c else 0.0, "constrained_steps": c.steps if c else 0}


def run_ar(model, tok, gen, tasks_: list[Task], seeds: int, constrained: bool) -> list[dict]:
    """Greedy autoregressive decoding (the seeds give the same answer: it is run once per task and counted for
    every seed), with the same library's masks when `constrained`."""
    from dgemma.constrain.backend import LLGuidanceBackend

    backend = LLGuidanceBackend.for_tokenizer(tok, model.config.vocab_size, gen.eos_token_ids)
    records, t0 = [], time.perf_counter()
    for t in tasks_:
        matcher = backend.matcher(t.spec) if constrained else None
        spent = [0.0]

        def processor(logits, i, m=matcher, spent=spent):
            t1 = time.perf_counter()
            mask = m.draft_masks([], 1).to(logits.device)
            spent[0] += time.perf_counter() - t1
            return logits.masked_fill(~mask, float("-inf"))

        prompt = torch.tensor([tok.encode_chat([{"role": "user", "content": t.prompt}])])
        out = generate_autoregressive(model, prompt, gen.max_new_tokens, eos_token_ids=gen.eos_token_ids,
                                      processor=processor if constrained else None,
                                      on_token=(lambda tk, m=matcher: m.consume([tk])) if constrained else None)
        text = tok.decode(out)
        ended = len(out) < gen.max_new_tokens
        for seed in range(seeds):
            records.append({"task": t.name, "seed": seed, "text": text, "finish_reason": "stop" if ended else "length",
                            "valid": bool(t.check(text)), "tokens": len(out), "steps": [len(out) + ended],
                            "mask_seconds": spent[0] / seeds, "constrained_steps": (len(out) + ended) // seeds})
    seconds = time.perf_counter() - t0
    for r in records:
        r["mode_seconds"] = seconds / seeds
    return records


def summarise(records: list[dict]) -> dict:
    ran = [r for r in records if "skipped" not in r]
    if not ran:
        return {"answers": 0}
    stops = [r for r in ran if r["finish_reason"] == "stop"]
    stats = GenerationStats(sum(r["tokens"] for r in ran), [s for r in ran for s in r["steps"]],
                            ran[0]["mode_seconds"])
    steps = sum(r["constrained_steps"] for r in ran)
    return {
        "answers": len(ran), "skipped": len(records) - len(ran),
        "valid_complete_pct": 100.0 * sum(r["valid"] and r["finish_reason"] == "stop" for r in ran) / len(ran),
        "stop_valid_pct": 100.0 * sum(r["valid"] for r in stops) / len(stops) if stops else None,
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in ran) for k in ("stop", "length", "error")},
        "steps_per_canvas": stats.steps_per_canvas, "tokens_per_forward": stats.tokens_per_forward,
        "tokens_per_s": stats.tokens_per_s, "mask_ms_per_step": 1e3 * sum(r["mask_seconds"] for r in ran) / steps
        if steps else None,
    }


def markdown(results: dict) -> str:
    lines = ["| mode | answers | valid and complete | valid among stop | stop / length / error | steps/canvas | "
             "tokens/forward | tokens/s | mask ms/step |", "|---" * 9 + "|"]
    for mode, s in results.items():
        if not s.get("answers"):
            continue
        f = s["finish_reasons"]
        stop_valid = "n/a" if s["stop_valid_pct"] is None else f"{s['stop_valid_pct']:.0f}%"
        mask = "" if s["mask_ms_per_step"] is None else f"{s['mask_ms_per_step']:.2f}"
        spc = "-" if s["steps_per_canvas"] is None else f"{s['steps_per_canvas']:.1f}"
        lines.append(f"| {mode} | {s['answers']} | {s['valid_complete_pct']:.0f}% | {stop_valid} | "
                     f"{f['stop']} / {f['length']} / {f['error']} | {spc} | "
                     f"{s['tokens_per_forward']:.2f} | {s['tokens_per_s']:.0f} | {mask} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-denoising-steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tasks", type=int, default=0, help="only the first N tasks (0: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write every answer and the summary as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else bundled_model_dir()
    model, _ = load_model(path)
    tok = Tokenizer.from_directory(path)
    gen = read_generation_config(path, model.config).replace(max_new_tokens=args.max_new_tokens,
                                                               max_denoising_steps=args.max_denoising_steps)
    selected = tasks()[: args.tasks or None]
    results, answers = {}, {}
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        if mode.startswith("ar"):
            records = run_ar(model, tok, gen, selected, args.seeds, constrained=mode == "ar")
        else:
            records = run_diffusion(model, tok, gen, selected, args.seeds, mode, args.batch)
        results[mode], answers[mode] = summarise(records), records
        if mode.startswith("ar"):  # one canvas of len + 1 steps: steps per canvas says nothing here
            results[mode]["steps_per_canvas"] = None
        print(f"{mode}: {json.dumps(results[mode])} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"{len(selected)} tasks x {args.seeds} seeds, {path.name}, max_new_tokens {args.max_new_tokens}")
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": results, "answers": answers}, indent=1))


if __name__ == "__main__":
    main()
