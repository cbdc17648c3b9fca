"""The bundled model: loads without --model, and transformers gives the same logits on it."""

import json

import torch

from dgemma.bundled import bundled_model_dir, resolve_model
from dgemma.cli import main
from dgemma.model.loading import load_model


def test_bundled_model_matches_transformers():
    from transformers import DiffusionGemmaForBlockDiffusion

    path = bundled_model_dir()
    ours, report = load_model(path)
    assert report.verified_layer_scalars == ours.config.num_hidden_layers and not report.unused_vision
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    ids = torch.tensor([[2, 5, 389, 270, 205, 583, 6, 205, 5, 83, 341, 379, 205]])
    canvas = torch.randint(0, ours.config.vocab_size, (1, ours.config.canvas_length),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=canvas).logits
        cache = ours.new_cache()
        ours.encode(ids, cache)
        torch.testing.assert_close(ours.denoise(canvas, cache), ref, atol=1e-4, rtol=1e-4)


def test_generate_without_model_uses_bundled(capsys):
    assert resolve_model(None) == resolve_model("bundled") == bundled_model_dir()
    assert main(["generate", "--raw", "The king said", "--max-new-tokens", "20", "--max-denoising-steps", "4",
                 "--seed", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["text"], str) and 0 < len(out["token_ids"]) <= 20
