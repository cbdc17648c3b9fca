"""Per-step time of several checkpoints in one process, interleaved (docs/quant.md's CPU speed table).

On a shared CPU the load changes from minute to minute; running the engines in turns and keeping the minimum
and the 25th percentile compares them under the same conditions. Each round: one request per engine (prompt of
64 tokens, fixed steps, no early stop), 8 timed denoising steps, then the request is cancelled.
    PYTHONPATH=src python bench/quant_speed.py bundled DIR_FP8 DIR_NVFP4 --bf16 --threads 1 --rounds 10 [--compile]
A checkpoint name `bundled` means the bundled model; `--bf16` adds the first checkpoint loaded as bf16.
"""

import argparse
import time

import torch

from dgemma.bundled import resolve_model
from dgemma.config import EngineConfig, GenerationConfig
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.model.loading import load_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dirs = [resolve_model(None if m == "bundled" else m) for m in args.models]
    specs = [(m, d, None) for m, d in zip(args.models, dirs, strict=True)]
    if args.bf16:
        specs.insert(1, (f"{args.models[0]} bf16", dirs[0], "bfloat16"))
    gen = GenerationConfig(max_new_tokens=32, max_denoising_steps=64, confidence_threshold=0.0, eos_token_ids=())
    engines = {name: Engine(load_model(d, dtype=dtype)[0], EngineConfig(max_batch=1, max_context=256,
                                                                        compile=args.compile))
               for name, d, dtype in specs}
    samples = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            engine.submit(GenerationRequest(prompt=list(range(3, 67)), gen=gen, seed=0))
            engine.step()  # admits, prefills, first step (compiles on first use)
            for _ in range(8):
                t0 = time.perf_counter()
                engine.step()
                samples[name].append(time.perf_counter() - t0)
            for row in engine.rows:
                row.request.cancelled = True
            engine.step()
    for name, s in samples.items():
        s.sort()
        print(f"{name}: min {s[0] * 1e3:.2f} p25 {s[len(s) // 4] * 1e3:.2f} median {s[len(s) // 2] * 1e3:.2f} ms/step")


if __name__ == "__main__":
    main()
