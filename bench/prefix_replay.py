"""Stable-prefix streaming, measured: how early each canvas's prefix settles, how often locking it would be wrong,
and what locking does to time to first token and throughput.

R1 (replay, no behaviour change): every prompt runs with the normal sampler while `on_step` records each step's
argmax canvas and the argmax's log-probabilities. Offline, for each rule (confidence tau, stability over k steps;
`dgemma.sampler.prefix.PrefixRule`) the recorded steps are replayed through `PrefixTracker`: the step at which the
first token would have streamed, the share of the answer streamed by each fraction of a canvas's steps, and the
false-lock rate (settled tokens that differ from the committed ones).
R2 (locking on vs off, the default rule): time to first token, tokens/s and how often the answer changes, one
request at a time.

    PYTHONPATH=src python3 bench/prefix_replay.py [--model DIR] [--prompts 40] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dgemma.bundled import resolve_model
from dgemma.config import EngineConfig
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.model.loading import load_model, read_generation_config
from dgemma.sampler.entropy_bound import trim_generated
from dgemma.sampler.prefix import PrefixRule, PrefixTracker
from dgemma.tokenizer import Tokenizer

QUESTIONS = [
    "What is the capital of France?", "Tell me a joke.", "How are you today?", "What is your name?",
    "Who wrote Hamlet?", "What is the meaning of life?", "Do you like music?", "What time is it?",
    "Can you help me?", "What is a computer?", "Where do you live?", "What is love?", "Are you a robot?",
    "What is the weather like?", "Tell me about the sea.", "What do you eat?", "Why is the sky blue?",
    "Say something kind.", "What is two plus two?", "Give me a list of three colours.",
    "Continue this passage:\nTo be, or not to be, that is the question:",
    "Continue this passage:\nIn the beginning God created the heaven and the earth.",
    "Quote John 3:16", "Quote Genesis 1:1", "Quote Psalm 23:1", "Who is the king of Denmark?",
    "What does a bird do?", "Write one line about the night.", "What is the opposite of hot?",
    "Name a fruit.", "What is the sun?", "Is the earth round?", "What do you know about Rome?",
    "Answer in JSON with a name and an age.", 'Fill in: {"city": "Paris", "country": ', "Count to five.",
    "What is a river?", "Tell me about the queen.", "What colour is grass?", "Goodbye!",
]
RULES = [PrefixRule(confidence=t, steps=k) for t in (0.5, 0.7, 0.9, 0.97) for k in (1, 2, 3)]


def record(engine: Engine, prompt: list[int], gen, seed: int) -> tuple[GenerationRequest, list[list[tuple]]]:
    """Run one request normally; return it and, per canvas, its steps as (argmax, logprobs)."""
    canvases: list[list[tuple]] = [[]]

    def on_step(req, argmax, logprob):
        canvases[-1].append((argmax, logprob))

    def on_tokens(req, tokens):
        canvases.append([])

    req = engine.submit(GenerationRequest(prompt=prompt, gen=gen, seed=seed, on_step=on_step, on_tokens=on_tokens))
    while engine.has_work():
        engine.step()
    return req, [c for c in canvases if c]


def replay(rule: PrefixRule, canvases: list[list[tuple]], req: GenerationRequest, c: int) -> dict:
    """One request's recorded canvases under `rule`: first settle step, settled share by step fraction, locks."""
    out = {"first": None, "locked": 0, "false": 0, "answer": 0, "by_fraction": [0] * 4}
    remaining = req.gen.max_new_tokens
    steps_before = 0
    for steps in canvases:
        tracker = PrefixTracker(rule, c)
        counts = []
        for argmax, logprob in steps:
            counts.append(tracker.update(argmax, logprob))
        committed = steps[-1][0]
        answer, reason = trim_generated(committed, remaining, req.gen.eos_token_ids)
        n = len(answer) + (reason == "stop")
        stats = tracker.settle(committed, n)
        out["locked"] += stats.locked_tokens
        out["false"] += stats.false_locks
        out["answer"] += n
        if out["first"] is None and tracker.lock_steps:
            out["first"] = steps_before + tracker.lock_steps[0]
        for q, frac in enumerate((0.25, 0.5, 0.75, 1.0)):
            upto = max(1, round(frac * len(steps)))
            out["by_fraction"][q] += min(counts[upto - 1], n)
        steps_before += len(steps)
        remaining -= len(answer)
        if reason == "stop" or remaining <= 0:
            break
    return out


