"""Quality report of a trained checkpoint (docs/quality.md is written from its output).

Measures, on the held-out split: the encoder's next-token loss and the canvas cross-entropy at several noise
levels; then, on fixed prompts, the diffusion sampler (steps per canvas, tokens per forward, tokens/s, samples)
and the same weights decoded autoregressively (samples, tokens/s).
    python bench/quality_report.py --model src/dgemma/bundled/small --data data/corpus [--threads 1]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from dgemma.config import DataConfig
from dgemma.model.loading import load_model, read_generation_config
from dgemma.sampler.autoregressive import generate_autoregressive
from dgemma.sampler.reference import generate
from dgemma.tokenizer import Tokenizer
from dgemma.train.loop import Corpus
from dgemma.train.objective import objective
from dgemma.train.schedule import step_generator as _step_generator

PROMPTS = [("chat", "What is AI?"), ("chat", "Quote Genesis 1:3."), ("chat", "Tell me a joke."),
           ("raw", "The king said"), ("raw", "HAMLET:\nTo be, or not to be"), ("raw", "And God said")]


def heldout_losses(model, tok, data: Path, batches: int) -> dict:
    corpus = Corpus(data, "val", tok, DataConfig(batch_size=16), model.config.canvas_length)
    ar, ce = [], {t: [] for t in (0.1, 0.25, 0.5, 0.75, 1.0)}
    with torch.no_grad():
        for i in range(batches):
            batch = corpus.batch(_step_generator(12345, i))
            for t in ce:
                parts = objective(model, batch, _step_generator(12345, i, 1), pad_id=corpus.pad, self_cond_prob=0.0,
                                  t=torch.full((batch.clean.shape[0],), t))
                ce[t].append(parts.diffusion.item())
            ar.append(parts.encoder.item())
    return {"val_ar_loss": sum(ar) / len(ar), "val_canvas_ce": {str(t): sum(v) / len(v) for t, v in ce.items()}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", default="data/corpus")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype="float32")
    tok = Tokenizer.from_directory(args.model)
    report = {"model": args.model, "parameters": sum(p.numel() for p in model.parameters()),
              "torch": torch.__version__, "threads": args.threads}
    if Path(args.data).exists():
        report.update(heldout_losses(model, tok, Path(args.data), args.batches))
    gen = read_generation_config(args.model, model.config).replace(max_new_tokens=args.max_new_tokens)
    samples, diff_tokens, diff_time, steps, ar_tokens, ar_time = [], 0, 0.0, [], 0, 0.0
    for kind, text in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": text}]) if kind == "chat" else tok.encode(text)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        out = generate(model, torch.tensor([ids]), gen)
        diff_time += time.perf_counter() - t0
        diff_tokens += len(out.token_ids[0])
        steps += out.steps[0]
        t0 = time.perf_counter()
        ar = generate_autoregressive(model, torch.tensor([ids]), args.max_new_tokens,
                                     eos_token_ids=gen.eos_token_ids)
        ar_time += time.perf_counter() - t0
        ar_tokens += len(ar)
        samples.append({"prompt": text, "template": kind, "diffusion": tok.decode(out.token_ids[0]),
                        "diffusion_steps": out.steps[0], "autoregressive_greedy": tok.decode(ar)})
    report["sampler"] = {"steps_per_canvas": sum(steps) / len(steps), "max_denoising_steps": gen.max_denoising_steps,
                         "tokens_per_forward": diff_tokens / sum(steps), "tokens_per_s": diff_tokens / diff_time}
    report["autoregressive"] = {"tokens_per_s": ar_tokens / ar_time, "tokens_per_forward": 1.0}
    report["samples"] = samples
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
