"""Logits of our model vs transformers on tiny random configs (fp32 tight, bf16 loose)."""

import pytest
import torch
from transformers import DynamicCache

from dgemma.model.loading import load_model

CASES = [
    # (config, prompt length, committed canvases): contexts shorter and longer than the window
    ("base", 5, 0),
    ("base", 40, 0),
    ("base", 7, 3),
    ("wide_window", 30, 2),
    ("deep", 3, 4),
]


def _hf_denoise(hf, cache, canvas, start, sc=None):
    pos = torch.arange(start, start + canvas.shape[1])[None]
    return hf(decoder_input_ids=canvas, cache=cache, decoder_position_ids=pos, self_conditioning_logits=sc).logits


def _run_both(hf, ours, prompt, n_canvases, gen):
    vocab, length = ours.config.vocab_size, ours.config.canvas_length
    batch = prompt.shape[0]
    hf_cache, cache = DynamicCache(config=hf.config.text_config), ours.new_cache()
    with torch.no_grad():
        hf_hidden = hf.model.encoder(input_ids=prompt, cache=hf_cache,
                                     position_ids=torch.arange(prompt.shape[1])[None]).last_hidden_state
        hidden = ours.encode(prompt, cache, return_hidden=True)
        start = prompt.shape[1]
        for _ in range(n_canvases):  # commit canvases as generate does
            block = torch.randint(0, vocab, (batch, length), generator=gen)
            hf.model.encoder(input_ids=block, cache=hf_cache, position_ids=torch.arange(start, start + length)[None])
            ours.encode(block, cache)
            start += length
        canvas = torch.randint(0, vocab, (batch, length), generator=gen)
        ref1 = _hf_denoise(hf, hf_cache, canvas, start)
        out1 = ours.denoise(canvas, cache)
        sc = (ref1 / 0.7).to(ours.dtype)
        ref2 = _hf_denoise(hf, hf_cache, canvas, start, sc)
        out2 = ours.denoise(canvas, cache, sc)
    assert cache.length == start
    return (hf_hidden, hidden), (ref1, out1), (ref2, out2)


@pytest.mark.parametrize("name,prompt_len,n_canvases", CASES)
def test_logits_match_transformers_fp32(hf_checkpoint, name, prompt_len, n_canvases):
    hf, path = hf_checkpoint(name)
    ours, _ = load_model(path, dtype="float32")
    gen = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(3, ours.config.vocab_size, (2, prompt_len), generator=gen)
    pairs = _run_both(hf, ours, prompt, n_canvases, gen)
    for ref, out in pairs:
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,prompt_len,n_canvases", [("base", 40, 1), ("deep", 9, 2)])
def test_logits_match_transformers_bf16(hf_checkpoint, name, prompt_len, n_canvases):
    """bf16: our error against the fp32 computation of the same (bf16-rounded) weights is no larger than
    transformers' own bf16 error (k = 1.5 on the RMS, 2 on the max: the two round at the same places and may
    differ in accumulation order). Portable across instruction sets; on this project's CPUs the two are in
    fact bit-identical."""
    import copy

    from transformers import DiffusionGemmaForBlockDiffusion

    _, path = hf_checkpoint(name)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours, _ = load_model(path, dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    hf32, ours32 = copy.deepcopy(hf).float(), copy.deepcopy(ours).float()
    prompt = torch.randint(3, ours.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    pairs = _run_both(hf, ours, prompt, n_canvases, torch.Generator().manual_seed(2))
    anchors = _run_both(hf32, ours32, prompt, n_canvases, torch.Generator().manual_seed(2))
    for (ref, out), (anchor, _) in zip(pairs, anchors, strict=True):
        assert out.dtype == ref.dtype
        ref_err, our_err = ref.float() - anchor, out.float() - anchor
        assert our_err.pow(2).mean().sqrt() <= 1.5 * ref_err.pow(2).mean().sqrt()
        assert our_err.abs().max() <= 2 * ref_err.abs().max()


def test_self_conditioning_mask_zeroes_signal(hf_checkpoint):
    _, path = hf_checkpoint("base")
    ours, _ = load_model(path)
    cache = ours.new_cache()
    ours.encode(torch.tensor([[2, 5, 9], [4, 4, 7]]), cache)
    canvas = torch.randint(0, ours.config.vocab_size, (2, ours.config.canvas_length))
    sc = torch.randn(2, ours.config.canvas_length, ours.config.vocab_size)
    plain = ours.denoise(canvas, cache)
    masked = ours.denoise(canvas, cache, sc, self_cond_mask=torch.tensor([False, True]))
    full = ours.denoise(canvas, cache, sc)
    torch.testing.assert_close(masked[0], plain[0])
    torch.testing.assert_close(masked[1], full[1])
    assert not torch.allclose(full[0], plain[0])


def test_denoise_never_writes_cache(hf_checkpoint):
    _, path = hf_checkpoint("base")
    ours, _ = load_model(path)
    cache = ours.new_cache()
    ours.encode(torch.arange(3, 43)[None], cache)
    before = [k.clone() for k in cache.keys]
    ours.denoise(torch.zeros(1, ours.config.canvas_length, dtype=torch.long), cache)
    assert cache.length == 40
    assert all(torch.equal(a, b) for a, b in zip(before, cache.keys, strict=True))
    window = ours.config.sliding_window
    assert [k.shape[-2] for k in cache.keys] == [window - 1, 40] * 2
