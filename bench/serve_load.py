"""Latency and throughput of `dgemma serve` for 1, 8 and 32 concurrent clients (real uvicorn on loopback,
the official openai client). Prints one JSON line per concurrency level.

    python bench/serve_load.py [--model bundled] [--max-tokens 64] [--requests-per-client 2]
"""

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import openai
import torch
import uvicorn

from dgemma.bundled import resolve_model
from dgemma.config import EngineConfig, ServerConfig
from dgemma.model.loading import load_model, read_generation_config
from dgemma.server.api import create_app
from dgemma.tokenizer import Tokenizer

PROMPTS = ["What is AI?", "Quote Genesis 1:3.", "Tell me a joke.", "Who are you?", "What is love?"]


def start(app):
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


async def client_run(client, i, n, max_tokens):
    out = []
    for k in range(n):
        t0 = time.perf_counter()
        first = None
        tokens = 0
        stream = await client.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
            max_tokens=max_tokens, seed=i * 100 + k, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        out.append((time.perf_counter() - t0, first if first is not None else time.perf_counter() - t0, tokens))
    return out


async def level(url, concurrency, n, max_tokens):
    # closed inside the event loop (left to garbage collection it would close after the loop, with a traceback)
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(client_run(client, i, n, max_tokens) for i in range(concurrency)))
        wall = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    lat = sorted(r[0] for r in flat)
    return {"concurrency": concurrency, "requests": len(flat), "wall_s": wall,
            "tokens_per_s": sum(r[2] for r in flat) / wall, "latency_p50_s": statistics.median(lat),
            "latency_p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))],
            "ttft_p50_s": statistics.median(r[1] for r in flat),
            "mean_completion_tokens": statistics.mean(r[2] for r in flat)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="bundled")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="compiled engine step (built before the first level)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model, _ = load_model(path)
    gen = read_generation_config(path, model.config)
    levels = [int(x) for x in args.levels.split(",")]
    app = create_app(model, Tokenizer.from_directory(path), gen, ServerConfig(served_model_name="bench", max_queue=256),
                     EngineConfig(max_batch=max(levels), max_context=1024, compile=args.compile))
    server, thread, port = start(app)
    try:
        for c in levels:
            r = asyncio.run(level(f"http://127.0.0.1:{port}/v1", c, args.requests_per_client, args.max_tokens))
            r.update(model=str(Path(path).name), threads=args.threads, max_tokens=args.max_tokens,
                     compile=args.compile)
            print(json.dumps(r), flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    sys.exit(0)


if __name__ == "__main__":
    main()
