"""Training objective: masks vs a dense reference, joint pass vs inference path, corruption stats."""

import pytest
import torch
from model_fixtures import perturbed_model

from dgemma.model.init import preset_config, random_model
from dgemma.train.objective import (
    Batch,
    corrupt,
    decoder_mask,
    encoder_mask,
    fill_noise_levels,
    joint_forward,
    objective,
)


def _dense_decoder_mask(prompt_lens, resp_lens, s, r, c, w, sliding):
    b = len(prompt_lens)
    m = torch.zeros(b, r, s + r, dtype=torch.bool)
    for i in range(b):
        for j in range(r):
            start = prompt_lens[i] + c * (j // c)
            if j >= resp_lens[i]:
                m[i, j, s + j] = True
                continue
            for k in range(s):
                m[i, j, k] = k < start and (not sliding or k >= start - (w - 1))
            for k in range(r):
                m[i, j, s + k] = k // c == j // c and k < resp_lens[i]
    return m


@pytest.mark.parametrize("sliding", [False, True])
def test_decoder_mask_matches_dense_reference(sliding):
    prompt_lens, resp_lens, c, w = [3, 7, 1], [8, 4, 12], 4, 6
    s = max(p + q for p, q in zip(prompt_lens, resp_lens, strict=True))
    got = decoder_mask(torch.tensor(prompt_lens), torch.tensor(resp_lens), s, 12, c, w, sliding)[:, 0]
    assert torch.equal(got, _dense_decoder_mask(prompt_lens, resp_lens, s, 12, c, w, sliding))
    # no canvas sees a later clean token or another noisy canvas (no leak of the answer)
    assert not got[0, 4:8, 3 + 4:s].any()


def test_encoder_mask_is_causal_and_windowed():
    valid = torch.tensor([[True] * 6 + [False] * 2])
    m = encoder_mask(valid, 3, True)[0, 0]
    for q in range(6):
        assert m[q].nonzero().flatten().tolist() == list(range(max(0, q - 2), q + 1))


def test_joint_pass_equals_inference_path():
    model = perturbed_model(1, canvas_length=4, sliding_window=6)
    config = model.config
    prompt = torch.tensor([5, 6, 7, 8, 9])
    response = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21])  # 3 canvases
    clean = torch.cat([prompt, response])[None]
    batch = Batch(clean=clean, prompt_lens=torch.tensor([5]), resp_lens=torch.tensor([12]))
    noisy = torch.randint(0, config.vocab_size, (1, 12))
    sc = torch.randn(1, 12, config.vocab_size)
    hidden, dec_logits = joint_forward(model, batch, noisy, sc, None)
    enc_logits = model.logits(hidden)
    cache = model.new_cache()
    hidden = model.encode(prompt[None], cache, return_hidden=True)
    torch.testing.assert_close(enc_logits[:, :5], model.logits(hidden), atol=1e-5, rtol=1e-5)
    for blk in range(3):
        sl = slice(4 * blk, 4 * blk + 4)
        ref = model.denoise(noisy[:, sl], cache, sc[:, sl])
        torch.testing.assert_close(dec_logits[:, sl], ref, atol=1e-5, rtol=1e-5)
        model.encode(response[None, sl], cache)  # commit the clean canvas, as generation would


def test_corruption_rate():
    g = torch.Generator().manual_seed(0)
    tokens = torch.zeros(4, 20000, dtype=torch.long)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    noisy, replaced = corrupt(tokens, t, 1000, g)
    rates = replaced.float().mean(1)
    assert torch.allclose(rates, t, atol=0.015)
    assert torch.equal(noisy[0], tokens[0])
    counts = torch.bincount(noisy[3], minlength=1000).float()
    assert counts.std() / counts.mean() < 0.35  # roughly uniform over the vocabulary