def timed(engine: Engine, prompt: list[int], gen, seed: int, prefix: str | None) -> tuple[float, float, list[int]]:
    first: list[float] = []
    t0 = time.perf_counter()
    req = engine.submit(GenerationRequest(prompt=prompt, gen=gen, seed=seed, prefix=prefix,
                                          on_tokens=lambda r, t: first.append(time.perf_counter()) if t else None))
    while engine.has_work():
        engine.step()
    total = time.perf_counter() - t0
    return (first[0] - t0 if first else total), total, req.output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=len(QUESTIONS))
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0, help="scales the checkpoint's schedule")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model, _ = load_model(path)
    tok = Tokenizer.from_directory(path)
    base = read_generation_config(path, model.config)
    gen = base.replace(max_new_tokens=args.max_new_tokens, t_min=base.t_min * args.temperature,
                       t_max=base.t_max * args.temperature)
    c = model.config.canvas_length
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS[:args.prompts]]
    engine = Engine(model, EngineConfig(max_batch=1, max_context=1024))
    print(f"# {path.name}: C={c}, {len(prompts)} prompts, max_new_tokens {gen.max_new_tokens}, "
          f"max_denoising_steps {gen.max_denoising_steps}, temperature x{args.temperature}, {args.threads} thread(s)")
    runs = [record(engine, p, gen, seed=i) for i, p in enumerate(prompts)]
    steps = [len(s) for _, canv in runs for s in canv]
    print(f"R1 replay: {len(steps)} canvases, {statistics.mean(steps):.1f} steps per canvas on average")
    print("| confidence | stable steps | first token at step (median) | streamed by 25/50/75/100% of steps "
          "| false locks / locked |")
    print("|---|---|---|---|---|")
    for rule in RULES:
        rs = [replay(rule, canv, req, c) for req, canv in runs]
        firsts = [r["first"] for r in rs if r["first"] is not None]
        answer = sum(r["answer"] for r in rs)
        shares = "/".join(f"{100 * sum(r['by_fraction'][q] for r in rs) / max(answer, 1):.0f}%" for q in range(4))
        locked, false = sum(r["locked"] for r in rs), sum(r["false"] for r in rs)
        rate = 100 * false / max(locked, 1)
        print(f"| {rule.confidence} | {rule.steps} | {statistics.median(firsts) if firsts else '-'} "
              f"({len(firsts)}/{len(rs)} requests) | {shares} | {false}/{locked} = {rate:.2f}% |")
    first_steps = [len(canv[0]) for _, canv in runs]
    print(f"baseline: the first canvas commits after {statistics.median(first_steps)} steps (median)")
    print("R2 locking (confidence 0.9, stable over 2 steps) vs off, one request at a time:")
    timed(engine, prompts[0], gen, 0, None)  # warm-up
    rows = {}
    for prefix in (None, "lock"):
        res = [timed(engine, p, gen, i, prefix) for i, p in enumerate(prompts)]
        tokens = sum(len(o) for *_, o in res)
        rows[prefix] = res
        ttft, rate = [1000 * r[0] for r in res], tokens / sum(r[1] for r in res)
        print(f"| {'prefix (lock)' if prefix else 'canvas (off)'} | TTFT median {statistics.median(ttft):.0f} ms, "
              f"mean {statistics.mean(ttft):.0f} ms | {rate:.1f} tokens/s | {tokens} tokens |")
    same = sum(a[2] == b[2] for a, b in zip(rows[None], rows["lock"], strict=True))
    print(f"answers identical with and without locking: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
