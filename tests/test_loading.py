"""Checkpoint loading and saving: key accounting, round trips with transformers, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dgemma.config import GenerationConfig
from dgemma.model.init import preset_config, random_model
from dgemma.model.loading import CheckpointError, load_model, read_generation_config, save_model


def test_key_accounting(hf_checkpoint):
    hf, path = hf_checkpoint("base")
    model, report = load_model(path)
    n_layers = model.config.num_hidden_layers
    assert report.verified_layer_scalars == n_layers
    assert report.unused_vision and all(k.startswith("model.encoder.") for k in report.unused_vision)
    assert report.loaded == len(model.state_dict())
    saved = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    accounted = report.loaded + report.verified_layer_scalars + len(report.unused_vision) + len(report.tied_ignored)
    assert accounted == len(saved)
    hf_state = hf.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, hf_state[key]), key


def test_loaded_tensors_are_memory_mapped(hf_checkpoint):
    _, path = hf_checkpoint("base")
    model, _ = load_model(path, dtype="float32")
    # A same-dtype CPU load keeps views into the mapped shards: no second copy of the weights.
    w = model.stack.embed_tokens.weight
    assert not w.untyped_storage().resizable()  # frombuffer storage, not an allocation of ours
    assert w.untyped_storage().nbytes() < 5 * w.numel() * w.element_size()


def test_generation_config_defaults(hf_checkpoint):
    _, path = hf_checkpoint("base")
    model, _ = load_model(path)
    gen = read_generation_config(path, model.config)
    assert (gen.max_denoising_steps, gen.eos_token_ids, gen.pad_token_id) == (12, (1,), 0)
    data = json.loads((path / "generation_config.json").read_text())
    data.update(max_denoising_steps=None, sampler_config=None, eos_token_id=[1, 106, 50])
    filled = GenerationConfig.from_hf_dict(data, model.config)
    assert (filled.max_denoising_steps, filled.entropy_bound, filled.eos_token_ids) == (48, 0.1, (1, 106, 50))


def test_our_checkpoint_loads_in_transformers(tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    config = preset_config("tiny", canvas_length=8)
    model = random_model(config, seed=5)
    for p in model.parameters():  # make every weight matter
        if p.ndim == 1:
            p.add_(0.2 * torch.randn_like(p))
    save_model(model, tmp_path / "ours", max_shard_bytes=100_000)
    assert len(list((tmp_path / "ours").glob("model-*.safetensors"))) > 1
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "ours").eval()
    ids = torch.tensor([[2, 50, 60, 70, 80]])
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=torch.arange(8)[None] + 100).logits
        cache = model.new_cache()
        model.encode(ids, cache)
        out = model.denoise(torch.arange(8)[None] + 100, cache)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    reloaded, report = load_model(tmp_path / "ours")
    assert report.verified_layer_scalars == config.num_hidden_layers and not report.unused_vision
    for (k, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_transformers_checkpoint_round_trips_through_ours(hf_checkpoint, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    hf, path = hf_checkpoint("deep")
    model, _ = load_model(path)
    save_model(model, tmp_path / "again", generation_config=read_generation_config(path, model.config),
               dtype="bfloat16")
    back = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "again")
    assert back.dtype == torch.bfloat16
    ours_state = back.state_dict()
    for key, value in hf.state_dict().items():
        if key.startswith("model.decoder."):
            assert torch.equal(ours_state[key], value.to(torch.bfloat16)), key
    again, _ = load_model(tmp_path / "again")
    assert again.dtype == torch.bfloat16
    assert read_generation_config(tmp_path / "again", again.config).max_denoising_steps == 12


@pytest.fixture()
def broken(hf_checkpoint, tmp_path):
    _, path = hf_checkpoint("base")
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    return copy, index


def _shard_of(index, key):
    return index["weight_map"][key]


def test_error_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "file")
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)


def test_error_missing_shard(broken):
    path, index = broken
    (path / _shard_of(index, "model.decoder.norm.weight")).unlink()
    with pytest.raises(CheckpointError, match="shard .* is missing"):
        load_model(path)


def test_error_truncated_shard(broken):
    path, index = broken
    shard = path / _shard_of(index, "model.decoder.embed_tokens.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)
    shard.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_error_missing_key(broken):
    path, index = broken
    del index["weight_map"]["model.decoder.layers.1.router.proj.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        load_model(path)


def test_error_shape_mismatch(broken):
    path, index = broken
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(path)


def test_error_wrong_model_type(broken):
    path, _ = broken
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "gemma4"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'gemma4'"):
        load_model(path)


def test_error_unknown_dtype(broken, tmp_path):
    path, index = broken
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(path, dtype="float8")
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "int4"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(path)
    # a tensor stored with a dtype safetensors-readers do not know
    shard = path / _shard_of(index, "model.decoder.norm.weight")
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["model.decoder.norm.weight"]["dtype"] = "F4"
    new_header = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new_header) == n
    shard.write_bytes(raw[:8] + new_header + raw[8 + n:])
    config["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unknown dtype 'F4'"):
        load_model(path)


def test_error_unexpected_key_and_scalar_mismatch(broken):
    path, index = broken
    save_file({"model.decoder.layers.0.extra": torch.zeros(2)}, str(path / "extra.safetensors"))
    index["weight_map"]["model.decoder.layers.0.extra"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_model(path)
    del index["weight_map"]["model.decoder.layers.0.extra"]
    save_file({"model.encoder.language_model.layers.2.layer_scalar": torch.tensor([9.0])},
              str(path / "extra.safetensors"))
    index["weight_map"]["model.encoder.language_model.layers.2.layer_scalar"] = "extra.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="differs from the decoder"):
        load_model(path)


def test_pickles_are_refused(tmp_path, hf_checkpoint):
    _, path = hf_checkpoint("base")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        load_model(tmp_path)


def test_released_config_matches_transformers_layout():
    """The released 26B-A4B text stack: same keys and shapes as transformers builds (on meta)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    from dgemma.config import ModelConfig
    from dgemma.model.modeling import DiffusionGemma

    real_text = dict(vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                     num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
                     moe_intermediate_size=704, max_position_embeddings=262144, use_bidirectional_attention="vision")
    hf_config = DiffusionGemmaConfig(text_config=real_text, canvas_length=256)
    with torch.device("meta"):
        hf = DiffusionGemmaForBlockDiffusion(hf_config)
        ours = DiffusionGemma(ModelConfig.from_hf_dict(hf_config.to_dict()))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items() if k.startswith("model.decoder.")}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == hf_shapes
    assert ours.config.layer_types == hf_config.text_config.layer_types
    assert ours.model.decoder.layers[5].self_attn.v_proj is None  # K=V on full layers


