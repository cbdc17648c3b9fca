"""Tiny random DiffusionGemma checkpoints made with transformers (the reference), for parity tests.

Every parameter and buffer that the transformers initialiser leaves at 1 or 0 (norm weights, router
scales, per-expert scales, layer scalars) is randomised too, so that each of them is exercised.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

BASE_TEXT = dict(
    vocab_size=384, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=8, top_k_experts=2,
    num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1, sliding_window=16,
    max_position_embeddings=4096, use_bidirectional_attention="vision", pad_token_id=0, eos_token_id=1,
    bos_token_id=2,
)
VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=16, global_head_dim=16)

# Several shapes: window smaller than the context, GQA ratios, expert counts, canvas lengths.
CONFIGS = {
    "base": dict(text={}, canvas_length=16),
    "wide_window": dict(text=dict(sliding_window=64, num_experts=4, top_k_experts=1), canvas_length=8),
    "deep": dict(text=dict(num_hidden_layers=6, layer_types=None, num_attention_heads=8, num_key_value_heads=4,
                           head_dim=8, global_head_dim=16, num_global_key_value_heads=2, sliding_window=8,
                           num_experts=16, top_k_experts=4), canvas_length=12),
}


def build_hf_model(name: str = "base", seed: int = 0, vision: bool = True, **text_overrides):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    spec = CONFIGS[name]
    text = {**BASE_TEXT, **spec["text"], **text_overrides}
    if text.get("layer_types") is None:
        text.pop("layer_types")
    vocab = text["vocab_size"]
    kwargs = dict(text_config=text, canvas_length=spec["canvas_length"], image_token_id=vocab - 3,
                  boi_token_id=vocab - 2, eoi_token_id=vocab - 1)
    if vision:
        kwargs["vision_config"] = VISION
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(DiffusionGemmaConfig(**kwargs)).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(("norm.weight", "layernorm.weight", "router.scale", "per_expert_scale")) or \
                    "layernorm_" in pname:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
        decoder = model.model.decoder
        encoder = model.model.encoder.language_model
        for dec_layer, enc_layer in zip(decoder.layers, encoder.layers, strict=True):
            value = 0.5 + torch.rand(1, generator=gen)
            dec_layer.layer_scalar.copy_(value)
            enc_layer.layer_scalar.copy_(value)
    return model


def save_hf_checkpoint(model, directory: Path, eos=(1,), pad=0, max_shard_size: str | None = "60KB",
                       generation: dict | None = None) -> Path:
    directory = Path(directory)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    gen = {"max_new_tokens": 32, "max_denoising_steps": 12, "t_min": 0.4, "t_max": 0.8,
           "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
           "stability_threshold": 1, "confidence_threshold": 0.005, "eos_token_id": list(eos), "pad_token_id": pad}
    gen.update(generation or {})
    (directory / "generation_config.json").write_text(json.dumps(gen))
    return directory


def add_bpe_tokenizer(src: Path, out: Path, corpus: list[str], specials: list[str], vocab_size: int,
                      chat_template: str) -> Path:
    """Copy the checkpoint at `src` to `out` with a byte-level BPE tokenizer trained on `corpus` (every byte is a
    token, as in real byte-level vocabularies; `specials` first, in order) and `chat_template`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    shutil.copytree(src, out, dirs_exist_ok=True)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.get_vocab_size() <= BASE_TEXT["vocab_size"]
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": chat_template, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out
