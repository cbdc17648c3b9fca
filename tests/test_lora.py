"""LoRA adapters: round trip through peft onto transformers, merge, base checks, frozen base under training."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_parity import _run_both

from dgemma.model.init import preset_config, random_model
from dgemma.model.loading import load_model
from dgemma.train.lora import (
    LoraConfig,
    attach_adapter,
    attached_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    target_linears,
    trainable_parameters,
)
from dgemma.train.objective import Batch, objective


def _nonzero_adapter(model, config, seed=0):
    """An adapter whose B is not zero, so that every comparison below can fail."""
    adapter = attach_adapter(model, config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for pair in adapter.pairs().values():
            pair.lora_B.weight.copy_(0.05 * torch.randn(pair.lora_B.weight.shape, generator=gen))
    return adapter


def _forward_all(model, seed=5):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.config.vocab_size, (2, 21), generator=gen)
    canvas = torch.randint(0, model.config.vocab_size, (2, model.config.canvas_length), generator=gen)
    with torch.no_grad():
        cache = model.new_cache()
        hidden = model.encode(prompt, cache, return_hidden=True)
        return hidden, model.denoise(canvas, cache)


def test_config_targets_and_peft_regex():
    config = LoraConfig(targets="q_proj, v_proj,down_proj")
    assert config.targets == ("q_proj", "v_proj", "down_proj") and config.scale == 2.0
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        LoraConfig(targets="q_proj,proj")
    model = random_model(preset_config("tiny"))
    names = sorted(target_linears(model, LoraConfig().targets))
    # 4 layers: sliding layers have q,k,v,o + 3 MLP linears, full layers have no v_proj (K = V)
    assert len(names) == 2 * 7 + 2 * 6
    assert not [n for n in names if "self_conditioning" in n or "router" in n or "experts" in n]


def test_adapter_matches_peft_on_transformers(hf_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import DiffusionGemmaForBlockDiffusion

    _, path = hf_checkpoint("base")
    ours, _ = load_model(path, dtype="float32")
    base_hidden, base_logits = _forward_all(ours)
    adapter = _nonzero_adapter(ours, LoraConfig(rank=4, alpha=8))
    save_adapter(adapter, tmp_path / "adapter", base_model_name_or_path=str(path))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] is None and saved["r"] == 4 and saved["lora_alpha"] == 8

    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    injected = [n for n, _ in peft_model.named_modules() if n.endswith(".lora_A")]
    assert len(injected) == 2 * len(adapter.target_names)  # encoder + decoder copies, nothing else
    assert not [n for n in injected if "vision" in n or "self_conditioning" in n or "router" in n]

    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, ours.config.vocab_size, (2, 30), generator=gen)
    pairs = _run_both(peft_model.base_model.model, ours, prompt, 2, gen)
    for ref, out in pairs:  # encoder hidden states, denoiser logits, denoiser logits with self-conditioning
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    hidden, logits = _forward_all(ours)
    assert (hidden - base_hidden).abs().max() > 1e-3 and (logits - base_logits).abs().max() > 1e-3


def test_merge_adds_update_once(hf_checkpoint):
    _, path = hf_checkpoint("base")
    ours, _ = load_model(path, dtype="float32")
    adapter = _nonzero_adapter(ours, LoraConfig(rank=4, alpha=8, targets="q_proj,o_proj,up_proj,down_proj"))
    q_proj = ours.stack.layers[1].self_attn.q_proj
    weight = q_proj.weight.clone()
    delta = adapter.get_submodule("model.decoder.layers.1.self_attn.q_proj").delta_weight().detach()
    hidden, logits = _forward_all(ours)
    merge_adapter(ours)
    assert attached_adapter(ours) is None
    torch.testing.assert_close(q_proj.weight, weight + delta, atol=1e-6, rtol=0)  # once, not twice as peft
    merged_hidden, merged_logits = _forward_all(ours)
    # W x + B(A x) vs (W + BA) x differ by fp32 reassociation only: 1e-5 relative to the largest value
    torch.testing.assert_close(merged_hidden, hidden, atol=1e-5 * hidden.abs().max().item(), rtol=0)
    torch.testing.assert_close(merged_logits, logits, atol=1e-5, rtol=1e-5)
    assert "q_proj.weight" in next(k for k in ours.state_dict() if "q_proj" in k)  # names untouched


def test_load_round_trip_and_refusals(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("base")
    ours, _ = load_model(path, dtype="float32")
    adapter = _nonzero_adapter(ours, LoraConfig(rank=4, alpha=8))
    logits = _forward_all(ours)[1]
    save_adapter(adapter, tmp_path / "a")

    fresh, _ = load_model(path, dtype="float32")
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded.config.rank == 4 and loaded.config.targets == adapter.config.targets
    torch.testing.assert_close(_forward_all(fresh)[1], logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        load_adapter(fresh, tmp_path / "a")

    wide = random_model(preset_config("tiny", vocab_size=384, hidden_size=96))
    with pytest.raises(ValueError, match="different base architecture"):
        load_adapter(wide, tmp_path / "a")

    # no metadata (as peft writes it): the shape check alone refuses the wider model
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    save_file(tensors, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="maps 96 -> 96 features"):
        load_adapter(random_model(preset_config("tiny", vocab_size=384, hidden_size=96, layer_types=[
            "sliding_attention", "full_attention"] * 2)), tmp_path / "b")

    # weights missing for targeted modules
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "adapter_config.json").write_text((tmp_path / "a" / "adapter_config.json").read_text())
    save_file({k: v for k, v in tensors.items() if "layers.2.mlp" not in k}, str(tmp_path / "c" /
                                                                               "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="with no weights"):
        load_adapter(load_model(path, dtype="float32")[0], tmp_path / "c")

    # targets a layer this model does not have (a 6-layer adapter on the 4-layer base)
    deep = dict(tensors)
    for key, value in tensors.items():
        if ".layers.3." in key:
            deep[key.replace(".layers.3.", ".layers.5.")] = value.clone()
    save_file(deep, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not have"):
        load_adapter(load_model(path, dtype="float32")[0], tmp_path / "b")

    # encoder and decoder copies that differ cannot be one module
    skew = dict(tensors)
    key = next(k for k in tensors if k.startswith("base_model.model.model.encoder") and "lora_B" in k)
    skew[key] = tensors[key] + 1
    save_file(skew, str(tmp_path / "b" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="copies of .* differ"):
        load_adapter(load_model(path, dtype="float32")[0], tmp_path / "b")

    # same shapes, other weights: refused by the fingerprint unless asked
    other, _ = load_model(hf_checkpoint("base", seed=7)[1], dtype="float32")
    with pytest.raises(ValueError, match="different weights"):
        load_adapter(other, tmp_path / "a")
    load_adapter(other, tmp_path / "a", check_weights=False)


def test_only_adapter_trains_and_base_is_bit_identical():
    config = preset_config("tiny", canvas_length=4)
    model = random_model(config, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = attach_adapter(model, LoraConfig(rank=4), seed=2)
    params = trainable_parameters(model)
    assert params and all(".lora_" in n for n in params)
    assert set(params.values()) == set(adapter.parameters())
    g = torch.Generator().manual_seed(3)
    batch = Batch(clean=torch.randint(3, config.vocab_size, (2, 14), generator=g),
                  prompt_lens=torch.tensor([6, 2]), resp_lens=torch.tensor([8, 12]))
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        opt.zero_grad()
        objective(model, batch, torch.Generator().manual_seed(step), pad_id=0).total.backward()
        assert all(p.grad is None for p in model.parameters())
        grads_b = [p.lora_B.weight.grad for p in adapter.pairs().values()]
        assert all(gb.abs().sum() > 0 for gb in grads_b)
        opt.step()
    # the second step's A gradients are non-zero (B moved off zero after the first step)
    assert all(p.lora_A.weight.grad.abs().sum() > 0 for p in adapter.pairs().values())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
