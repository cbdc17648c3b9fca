"""`dgemma bench`: end-to-end speed of the engine on one model, optionally against a baseline measured in
the same process on the same weights and settings.

Baselines: `transformers` (its `generate`, imported only here; the engine never imports it) and `ar` (the
same weights decoded autoregressively, one token per forward: the "faster than autoregressive" question).
Every figure comes from this run; nothing is compared across runs. Returns a dict that the CLI prints; it includes
`resident_weight_bytes`, the bytes the weights occupy in memory (compressed ones at their compressed size).
"""

from __future__ import annotations

import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dgemma.config import BenchConfig, ConfigError, EngineConfig, GenerationConfig, ModelConfig, check_request
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.quant import resident_weight_bytes
from dgemma.sampler.stats import GenerationStats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _weight_bytes_per_step(model: DiffusionGemma, batch_tokens: int) -> int:
    """Bytes of weights one denoising step reads: every dense weight once, the experts that
    `batch_tokens` x top_k routed tokens can touch (all of them when that exceeds num_experts)."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if ".experts." in name:
            nbytes = nbytes * min(1.0, batch_tokens * cfg.top_k_experts / cfg.num_experts)
        total += nbytes
    return int(total)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_engine(model: DiffusionGemma, gen: GenerationConfig, cfg: BenchConfig,
               constraint: Callable[[], Any] | None = None) -> dict:
    """The engine on `cfg.batch` random prompts; `constraint` makes each request's structured-output constraint
    (then the result also reports the mask time per constrained step and how much of it the steps waited)."""
    device = model.device
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = [torch.randint(3, model.config.vocab_size, (cfg.prompt_tokens,), generator=g).tolist()
               for _ in range(cfg.batch)]
    check_request(model.config, gen, prompts[0])
    context = cfg.prompt_tokens + cfg.max_new_tokens + model.config.canvas_length
    engine = Engine(model, EngineConfig(max_batch=cfg.batch, max_context=context, compile=cfg.compile,
                                        cuda_graphs=cfg.cuda_graphs))
    for _ in range(cfg.warmup):
        engine.generate(prompts, gen.replace(max_new_tokens=model.config.canvas_length), list(range(cfg.batch)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = None
    for rep in range(cfg.repeats):
        engine.nfe, engine.constraint_wait_seconds = 0, 0.0
        _sync(device)
        t0 = time.perf_counter()
        reqs = [engine.submit(GenerationRequest(prompt=p, gen=gen, seed=cfg.seed + rep * 1000 + i,
                                                constraint=constraint() if constraint else None))
                for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
        _sync(device)
        seconds = time.perf_counter() - t0
        if best is None or seconds < best[0]:
            best = (seconds, reqs, engine.nfe, engine.constraint_wait_seconds)
    seconds, reqs, nfe, waited = best
    stats = GenerationStats(sum(len(r.output) for r in reqs), [s for r in reqs for s in r.steps], seconds)
    ttft = min(r.first_token_at for r in reqs) - min(r.submitted_at for r in reqs)
    ms_step = _time_step(model, engine, prompts, gen)  # one isolated step at this batch: ms/step, bandwidth
    weight_bytes = _weight_bytes_per_step(model, cfg.batch * model.config.canvas_length)
    result = {
        "tokens": stats.tokens, "seconds": seconds, "tokens_per_s": stats.tokens_per_s, "ttft_s": ttft,
        "ms_per_step": ms_step, "steps_per_canvas": stats.steps_per_canvas, "nfe": nfe,
        "tokens_per_forward": stats.tokens_per_forward, "weight_bytes_per_step": weight_bytes,
        "achieved_gb_per_s": weight_bytes / (ms_step / 1e3) / 1e9, "peak_memory_bytes": _peak_memory(device),
    }
    if constraint is not None:
        steps = sum(r.constraint.steps for r in reqs)
        result["mask_ms_per_step"] = 1e3 * sum(r.constraint.mask_seconds for r in reqs) / max(1, steps)
        result["mask_wait_ms_per_step"] = 1e3 * waited / max(1, nfe)
        result["finish_reasons"] = [r.finish_reason for r in reqs]
    return result


def _time_step(model: DiffusionGemma, engine: Engine, prompts: list[list[int]], gen: GenerationConfig) -> float:
    """Median wall time of one engine step with every row denoising (no commits)."""
    fixed = gen.replace(max_denoising_steps=64, confidence_threshold=0.0, max_new_tokens=model.config.canvas_length)
    for i, p in enumerate(prompts):
        engine.submit(GenerationRequest(prompt=p, gen=fixed, seed=i))
    engine.step()  # admits and runs the first step
    times = []
    for _ in range(8):
        _sync(model.device)
        t0 = time.perf_counter()
        engine.step()
        _sync(model.device)
        times.append(time.perf_counter() - t0)
    for r in engine.rows:
        r.request.cancelled = True
    engine.step()
    times.sort()
    return times[len(times) // 2] * 1e3


def run_transformers(model_dir: Path, model: DiffusionGemma, gen: GenerationConfig, cfg: BenchConfig) -> dict:
    from transformers import DiffusionGemmaForBlockDiffusion
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the vision tower our text checkpoints leave out
    try:
        hf = DiffusionGemmaForBlockDiffusion.from_pretrained(model_dir, dtype=model.dtype).to(model.device).eval()
    finally:
        hf_logging.set_verbosity(level)
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(3, model.config.vocab_size, (cfg.batch, cfg.prompt_tokens), generator=g).to(model.device)
    kwargs = dict(max_new_tokens=gen.max_new_tokens, max_denoising_steps=gen.max_denoising_steps, t_min=gen.t_min,
                  t_max=gen.t_max, sampler_config=None, stability_threshold=gen.stability_threshold,
                  confidence_threshold=gen.confidence_threshold or 1e-30,  # transformers rejects 0: never confident
                  eos_token_id=list(gen.eos_token_ids) or None, pad_token_id=gen.pad_token_id)
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=float(gen.entropy_bound))
    with torch.no_grad():
        for _ in range(cfg.warmup):
            hf.generate(prompt, **{**kwargs, "max_new_tokens": model.config.canvas_length})
        best = None
        for _ in range(cfg.repeats):
            _sync(model.device)
            t0 = time.perf_counter()
            out = hf.generate(prompt, **kwargs)
            _sync(model.device)
            seconds = time.perf_counter() - t0
            best = seconds if best is None else min(best, seconds)
    new = out.sequences.shape[1] - cfg.prompt_tokens
    tokens = min(new, gen.max_new_tokens) * cfg.batch
    return {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best}


def run_autoregressive(model: DiffusionGemma, gen: GenerationConfig, cfg: BenchConfig) -> dict:
    from dgemma.sampler.autoregressive import generate_autoregressive

    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(3, model.config.vocab_size, (1, cfg.prompt_tokens), generator=g).to(model.device)
    generate_autoregressive(model, prompt, 4)
    best = None
    for _ in range(cfg.repeats):
        _sync(model.device)
        t0 = time.perf_counter()
        out = generate_autoregressive(model, prompt, gen.max_new_tokens)  # no EOS: always the full length
        _sync(model.device)
        seconds = time.perf_counter() - t0
        best = seconds if best is None else min(best, seconds)
    return {"tokens": len(out), "seconds": best, "tokens_per_s": len(out) / best, "batch": 1}


def benchmark(model: DiffusionGemma, model_dir: Path | None, gen: GenerationConfig, cfg: BenchConfig,
              constraint: Callable[[], Any] | None = None) -> dict:
    overrides = {"max_new_tokens": cfg.max_new_tokens, "max_denoising_steps": cfg.max_denoising_steps,
                 "confidence_threshold": cfg.confidence_threshold}
    gen = gen.replace(**overrides)
    result = {"device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "parameters": sum(p.numel() for p in model.parameters()), "batch": cfg.batch,
              "quantization": model.config.quantization and model.config.quantization.scheme,
              "resident_weight_bytes": resident_weight_bytes(model),
              "prompt_tokens": cfg.prompt_tokens, "max_new_tokens": gen.max_new_tokens,
              "max_denoising_steps": gen.max_denoising_steps, "confidence_threshold": gen.confidence_threshold,
              "compile": cfg.compile, "cuda_graphs": cfg.cuda_graphs}
    if model.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(model.device)
    result.update(run_engine(model, gen, cfg, constraint))
    if cfg.baseline == "transformers":
        if model_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                from dgemma.model.loading import save_model

                save_model(model, tmp, generation_config=gen)
                base = run_transformers(Path(tmp), model, gen, cfg)
        else:
            base = run_transformers(model_dir, model, gen, cfg)
    elif cfg.baseline == "ar":
        base = run_autoregressive(model, gen, cfg)
    elif cfg.baseline is None:
        return result
    else:
        raise ConfigError(f"unknown baseline {cfg.baseline!r}; use 'transformers' or 'ar'")
    result["baseline"] = cfg.baseline
    result["baseline_tokens_per_s"] = base["tokens_per_s"]
    result["baseline_seconds"] = base["seconds"]
    result["ratio"] = result["tokens_per_s"] / base["tokens_per_s"]
    return result


def random_model_from_config(path: str, device: str, dtype: str | None, seed: int = 0) -> DiffusionGemma:
    import json

    from dgemma.model.init import random_model

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"--random-config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--random-config {path}: must hold a JSON object")
    if "text_config" in data:
        config = ModelConfig.from_hf_dict(data)
    else:
        try:
            config = ModelConfig(**data)
        except TypeError as exc:
            raise ConfigError(f"--random-config {path}: {exc}") from None
    if dtype:
        config.dtype = dtype
    return random_model(config, seed=seed, device=device)