def test_lower_fill_noise_levels_keep_the_answer_and_lower_only_the_fill():
    g = torch.Generator().manual_seed(0)
    b, r = 4000, 8
    t = torch.rand(b, generator=g)
    answer_lens = torch.randint(1, r + 1, (b,), generator=g)
    fill = torch.arange(r)[None] >= answer_lens[:, None]
    assert torch.equal(fill_noise_levels(t, answer_lens, r, 0.0, g), t[:, None].expand(b, r))  # off: t everywhere
    levels = fill_noise_levels(t, answer_lens, r, 0.5, g)
    assert torch.equal(levels[~fill], t[:, None].expand(b, r)[~fill])  # answers keep t
    lowered = (levels < t[:, None]) & fill
    rows = lowered.any(1)
    assert 0.4 < rows.float().mean() < 0.5  # half the rows are drawn (less those without fill or u ~ 1)
    ratio = levels[rows] / t[rows, None]
    per_row = [ratio[i][fill[rows][i]] for i in range(int(rows.sum()))]
    assert all(bool((x == x[0]).all()) for x in per_row)  # one u per row
    assert 0.45 < float(torch.stack([x[0] for x in per_row]).mean()) < 0.55  # u ~ U(0, 1)
    # the corruption then follows the levels position by position
    noisy, replaced = corrupt(torch.zeros(b, r, dtype=torch.long), levels, 1000, g)
    assert abs(float(replaced[~fill].float().mean() - levels[~fill].mean())) < 0.02
    assert abs(float(replaced[fill].float().mean() - levels[fill].mean())) < 0.02


def test_lower_fill_noise_off_draws_what_the_reference_draws_and_needs_answer_lengths():
    config = preset_config("tiny", canvas_length=4)
    model = random_model(config, seed=0)
    batch = _tiny_batch(config)
    ref = objective(model, batch, torch.Generator().manual_seed(5), pad_id=0)
    with_lens = Batch(batch.clean, batch.prompt_lens, batch.resp_lens, answer_lens=torch.tensor([3, 5]))
    same = objective(model, with_lens, torch.Generator().manual_seed(5), pad_id=0, lower_fill_noise=0.0)
    assert torch.equal(ref.total, same.total)
    lowered = objective(model, with_lens, torch.Generator().manual_seed(5), pad_id=0, lower_fill_noise=1.0)
    assert torch.isfinite(lowered.total) and not torch.equal(lowered.total, ref.total)
    with pytest.raises(ValueError, match="answer_lens"):
        objective(model, batch, torch.Generator().manual_seed(5), pad_id=0, lower_fill_noise=1.0)


def _tiny_batch(config):
    g = torch.Generator().manual_seed(3)
    clean = torch.randint(3, config.vocab_size, (2, 14), generator=g)
    return Batch(clean=clean, prompt_lens=torch.tensor([6, 2]), resp_lens=torch.tensor([8, 12]))


def test_self_conditioning_pass_one_has_no_gradient():
    config = preset_config("tiny", canvas_length=4)
    model = random_model(config, seed=2).train().requires_grad_(True)
    batch = _tiny_batch(config)
    seen = []
    original = joint_forward.__globals__["joint_forward"]

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((torch.is_grad_enabled(), args[3] is not None, args[2].shape[1]))
        return out

    joint_forward.__globals__["joint_forward"] = spy
    try:
        loss = objective(model, batch, torch.Generator().manual_seed(0), pad_id=0, self_cond_prob=1.0)
    finally:
        joint_forward.__globals__["joint_forward"] = original
    # pass 1 under no_grad, pass 2 gets its logits; only the chosen canvas is denoised
    assert seen == [(False, False, config.canvas_length), (True, True, config.canvas_length)]
    loss.total.backward()
    assert model.stack.self_conditioning.gate_proj.weight.grad.abs().sum() > 0


def test_loss_on_hand_checked_case():
    """A model whose logits are all equal gives CE = log V for both terms."""
    config = preset_config("tiny", canvas_length=4)
    model = random_model(config, seed=0)
    with torch.no_grad():
        model.stack.embed_tokens.weight.zero_()
    parts = objective(model, _tiny_batch(config), torch.Generator().manual_seed(0), pad_id=0)
    logv = torch.log(torch.tensor(float(config.vocab_size)))
    torch.testing.assert_close(parts.encoder, logv)
    torch.testing.assert_close(parts.diffusion, logv)
    torch.testing.assert_close(parts.total, 2 * logv)


def test_chosen_canvas_alone_equals_full_pass():
    """Denoising only one canvas gives the same logits as the all-canvas block-causal pass."""
    config = preset_config("tiny", canvas_length=4, sliding_window=6)
    model = random_model(config, seed=4)
    batch = _tiny_batch(config)
    noisy = torch.randint(0, config.vocab_size, (2, 12))
    _, full = joint_forward(model, batch, noisy, None, None)
    chosen = torch.tensor([1, 2])
    cols = chosen[:, None] * 4 + torch.arange(4)[None]
    _, part = joint_forward(model, batch, torch.gather(noisy, 1, cols), None, None,
                            batch.prompt_lens + chosen * 4, torch.full((2,), 4))
    expected = torch.stack([full[i, cols[i]] for i in range(2)])
    torch.testing.assert_close(part, expected, atol=1e-5, rtol=1e-5)
