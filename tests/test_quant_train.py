"""LoRA on a quantized base (QLoRA): `dgemma finetune` on an FP8 checkpoint learns while the base stays compressed
and untouched (autograd never keeps a dequantized weight), the adapter applies to the quantized and the bf16/fp32
base, the engine's products with the adapter beside them equal the reference hooks, merging is refused; and
`dgemma bench --json` reports the resident weight bytes."""

import json

import pytest
import torch
from test_finetune import _cfg, _task, _write

from dgemma.cli import main
from dgemma.config import ConfigError, EngineConfig
from dgemma.engine.engine import Engine
from dgemma.engine.forward import denoise_rows, encode_row
from dgemma.engine.kv_cache import StaticKVCache
from dgemma.model import quant
from dgemma.model.loading import load_model, read_generation_config
from dgemma.model.quant import QuantLinear, resident_weight_bytes
from dgemma.tokenizer import Tokenizer
from dgemma.train.finetune import finetune
from dgemma.train.lora import AdapterError, attach_adapter, load_adapter, merge_adapter
from dgemma.train.objective import objective
from dgemma.train.sft_data import SFTData, collate, load_examples


@pytest.fixture(scope="module")
def quantized(checkpoint_with_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "fp8"
    assert main(["quantize", "--model", str(checkpoint_with_tokenizer), "--scheme", "fp8", "--out", str(out)]) == 0
    return out


def test_lora_on_a_quantized_base_learns_and_applies_to_both_bases(checkpoint_with_tokenizer, quantized, tmp_path):
    data = _write(tmp_path / "task.jsonl", _task(40))
    adapter_dir = finetune(_cfg(quantized, tmp_path, data, steps=12))
    state = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert state["history"][-1]["eval_loss"] < state["history"][0]["eval_loss"]
    before, _ = load_model(quantized)
    q, _ = load_model(quantized)
    plain, _ = load_model(checkpoint_with_tokenizer)
    canvas = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    prompt = torch.tensor([[2, 40, 41, 42, 43]])
    for model in (q, plain):
        bare = _denoise(model, prompt, canvas)
        load_adapter(model, adapter_dir)  # no weight fingerprint to refuse: a compressed base vouches for none
        assert (_denoise(model, prompt, canvas) - bare).abs().max() > 1e-3  # the adapter acts on both bases
    # the engine adds the update beside its dequantizing products; the reference through the hooks
    cache = StaticKVCache(q.config, 1, 128, "cpu", q.dtype)
    encode_row(q, cache, 0, prompt)
    fast = q.logits(denoise_rows(q, cache, canvas, torch.zeros(1, 16, q.config.hidden_size)))
    torch.testing.assert_close(fast, _denoise(q, prompt, canvas), atol=1e-4, rtol=1e-4)
    gen = read_generation_config(quantized, q.config).replace(max_new_tokens=16, max_denoising_steps=3,
                                                              eos_token_ids=())
    assert len(Engine(q, EngineConfig(max_batch=1, max_context=64)).generate([[2, 40, 41]], gen, [1])[0].output) == 16
    for a, b in zip(before.state_dict().values(), q.state_dict().values(), strict=True):  # the base is untouched
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    with pytest.raises(AdapterError, match="quantized base"):
        merge_adapter(q)
    assert main(["merge", "--model", str(quantized), "--adapter", str(adapter_dir), "--out", str(tmp_path / "m")]) == 2
    with pytest.raises(ConfigError, match="LoRA adapters"):
        finetune(_cfg(quantized, tmp_path / "full", data, steps=2, lora_rank=0))


def _denoise(model, prompt, canvas):
    cache = model.new_cache()
    model.encode(prompt, cache)
    return model.denoise(canvas, cache)


def test_backward_through_the_compressed_base_keeps_no_dequantized_weight(quantized, monkeypatch):
    """Every dequantized matrix of a training step is kept alive here, so no address is reused; none of them is
    among the tensors autograd saves for backward (they are formed again in backward), and only the adapter gets
    gradients."""
    model, _ = load_model(quantized)
    adapter = attach_adapter(model)
    made = []
    original = quant._Compressed.dequantize

    def recorded(self, *args, **kwargs):
        made.append(original(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(quant._Compressed, "dequantize", recorded)
    tok = Tokenizer.from_directory(quantized)
    examples, _ = load_examples(_write(quantized.parent / "bw.jsonl", _task(2)), tok, (1, 5), 16, SFTData())
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective(model, collate(examples, 0), torch.Generator().manual_seed(0), pad_id=0).total
    forward_made = {t.untyped_storage().data_ptr() for t in made}
    assert forward_made and not forward_made & set(saved)
    loss.backward()
    assert len(made) > len(forward_made)  # formed again in backward
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in adapter.parameters())
    assert any(isinstance(m, QuantLinear) for m in model.modules())


def test_bench_json_reports_resident_weight_bytes(quantized, capsys):
    argv = ["bench", "--model", str(quantized), "--json", "--max-new-tokens", "16", "--max-denoising-steps", "2",
            "--repeats", "1", "--warmup", "0", "--prompt-tokens", "8"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    model, _ = load_model(quantized)
    assert result["resident_weight_bytes"] == resident_weight_bytes(model) and result["quantization"] == "fp8"
