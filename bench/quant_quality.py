"""Quality of quantized weights against the unquantized model (docs/quant.md is written from its output).

For the tiny random preset and the bundled model, each scheme (FP8, NVFP4) and, as a yardstick, the same weights
rounded to bf16 (computed in fp32): on fixed prompts (free text and structured), the denoiser's logits for a
noise canvas and for the fp32 model's own answer canvas: relative error ||q - ref|| / ||ref|| and top-1 agreement
per position; the causal pass's next-token loss on prompt + the fp32 model's answer (fp32 model, variant); then whole
answers with the engine (same seed): the share of identical tokens and the length of the identical prefix; and how
far the engine's dequantizing products are from the dequantizing reference.
    PYTHONPATH=src python bench/quant_quality.py [--threads 2] [--max-new-tokens 64]
"""

import argparse
import json

import torch

from dgemma.bundled import resolve_model
from dgemma.config import EngineConfig
from dgemma.engine.engine import Engine
from dgemma.engine.forward import denoise_rows, encode_row
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.model.init import preset_config, random_model
from dgemma.model.loading import load_model, read_generation_config
from dgemma.model.quant import resident_weight_bytes
from dgemma.model.quantize import quantize_model
from dgemma.tokenizer import Tokenizer

FREE = ["The king said", "HAMLET:\nTo be, or not to be", "And God said", "Why is the sky blue? Because"]
STRUCTURED = ['{"name": "Alice", "age": 30, "city": "', "1. apples\n2. pears\n3.", "def add(a, b):\n    return",
              "| name | score |\n|---|---|\n| Ann | 3 |\n|"]


def prompts(model, tok):
    if tok is None:  # the random preset: random ids stand for text
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (8, 20, 33, 50)]
        return {"free": ids, "structured": []}
    return {"free": [tok.encode(t) for t in FREE], "structured": [tok.encode(t) for t in STRUCTURED]}


def logits(model, ids, canvas):
    cache = model.new_cache()
    model.encode(torch.tensor([ids]), cache)
    return model.denoise(canvas, cache)


def nll(model, ids):
    """Mean next-token negative log-likelihood (nats) of `ids` under the model's causal (encoder) pass."""
    hidden = model.encode(torch.tensor([ids]), return_hidden=True)
    logp = model.logits(hidden)[0, :-1].log_softmax(-1)
    return -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()


def answers(model, ids, gen, seeds):
    engine = Engine(model, EngineConfig(max_batch=len(ids), max_context=max(map(len, ids)) + gen.max_new_tokens + 64))
    return [r.output for r in engine.generate(ids, gen, seeds)]


def compare(variant, ref, prompt_sets, gen):
    out = {}
    for kind, ids in prompt_sets.items():
        if not ids:
            continue
        ref_answers = answers(ref, ids, gen, list(range(len(ids))))
        got_answers = answers(variant, ids, gen, list(range(len(ids))))
        errs, agree, nll_ref, nll_q = [], [], [], []
        g = torch.Generator().manual_seed(1)
        c = ref.config.canvas_length
        for p, a in zip(ids, ref_answers, strict=True):
            noise = torch.randint(0, ref.config.vocab_size, (1, c), generator=g)
            answer = torch.tensor([(a + [0] * c)[:c]])
            nll_ref.append(nll(ref, p + a))
            nll_q.append(nll(variant, p + a))
            for canvas in (noise, answer):
                r, q = logits(ref, p, canvas), logits(variant, p, canvas)
                errs.append(((q - r).norm() / r.norm()).item())
                agree.append((q.argmax(-1) == r.argmax(-1)).float().mean().item())
        same = [sum(x == y for x, y in zip(a, b, strict=False)) / max(1, len(a)) for a, b in
                zip(ref_answers, got_answers, strict=True)]
        prefix = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                  for a, b in zip(ref_answers, got_answers, strict=True)]
        out[kind] = {"logits_rel_error": sum(errs) / len(errs), "top1_agreement": sum(agree) / len(agree),
                     "nll_of_fp32_answers": [sum(nll_ref) / len(nll_ref), sum(nll_q) / len(nll_q)],
                     "answer_tokens_identical": sum(same) / len(same), "identical_prefix": sum(prefix) / len(prefix)}
    return out


def fast_vs_reference(model, ids):
    c = model.config.canvas_length
    canvas = torch.randint(0, model.config.vocab_size, (1, c), generator=torch.Generator().manual_seed(2))
    ref = logits(model, ids, canvas)
    cache = StaticKVCache(model.config, 1, len(ids) + 2 * c, "cpu", model.dtype)
    encode_row(model, cache, 0, torch.tensor([ids]))
    fast = model.logits(denoise_rows(model, cache, canvas, torch.zeros(1, c, model.config.hidden_size)))
    return ((fast - ref).norm() / ref.norm()).item()


def bf16_rounded(model):
    twin = random_model(model.config, seed=0)
    twin.load_state_dict({k: v.bfloat16().float() for k, v in model.state_dict().items()})
    return twin


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bundled = resolve_model(None)
    models = {"tiny (random)": (random_model(preset_config("tiny"), seed=0), None, None),
              "bundled": (load_model(bundled, dtype="float32")[0], Tokenizer.from_directory(bundled), bundled)}
    report = {"torch": torch.__version__, "threads": args.threads}
    for name, (model, tok, directory) in models.items():
        gen_cfg = (read_generation_config(directory, model.config) if directory else None)
        if gen_cfg is None:
            from dgemma.config import GenerationConfig

            gen_cfg = GenerationConfig(eos_token_ids=())
        gen = gen_cfg.replace(max_new_tokens=args.max_new_tokens, eos_token_ids=())
        sets = prompts(model, tok)
        entry = {"resident_weight_bytes": {"fp32": resident_weight_bytes(model)}}
        entry["bf16 weights"] = compare(bf16_rounded(model), model, sets, gen)
        for scheme in ("fp8", "nvfp4"):
            q = quantize_model(model, scheme)
            entry["resident_weight_bytes"][scheme] = resident_weight_bytes(q)
            entry[scheme] = compare(q, model, sets, gen)
            entry[scheme]["fast_vs_reference_rel"] = fast_vs_reference(q, sets["free"][0])
        report[name] = entry
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