def test_loader_carries_non_float_tensors_with_their_dtypes(tmp_path):
    """The loader's per-tensor dtype rule (the seam compressed layouts use): tensors the model declares in a
    compute dtype take the load dtype; any other tensor (integer codes, fp8 values) keeps exactly its declared
    dtype through save and load; a stored dtype that disagrees is refused, naming the tensor."""
    from dgemma.model.modeling import DiffusionGemma

    class WithCodes(DiffusionGemma):
        def __init__(self, config):
            super().__init__(config)
            self.model.decoder.register_buffer("codes", torch.zeros(4, 8, dtype=torch.uint8))
            self.model.decoder.fp8 = torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn),
                                                        requires_grad=False)

    config = preset_config("tiny")
    model = WithCodes(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != torch.float8_e4m3fn:
                p.normal_(0, 0.02)
        model.model.decoder.codes.copy_(torch.arange(32, dtype=torch.uint8).view(4, 8))
        model.model.decoder.fp8.copy_(torch.tensor([0.5, -2.0, 448.0]).to(torch.float8_e4m3fn))
    model.stack.reset_buffers()
    save_model(model, tmp_path / "a", dtype="bfloat16")
    loaded, _ = load_model(tmp_path / "a", build=WithCodes, dtype="float32")
    assert loaded.model.decoder.codes.dtype == torch.uint8
    assert torch.equal(loaded.model.decoder.codes, model.model.decoder.codes)
    assert loaded.model.decoder.fp8.dtype == torch.float8_e4m3fn
    assert torch.equal(loaded.model.decoder.fp8.float(), model.model.decoder.fp8.float())
    assert loaded.stack.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(CheckpointError, match="unexpected tensor"):  # the plain model declares no such tensor
        load_model(tmp_path / "a")

    class WrongDtype(WithCodes):
        def __init__(self, config):
            super().__init__(config)
            self.model.decoder.register_buffer("codes", torch.zeros(4, 8, dtype=torch.int8))

    with pytest.raises(CheckpointError, match="codes.*torch.uint8.*torch.int8"):
        load_model(tmp_path / "a", build=WrongDtype)
