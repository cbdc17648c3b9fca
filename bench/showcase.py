"""What block diffusion is for, measured on one model: the task families of `dgemma.tasks` and free text.

    python bench/showcase.py data --corpus data/corpus --out data/showcase    # the fine-tuning mix (JSONL)
    python bench/showcase.py eval                                            # the bundled model, every mode
    python bench/showcase.py split-digits --model DIR --out DIR2             # the checkpoint, digits split
    python bench/showcase.py eval --model DIR --per-family 50 --out showcase.json

`eval` runs each family's held-out prompts through:
- `diffusion`: the engine with the checkpoint's settings (its `generation_config.json`);
- `diffusion-fixed`: the same with a fixed number of steps per canvas (no early stop);
- `ar`: greedy autoregressive decoding of the same weights, one token per forward;
- `diffusion+c`, `ar+c`: each with a structured-output constraint matching the family's format;
and reports accuracy (exact match), validity (structured families), empty or cut answers, tokens per forward,
steps per canvas and tokens/s (requests one at a time, so the speeds compare decoding, not batching). Free text:
the share of dictionary words (the `english-words` package's web2 list, `pip install -e .[bench]`) over 50
generations from varied prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dgemma import tasks  # noqa: E402
from dgemma.bundled import bundled_model_dir  # noqa: E402
from dgemma.config import EngineConfig  # noqa: E402
from dgemma.constrain import ConstraintSpec  # noqa: E402
from dgemma.constrain.canvas import canvas_constraint  # noqa: E402
from dgemma.engine.engine import Engine, GenerationRequest  # noqa: E402
from dgemma.model.loading import load_model, read_generation_config  # noqa: E402
from dgemma.sampler.autoregressive import generate_autoregressive  # noqa: E402
from dgemma.tokenizer import Tokenizer  # noqa: E402

CONSTRAINTS = {  # a format constraint per family (not the answer: the model still has to get it right)
    "kv_json": ConstraintSpec("json_object"), "fix_json": ConstraintSpec("json_object"),
    "table": ConstraintSpec("regex", r"\| name \| age \|\n\| --- \| --- \|(\n\| [A-Za-z]+ \| [0-9]+ \|){1,4}"),
    "sort": ConstraintSpec("regex", r"[0-9]+( [0-9]+){0,9}"), "add": ConstraintSpec("regex", r"[0-9]{1,5}"),
    "fill": ConstraintSpec("regex", r"[0-9]{1,4}"),
}
FREE_PROMPTS = ["The king said", "And God said", "HAMLET:\nTo be, or not to be", "Tell me a story.",
                "What is love?", "Quote Genesis 1:3.", "The night was", "ROMEO:", "Why is the sky blue?",
                "Continue this passage:\nAnd it came to pass"]


# -- the fine-tuning mix -----------------------------------------------------------------------------------
def cmd_data(args) -> None:
    """Tasks (every family), plain-text continuations of the pretraining corpus and its chat pairs, so that the
    model learns the tasks and keeps its free text."""
    rng = random.Random(0)
    rows = []
    counts = {family: args.per_family for family in tasks.SHOWCASE} | _family_counts(args.family or [])
    for family, n in counts.items():
        rows += [_chat(e.prompt, e.answer) for e in tasks.examples(family, n, "train")]
    text = Path(args.corpus, "pretrain.train.txt").read_text().replace("\x1e", "")
    for _ in range(args.text):
        start = rng.randrange(0, len(text) - 600)
        cut = rng.randrange(60, 240)
        rows.append({"prompt": text[start:start + cut], "completion": text[start + cut:start + cut + 160]})
    chats = [json.loads(line) for line in Path(args.corpus, "chat.train.jsonl").read_text().splitlines()]
    rows += [_chat(c["prompt"], c["response"]) for c in rng.sample(chats, min(args.chat, len(chats)))]
    rng.shuffle(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {out / 'train.jsonl'}: {len(rows)} examples ({', '.join(f'{f} {n}' for f, n in counts.items())}; "
          f"{args.text} text continuations, {min(args.chat, len(chats))} chat pairs)")


def _family_counts(pairs: list[str]) -> dict[str, int]:
    """`--family sort=12000` pairs -> {family: count} (families of `tasks.SHOWCASE`, counts >= 0)."""
    out = {}
    for pair in pairs:
        name, _, count = pair.partition("=")
        if name not in tasks.SHOWCASE or not count.isdigit():
            sys.exit(f"--family takes FAMILY=COUNT with FAMILY one of {', '.join(tasks.SHOWCASE)}, got {pair!r}")
        out[name] = int(count)
    return out


def cmd_split_digits(args) -> None:
    """A copy of a checkpoint whose tokenizer writes every digit apart (`dgemma.train.data.split_digits`); the
    vocabulary and weights are unchanged (multi-digit tokens stay in it, unused)."""
    import shutil

    from tokenizers import Tokenizer as HFTokenizer

    from dgemma.train.data import split_digits

    src, out = Path(args.model), Path(args.out)
    if not (src / "tokenizer.json").is_file():
        sys.exit(f"{src} has no tokenizer.json; pass a checkpoint directory")
    if out.exists():
        sys.exit(f"{out} exists; pick a new directory")
    tok = HFTokenizer.from_file(str(src / "tokenizer.json"))
    split_digits(tok)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tok.save(str(tmp / "tokenizer.json"))
    tmp.rename(out)
    print(f"wrote {out}: {src} with digits split ({tok.encode('Sort: 98 56 15').tokens})")


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


# -- evaluation ----------------------------------------------------------------------------------------------
MODES = ("diffusion", "diffusion-fixed", "ar", "diffusion+c", "ar+c")


def run_diffusion(model, tok, gen, items, constrained: bool) -> list[dict]:
    """One request at a time through a batch-1 engine (timed per request)."""
    engine = Engine(model, EngineConfig(max_batch=1, max_context=1024))
    out = []
    for i, e in enumerate(items):
        c = None
        if constrained:
            c = canvas_constraint(CONSTRAINTS[e.family], tok, model.config.vocab_size, gen.eos_token_ids,
                                  model.config.canvas_length)
        t0 = time.perf_counter()
        req = engine.submit(GenerationRequest(prompt=_prompt(tok, e.prompt), gen=gen, seed=i, constraint=c))
        while engine.has_work():
            engine.step()
        out.append(_row(e, tok.decode(req.output), len(req.output), sum(req.steps), len(req.steps),
                        req.finish_reason, time.perf_counter() - t0))
    return out


def run_ar(model, tok, gen, items, constrained: bool) -> list[dict]:
    from dgemma.constrain.backend import LLGuidanceBackend

    backend = LLGuidanceBackend.for_tokenizer(tok, model.config.vocab_size, gen.eos_token_ids)
    out = []
    for e in items:
        matcher = backend.matcher(CONSTRAINTS[e.family]) if constrained else None

        def processor(logits, i, m=matcher):
            return logits.masked_fill(~m.draft_masks([], 1).to(logits.device), float("-inf"))

        t0 = time.perf_counter()
        ids = generate_autoregressive(model, torch.tensor([_prompt(tok, e.prompt)]), gen.max_new_tokens,
                                      eos_token_ids=gen.eos_token_ids, processor=processor if matcher else None,
                                      on_token=(lambda t, m=matcher: m.consume([t])) if matcher else None)
        ended = len(ids) < gen.max_new_tokens
        out.append(_row(e, tok.decode(ids), len(ids), len(ids) + ended, 1, "stop" if ended else "length",
                        time.perf_counter() - t0))
    return out


def _prompt(tok, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}])


def _row(e, text: str, tokens: int, nfe: int, canvases: int, finish: str, seconds: float) -> dict:
    return {"family": e.family, "prompt": e.prompt, "answer": e.answer, "output": text,
            "correct": tasks.score(e.family, text, e.answer), "valid": tasks.valid(e.family, text),
            "empty_or_cut": not text.strip() or finish != "stop", "tokens": tokens, "nfe": nfe,
            "canvases": canvases, "seconds": seconds}


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    valid = [r["valid"] for r in rows if r["valid"] is not None]
    totals = {k: sum(r[k] for r in rows) for k in ("tokens", "nfe", "canvases", "seconds")}
    return {"n": n, "accuracy": sum(r["correct"] for r in rows) / n,
            "validity": sum(valid) / len(valid) if valid else None,
            "empty_or_cut": sum(r["empty_or_cut"] for r in rows) / n} | _rates(totals)


def _rates(t: dict) -> dict:
    """The summed tokens, forwards, canvases and seconds, with the rates read off them."""
    return t | {"tokens_per_forward": t["tokens"] / max(1, t["nfe"]), "steps_per_canvas": t["nfe"] / max(1,
                t["canvases"]), "tokens_per_s": t["tokens"] / t["seconds"]}


def suite(families: dict) -> dict:
    """Per mode, the whole task suite as one workload: mean accuracy over the families, and tokens per forward,
    steps per canvas and tokens/s over the summed tokens, forwards and seconds of every request."""
    by_mode: dict = {}
    for modes in families.values():
        for mode, s in modes.items():
            by_mode.setdefault(mode, []).append(s)
    return {mode: _rates({k: sum(s[k] for s in ss) for k in ("tokens", "nfe", "canvases", "seconds")})
            | {"families": len(ss), "accuracy": sum(s["accuracy"] for s in ss) / len(ss)}
            for mode, ss in by_mode.items()}


def dictionary_share(model, tok, gen, n: int = 50) -> dict:
    """Free text: the share of words (letters only, lower-cased) that are in the web2 dictionary, over n
    generations (10 prompts, raw and chat, several seeds), through the engine with the checkpoint's settings."""
    from english_words import get_english_words_set

    words = get_english_words_set(["web2"], lower=True)
    engine = Engine(model, EngineConfig(max_batch=8, max_context=1024))
    reqs = []
    for i in range(n):
        prompt = FREE_PROMPTS[i % len(FREE_PROMPTS)]
        ids = tok.encode(prompt) if (i // len(FREE_PROMPTS)) % 2 else _prompt(tok, prompt)
        reqs.append(engine.submit(GenerationRequest(prompt=ids, gen=gen.replace(max_new_tokens=64), seed=i)))
    while engine.has_work():
        engine.step()
    texts = [tok.decode(r.output) for r in reqs]
    found = [w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)]
    return {"generations": n, "words": len(found), "dictionary_share": sum(w in words for w in found) / max(1,
            len(found)), "samples": texts[:6]}


