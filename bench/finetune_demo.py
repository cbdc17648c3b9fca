"""The fine-tuning demo: teach the bundled model a task it was never trained on (`json_get`: read one field of a
JSON object) with a LoRA adapter on 2 CPU cores, and measure exact-match accuracy on held-out prompts
before and after.

    python bench/finetune_demo.py data --out data/json_get            # train.jsonl (2000) and test.jsonl (100)
    dgemma finetune --data data/json_get/train.jsonl --out runs/json_get --lora-rank 16 --lr 2e-3 --warmup 20 \\
        --steps 300 --batch-size 16 --eval-fraction 0.05 --threads 2
    python bench/finetune_demo.py eval --data data/json_get/test.jsonl                        # the base model
    python bench/finetune_demo.py eval --data data/json_get/test.jsonl --adapter runs/json_get # with the adapter

`eval` runs the engine (default sampler, the checkpoint's settings, seed = example index) and prints the exact-match
rate, tokens per forward and the time taken; then greedy autoregressive decoding of the same weights and its
exact-match rate (the bundled model's denoiser is much weaker than its causal head: docs/quality.md).
`--family` picks another family of `dgemma.tasks`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from dgemma import tasks  # noqa: E402
from dgemma.bundled import bundled_model_dir  # noqa: E402
from dgemma.config import EngineConfig  # noqa: E402
from dgemma.engine.engine import Engine, GenerationRequest  # noqa: E402
from dgemma.model.loading import load_model, read_generation_config  # noqa: E402
from dgemma.sampler.autoregressive import generate_autoregressive  # noqa: E402
from dgemma.sampler.stats import GenerationStats  # noqa: E402
from dgemma.tokenizer import Tokenizer  # noqa: E402


def cmd_data(args) -> None:
    out = Path(args.out)
    tasks.write_jsonl(out / "train.jsonl", tasks.examples(args.family, args.train, "train"))
    tasks.write_jsonl(out / "test.jsonl", tasks.examples(args.family, args.test, "test"))
    print(f"wrote {out}/train.jsonl ({args.train}) and {out}/test.jsonl ({args.test})")


def cmd_eval(args) -> dict:
    from dgemma.train.lora import load_adapter

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else bundled_model_dir()
    model, _ = load_model(path)
    if args.adapter:
        load_adapter(model, args.adapter)
    tok = Tokenizer.from_directory(path)
    gen = read_generation_config(path, model.config).replace(max_new_tokens=args.max_new_tokens)
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    items = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    engine = Engine(model, EngineConfig(max_batch=8, max_context=512))
    t0 = time.perf_counter()
    reqs = [engine.submit(GenerationRequest(prompt=tok.encode_chat([{"role": "user", "content": p}]), gen=gen,
                                            seed=i)) for i, (p, _) in enumerate(items)]
    while engine.has_work():
        engine.step()
    seconds = time.perf_counter() - t0
    outputs = [tok.decode(r.output).strip() for r in reqs]
    exact = sum(tasks.score(args.family, o, a) for o, (_, a) in zip(outputs, items, strict=True))
    stats = GenerationStats(sum(len(r.output) for r in reqs), [s for r in reqs for s in r.steps], seconds)
    ar = [tok.decode(generate_autoregressive(model, torch.tensor([tok.encode_chat([{"role": "user", "content": p}])]),
                                             args.max_new_tokens, eos_token_ids=gen.eos_token_ids)).strip()
          for p, _ in items]
    ar_exact = sum(tasks.score(args.family, o, a) for o, (_, a) in zip(ar, items, strict=True))
    result = {"family": args.family, "examples": len(items), "exact_match": exact / len(items),
              "exact_match_autoregressive": ar_exact / len(items), "tokens_per_forward": stats.tokens_per_forward,
              "seconds": seconds, "adapter": args.adapter, "sample": outputs[:3], "sample_autoregressive": ar[:3]}
    print(json.dumps(result))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data")
    d.add_argument("--family", default="json_get", choices=sorted(tasks.FAMILIES))
    d.add_argument("--out", default="data/json_get")
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--test", type=int, default=100)
    e = sub.add_parser("eval")
    e.add_argument("--data", required=True)
    e.add_argument("--family", default="json_get", choices=sorted(tasks.FAMILIES))
    e.add_argument("--model", default=None)
    e.add_argument("--adapter", default=None)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    cmd_data(args) if args.command == "data" else cmd_eval(args)


if __name__ == "__main__":
    main()
