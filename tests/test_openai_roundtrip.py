"""A tool-calling round trip on a model fine-tuned for it: a tiny checkpoint whose tokenizer has Gemma 4's markers
as special tokens is fine-tuned (`dgemma.train.finetune.finetune`, every weight, seconds) on a few dozen tool-call
conversations in Gemma 4's format; then, through the server and the openai client with tool_choice "auto", it calls
the tool, gets the result in a `tool` message, and answers in plain text. About two minutes on a 2-core CPU
(400 optimisation steps): marked slow."""

import json

import openai
import pytest
from openai_fixtures import CITIES, LiveServer, gemma4_checkpoint, make_app

from dgemma.config import FinetuneConfig, SFTData
from dgemma.tokenizer import Tokenizer
from dgemma.train.finetune import finetune
from dgemma.train.sft_data import load_examples

pytestmark = pytest.mark.slow
CONDITIONS = ["sunny", "rainy"]
TOWNS = CITIES[:3]
# a name and a key that are one token each in the test tokenizer, so that a call fits one 16-token canvas
WEATHER = {"type": "function", "function": {"name": "weather", "description": "weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _conversation(city: str, weather: str) -> dict:
    return {"tools": [WEATHER], "messages": [
        {"role": "user", "content": f"what is the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather",
                                                             "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": weather},
        {"role": "assistant", "content": f"It is {weather}."}]}


@pytest.fixture(scope="module")
def tuned(hf_checkpoint, tmp_path_factory):
    base = gemma4_checkpoint(hf_checkpoint, tmp_path_factory, "roundtrip_base")
    work = tmp_path_factory.mktemp("roundtrip")
    rows = [_conversation(c, w) for c in TOWNS for w in CONDITIONS] * 4  # 24 conversations, 48 examples
    (work / "tools.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = FinetuneConfig(model=str(base), out=str(work / "run"), eval_every=1000, save_every=1000, log_every=1000)
    cfg.data = SFTData(data=str(work / "tools.jsonl"), batch_size=8, eval_fraction=0.0, max_length=256)
    cfg.optim.steps, cfg.optim.lr, cfg.optim.warmup = 400, 6e-3, 10
    return finetune(cfg), base, work / "tools.jsonl"


def test_tool_conversations_become_examples_of_both_turns(tuned):
    _, base, data = tuned
    tok = Tokenizer.from_directory(base)
    examples, report = load_examples(data, tok, (1, 5), 16, SFTData())
    assert report.examples == 48
    call, answer = examples[0], examples[1]
    keep = frozenset(tok.special_ids(["<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>",
                                      "<tool_response|>"]).values())
    assert tok.decode(call.response[:call.answer_length], keep=keep) == \
        '<|tool_call>call:weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
    assert tok.decode(answer.response[:answer.answer_length]) == "It is sunny."
    assert tok.decode(answer.prompt, keep=keep).endswith(
        '<|tool_response>response:weather{value:<|"|>sunny<|"|>}<tool_response|>')


def test_call_result_answer_round_trip_through_the_server(tuned):
    model_dir, _, _ = tuned
    with LiveServer(make_app(model_dir, steps=16)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for city, weather in (("Tokyo", "rainy"), ("Paris", "sunny"), ("London", "rainy")):
            messages = [{"role": "user", "content": f"what is the weather in {city}?"}]
            first = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=32,
                                                   temperature=0, seed=1).choices[0]
            assert first.finish_reason == "tool_calls", first
            (call,) = first.message.tool_calls
            assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": city}
            messages += [first.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": weather}]
            second = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=32,
                                                    temperature=0, seed=1).choices[0]
            assert second.finish_reason == "stop" and not second.message.tool_calls
            assert second.message.content == f"It is {weather}."
            streamed = client.chat.completions.create(model="tiny", messages=messages[:1], tools=[WEATHER],
                                                      max_tokens=32, temperature=0, seed=1, stream=True)
            deltas = [t for ch in streamed for c in ch.choices for t in (c.delta.tool_calls or [])]
            assert [(d.function.name, d.function.arguments) for d in deltas] == \
                [("weather", call.function.arguments)]
