"""CPU timing of one denoising step and one generate: dgemma's reference path vs transformers.

Same tiny random checkpoint, same settings, same process, one thread. Prints one JSON line.
    python bench/reference_vs_transformers.py [--canvas 256] [--vocab 4096] [--repeats 5]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from hf_fixtures import CONFIGS, build_hf_model, save_hf_checkpoint
    from transformers import DynamicCache

    from dgemma.config import GenerationConfig
    from dgemma.model.loading import load_model
    from dgemma.sampler.reference import generate

    CONFIGS["bench"] = dict(text=dict(vocab_size=args.vocab), canvas_length=args.canvas)
    hf = build_hf_model("bench", vision=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(hf, Path(tmp), max_shard_size=None)
        ours, _ = load_model(tmp)
    prompt = torch.randint(3, args.vocab, (1, args.prompt))
    canvas = torch.randint(0, args.vocab, (1, args.canvas))
    hf_cache, cache = DynamicCache(config=hf.config.text_config), ours.new_cache()
    pos = torch.arange(args.prompt, args.prompt + args.canvas)[None]
    with torch.no_grad():
        hf.model.encoder(input_ids=prompt, cache=hf_cache, position_ids=torch.arange(args.prompt)[None])
        ours.encode(prompt, cache)
        sc = hf(decoder_input_ids=canvas, cache=hf_cache, decoder_position_ids=pos).logits
        hf_step = best_of(lambda: hf(decoder_input_ids=canvas, cache=hf_cache, decoder_position_ids=pos,
                                     self_conditioning_logits=sc), args.repeats)
        our_step = best_of(lambda: ours.denoise(canvas, cache, sc), args.repeats)
    gen = GenerationConfig(max_new_tokens=args.canvas, max_denoising_steps=args.steps, eos_token_ids=(),
                           confidence_threshold=0.005)
    hf_gen = best_of(lambda: hf.generate(prompt, max_new_tokens=args.canvas, max_denoising_steps=args.steps),
                     max(1, args.repeats // 2))
    our_gen = best_of(lambda: generate(ours, prompt, gen), max(1, args.repeats // 2))
    print(json.dumps({
        "machine": f"{torch.get_num_threads()} thread(s), torch {torch.__version__}",
        "config": {"canvas": args.canvas, "vocab": args.vocab, "prompt": args.prompt, "steps": args.steps,
                   "hidden": hf.config.text_config.hidden_size, "layers": hf.config.text_config.num_hidden_layers},
        "denoise_step_ms": {"dgemma_reference": our_step * 1e3, "transformers": hf_step * 1e3,
                            "speedup": hf_step / our_step},
        "generate_s": {"dgemma_reference": our_gen, "transformers": hf_gen, "speedup": hf_gen / our_gen},
    }))


if __name__ == "__main__":
    main()
