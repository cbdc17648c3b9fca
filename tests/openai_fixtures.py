"""Shared pieces of the tests/test_openai_*.py files: a tiny checkpoint whose tokenizer has Gemma 4's format markers as
special tokens and the bundled chat template (tools in Gemma 4's format), a live server, tool definitions."""

import threading
import time

import uvicorn
from hf_fixtures import add_bpe_tokenizer

from dgemma.config import EngineConfig, ServerConfig
from dgemma.model.loading import load_model, read_generation_config
from dgemma.server.api import create_app
from dgemma.tokenizer import Tokenizer
from dgemma.train.data import CHAT_TEMPLATE

GEMMA4_MARKERS = ["<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>", "<tool_response|>", "<|tool>",
                  "<tool|>", "<|channel>", "<channel|>", "<|think|>"]
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", *GEMMA4_MARKERS]
CITIES = ["Paris", "London", "Tokyo", "Lima", "Oslo", "Cairo"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "utc": {"type": "boolean"}},
                   "required": ["city", "utc"]}}}
CORPUS = (["call:weather{city:Paris,London,Tokyo,Lima,Oslo,Cairo}response:weather{value:sunny,rainy}"] * 30
          + ["what is the weather in? It is sunny. It is rainy."] * 30  # cities only after ':' or ',': one token
          + ["call:get_weather{city: days response:get_weather{value: get_time utc true false the king night"] * 10
          + ["declaration:weather{description:weather now,parameters:{properties:{city:{type:STRING}},required:"
             "city,type:OBJECT}}system user model"] * 30)


def gemma4_checkpoint(hf_checkpoint, tmp_path_factory, name="gemma4_tok"):
    """The tiny random checkpoint with a byte-level BPE tokenizer whose specials include Gemma 4's markers, and the
    bundled (Gemma 4-format) chat template; end ids <eos> and <turn|>."""
    _, path = hf_checkpoint("base", eos=(1, 5))
    return add_bpe_tokenizer(path, tmp_path_factory.mktemp(name), CORPUS, SPECIALS, 360, CHAT_TEMPLATE)


class LiveServer:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def make_app(path, steps=4, name="tiny", gen_overrides=None, **server_kw):
    model, _ = load_model(path)
    gen = read_generation_config(path, model.config).replace(max_denoising_steps=steps, **(gen_overrides or {}))
    engine_kw = {k: server_kw.pop(k) for k in ("max_batch", "max_context") if k in server_kw}
    return create_app(model, Tokenizer.from_directory(path), gen, ServerConfig(served_model_name=name, **server_kw),
                      EngineConfig(**{"max_batch": 4, "max_context": 512, **engine_kw}))