def cmd_eval(args) -> None:
    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else bundled_model_dir()
    model, _ = load_model(path)
    tok = Tokenizer.from_directory(path)
    gen = read_generation_config(path, model.config).replace(max_new_tokens=args.max_new_tokens)
    fixed = gen.replace(confidence_threshold=0.0, max_denoising_steps=args.fixed_steps, stop_at_end=False)
    results: dict = {"model": str(path), "families": {}, "settings": {"generation": vars(gen) | {
        "eos_token_ids": list(gen.eos_token_ids)}, "fixed_steps": args.fixed_steps}}
    for family in tasks.SHOWCASE:
        items = tasks.examples(family, args.per_family, "test")
        runs = {"diffusion": (run_diffusion, gen, False), "diffusion-fixed": (run_diffusion, fixed, False),
                "ar": (run_ar, gen, False), "diffusion+c": (run_diffusion, gen, True), "ar+c": (run_ar, gen, True)}
        results["families"][family] = {}
        for mode in args.modes.split(","):
            run, settings, constrained = runs[mode]
            rows = run(model, tok, settings, items, constrained)
            results["families"][family][mode] = summarise(rows) | {"examples": rows[:3]}
            s = results["families"][family][mode]
            print(f"{family:9s} {mode:15s} acc {s['accuracy']:.2f} tok/fwd {s['tokens_per_forward']:.2f} "
                  f"steps/canvas {s['steps_per_canvas']:.1f} tok/s {s['tokens_per_s']:.0f}", file=sys.stderr)
    results["suite"] = suite(results["families"])
    results["free_text"] = dictionary_share(model, tok, gen)
    print(markdown(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def markdown(results: dict) -> str:
    lines = ["| family | mode | accuracy | valid | empty or cut | tokens/forward | steps/canvas | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for family, modes in results["families"].items():
        for mode, s in modes.items():
            valid = "-" if s["validity"] is None else f"{100 * s['validity']:.0f}%"
            lines.append(_table_row(family, mode, s, valid, f"{100 * s['empty_or_cut']:.0f}%"))
    lines += [_table_row("**suite**", mode, t, "", "") for mode, t in results["suite"].items()]
    lines += ["", *targets(results)]
    ft = results["free_text"]
    lines.append(f"\nFree text: {100 * ft['dictionary_share']:.1f}% dictionary words ({ft['words']} words, "
                 f"{ft['generations']} generations).")
    return "\n".join(lines)


def _table_row(label: str, mode: str, s: dict, valid: str, cut: str) -> str:
    spc = "-" if mode.startswith("ar") else f"{s['steps_per_canvas']:.1f}"
    return (f"| {label} | {mode} | {100 * s['accuracy']:.0f}% | {valid} | {cut} | {s['tokens_per_forward']:.2f} "
            f"| {spc} | {s['tokens_per_s']:.0f} |")


def targets(results: dict) -> list[str]:
    """The issue's targets, read off this run: families where diffusion is at least as accurate as AR decoding of
    the same weights (and where it is better), and the suite's tokens per forward and diffusion/AR tokens/s."""
    fam, st = results["families"], results["suite"]
    lines = []
    if all("diffusion" in m and "ar" in m for m in fam.values()):
        tie = [f for f, m in fam.items() if m["diffusion"]["accuracy"] >= m["ar"]["accuracy"]]
        better = [f for f, m in fam.items() if m["diffusion"]["accuracy"] > m["ar"]["accuracy"]]
        lines.append(f"Diffusion at least as accurate as AR: {len(tie)} families ({', '.join(tie) or 'none'}); "
                     f"more accurate: {', '.join(better) or 'none'}.")
    if "diffusion" in st and "ar" in st:
        d, a = st["diffusion"], st["ar"]
        lines.append(f"Suite: diffusion {d['tokens_per_forward']:.2f} tokens/forward, {d['tokens_per_s']:.0f} vs "
                     f"{a['tokens_per_s']:.0f} tokens/s for AR ({d['tokens_per_s'] / a['tokens_per_s']:.2f}x).")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--corpus", default="data/corpus")
    d.add_argument("--out", default="data/showcase")
    d.add_argument("--per-family", type=int, default=3000)
    d.add_argument("--text", type=int, default=6000)
    d.add_argument("--chat", type=int, default=3000)
    d.add_argument("--family", action="append", metavar="FAMILY=COUNT",
                   help="examples of one family instead of --per-family (repeatable)")
    sd = sub.add_parser("split-digits")
    sd.add_argument("--model", required=True)
    sd.add_argument("--out", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--model", default=None)
    e.add_argument("--per-family", type=int, default=50)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--fixed-steps", type=int, default=8)
    e.add_argument("--modes", default=",".join(MODES))
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--out", default=None)
    args = p.parse_args()
    {"data": cmd_data, "split-digits": cmd_split_digits, "eval": cmd_eval}[args.command](args)


if __name__ == "__main__":
    main()
