"""The DiffusionGemma training objective (reference notes section 3), as pure functions.

One example = clean prompt + response; the response is padded with EOS to whole canvases.
- Noise: every response position is replaced, with probability t ~ U(eps, 1) drawn once per example, by a
  uniformly random vocabulary token (no MASK token).
- Encoder: causal pass over the clean prompt + response, next-token cross-entropy (weight 1.0).
- Decoder: one pass over all noisy canvases with the block-causal mask: canvas i sees the clean prompt
  and the clean canvases before it (through the encoder's K/V of the same layer; on sliding layers only
  the last window-1 tokens before the canvas, as at inference) and its own noisy canvas bidirectionally.
- Diffusion loss: cross-entropy over every position of one uniformly chosen canvas per example,
  averaged per example, then over the batch.
- Self-conditioning: pass 1 without gradient gives logits that pass 2 receives for each example with
  probability 0.5 (else zeros); only pass 2 is trained.
tests/test_objective.py checks the masks against a dense reference and the joint pass against the
inference path (`encode` + `denoise`).

Shapes: B batch, S clean length (prompt + response + padding), R response length (canvases * C).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dgemma.config import FULL, SLIDING
from dgemma.model.modeling import DiffusionGemma


@dataclass
class Batch:
    """A padded batch. Prompt i occupies clean[i, :prompt_lens[i]], its response (EOS-filled to whole
    canvases) clean[i, prompt_lens[i]:prompt_lens[i] + resp_lens[i]]; the rest is padding."""

    clean: torch.Tensor  # (B, S) long
    prompt_lens: torch.Tensor  # (B,) long
    resp_lens: torch.Tensor  # (B,) long, multiples of canvas_length
    # (B, S) long: the encoder's next-token target at each position (default: the clean tokens themselves)
    labels: torch.Tensor | None = None
    # (B, S) bool: the positions whose target counts in the encoder's loss (default: all of prompt + response;
    # SFT: the answers only, so history and prompts stay clean context)
    loss_mask: torch.Tensor | None = None
    # (B,) long: response positions through the answer's end id (SFT); the rest of the response is end-id fill
    answer_lens: torch.Tensor | None = None

    def response(self, rmax: int, pad_id: int) -> torch.Tensor:
        """(B, R) clean response tokens, left-aligned, padded with pad_id."""
        b = self.clean.shape[0]
        idx = self.prompt_lens[:, None] + torch.arange(rmax, device=self.clean.device)[None]
        idx = idx.clamp(max=self.clean.shape[1] - 1)
        resp = torch.gather(self.clean, 1, idx)
        valid = torch.arange(rmax, device=self.clean.device)[None] < self.resp_lens[:, None]
        return torch.where(valid, resp, torch.full((b, rmax), pad_id, device=resp.device))


def corrupt(tokens: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-state noise: each position of row i is replaced with probability t[i] (or t[i, j], per position)
    by a uniform token. Returns (noisy tokens, replaced mask). A replacement may draw the original token."""
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    replaced = u < (t[:, None] if t.ndim == 1 else t)
    noise = torch.randint(0, vocab_size, tokens.shape, generator=generator, device=tokens.device)
    return torch.where(replaced, noise, tokens), replaced


def encoder_mask(valid: torch.Tensor, window: int, sliding: bool) -> torch.Tensor:
    """(B, S) valid keys -> (B, 1, S, S) bool: causal, within the window on sliding layers."""
    s = valid.shape[1]
    pos = torch.arange(s, device=valid.device)
    allowed = pos[None, :] <= pos[:, None]
    if sliding:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    allowed = allowed[None] & valid[:, None, :]
    # Padding queries attend to themselves so that no softmax row is empty.
    return (allowed | torch.eye(s, dtype=torch.bool, device=valid.device)[None])[:, None]


def decoder_mask(prompt_lens: torch.Tensor, resp_lens: torch.Tensor, s: int, r: int, canvas: int, window: int,
                 sliding: bool) -> torch.Tensor:
    """(B, 1, R, S + R) bool: decoder queries over [clean keys ; noisy keys] (block-causal mask).

    Query j of row i is in canvas j // canvas starting at absolute position p = P_i + canvas*(j // canvas).
    Clean keys: positions < p (sliding layers: only the last window-1 of them). Noisy keys: same canvas."""
    dev = prompt_lens.device
    j = torch.arange(r, device=dev)
    block = j // canvas
    start = prompt_lens[:, None] + block[None] * canvas  # (B, R) absolute canvas start per query
    k = torch.arange(s, device=dev)
    clean = k[None, None, :] < start[:, :, None]
    if sliding:
        clean = clean & (k[None, None, :] >= start[:, :, None] - (window - 1))
    q_valid = j[None] < resp_lens[:, None]
    noisy = (block[:, None] == block[None, :])[None] & q_valid[:, None, :]
    mask = torch.cat([clean, noisy], dim=-1) & q_valid[:, :, None]
    mask[:, :, s:] |= torch.eye(r, dtype=torch.bool, device=dev)[None] & ~q_valid[:, :, None]  # padding: self only
    return mask[:, None]


def joint_forward(model: DiffusionGemma, batch: Batch, noisy: torch.Tensor, self_cond_logits: torch.Tensor | None,
                  self_cond_mask: torch.Tensor | None, dec_start: torch.Tensor | None = None,
                  dec_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder pass over batch.clean and decoder pass over `noisy` (B, R) in one sweep over the layers
    (the decoder attends to the encoder's K/V of the same layer, with gradient).

    The noisy canvases of row i start at absolute position dec_start[i] (default: the response start) and
    dec_lens[i] of them are real (default: the response length). Canvases never attend to each other, so
    passing only some canvases gives exactly their logits in the full pass.
    Returns (encoder hidden states (B, S, H) after the final norm, decoder logits (B, R, V) fp32)."""
    cfg, stack = model.config, model.stack
    clean = batch.clean
    b, s = clean.shape
    r = noisy.shape[1]
    dec_start = batch.prompt_lens if dec_start is None else dec_start
    dec_lens = batch.resp_lens if dec_lens is None else dec_lens
    valid = torch.arange(s, device=clean.device)[None] < (batch.prompt_lens + batch.resp_lens)[:, None]
    enc_pos = torch.arange(s, device=clean.device)[None].expand(b, s)
    dec_pos = dec_start[:, None] + torch.arange(r, device=clean.device)[None]
    x_enc = stack.embed(clean)
    embeds = stack.embed(noisy)
    soft = torch.zeros_like(embeds) if self_cond_logits is None else model.soft_embed(self_cond_logits)
    if self_cond_mask is not None:
        soft = soft * self_cond_mask.to(soft.dtype)[:, None, None]
    x_dec = stack.self_conditioning(embeds, soft)
    masks = {}
    for kind, sliding in ((SLIDING, True), (FULL, False)):
        masks[kind] = (encoder_mask(valid, cfg.sliding_window, sliding),
                       decoder_mask(dec_start, dec_lens, s, r, cfg.canvas_length, cfg.sliding_window, sliding))
    rope_enc, rope_dec = stack.rope(enc_pos, x_enc.dtype), stack.rope(dec_pos, x_enc.dtype)
    for layer in stack.layers:
        attn = layer.self_attn
        kind = SLIDING if attn.is_sliding else FULL
        q_e, k_e, v_e = attn.qkv(layer.input_layernorm(x_enc), *rope_enc[kind])
        q_d, k_d, v_d = attn.qkv(layer.input_layernorm(x_dec), *rope_dec[kind])
        enc_mask, dec_mask = masks[kind]
        att_e = attn.attend(q_e, k_e, v_e, enc_mask)
        att_d = attn.attend(q_d, torch.cat([k_e, k_d], dim=2), torch.cat([v_e, v_d], dim=2), dec_mask)
        x_enc, x_dec = layer.finish(x_enc, att_e), layer.finish(x_dec, att_d)
    return stack.norm(x_enc), model.logits(stack.norm(x_dec))


@dataclass
class LossParts:
    total: torch.Tensor
    diffusion: torch.Tensor
    encoder: torch.Tensor


def fill_noise_levels(t: torch.Tensor, answer_lens: torch.Tensor, r: int, lower_prob: float,
                      generator: torch.Generator) -> torch.Tensor:
    """(B, R) noise level of each response position (dgemma's `lower_fill_noise`, off in the reference
    objective): with probability `lower_prob` an example's end-id fill (positions from `answer_lens` on) is noised
    at t * u, u ~ U(0, 1) drawn per example, instead of t; its answer keeps t. At inference a confidence-ordered
    sampler settles the easy fill first and then predicts the answer against a clean fill: a state that equal
    noise levels almost never show a short answer in training (a 2-token answer fully noised beside 30 clean fill
    positions has probability t^2 (1 - t)^30)."""
    b, device = t.shape[0], t.device
    lower = torch.rand(b, generator=generator, device=device) < lower_prob
    u = torch.rand(b, generator=generator, device=device)
    fill = torch.arange(r, device=device)[None] >= answer_lens[:, None]
    return t[:, None] * torch.where(lower[:, None] & fill, u[:, None], 1.0)


def objective(model: DiffusionGemma, batch: Batch, generator: torch.Generator, *, pad_id: int,
              self_cond_prob: float = 0.5, t_eps: float = 1e-3, encoder_weight: float = 1.0,
              t: torch.Tensor | None = None, always_self_cond_pass: bool = False,
              lower_fill_noise: float = 0.0) -> LossParts:
    """The full training loss for one batch. All randomness comes from `generator` (exact resume).
    `lower_fill_noise` > 0 needs `batch.answer_lens` (`fill_noise_levels`); 0 draws exactly what the reference
    objective draws.

    Only the chosen canvas of each example goes through the decoder: the loss is taken on it alone and
    canvases do not see each other, so this equals the all-canvas pass restricted to that canvas.
    `always_self_cond_pass`: run the self-conditioning pass even when no example of this batch uses it (the
    same collectives on every rank of a distributed run)."""
    cfg = model.config
    c = cfg.canvas_length
    device = batch.clean.device
    b = batch.clean.shape[0]
    r = int(batch.resp_lens.max())
    response = batch.response(r, pad_id)
    if t is None:
        t = t_eps + (1 - t_eps) * torch.rand(b, generator=generator, device=device)
    levels = t
    if lower_fill_noise > 0:
        if batch.answer_lens is None:
            raise ValueError("lower_fill_noise needs the answers' lengths (Batch.answer_lens, set by SFT batches)")
        levels = fill_noise_levels(t, batch.answer_lens, r, lower_fill_noise, generator)
    noisy, _ = corrupt(response, levels, cfg.vocab_size, generator)
    n_blocks = batch.resp_lens // c
    chosen = (torch.rand(b, generator=generator, device=device) * n_blocks).long()
    use_sc = torch.rand(b, generator=generator, device=device) < self_cond_prob
    cols = chosen[:, None] * c + torch.arange(c, device=device)[None]  # (B, C) response columns
    canvas, target = torch.gather(noisy, 1, cols), torch.gather(response, 1, cols)
    start, lens = batch.prompt_lens + chosen * c, torch.full_like(chosen, c)
    sc_logits = None
    if (always_self_cond_pass and self_cond_prob > 0) or bool(use_sc.any()):
        with torch.no_grad():
            _, sc_logits = joint_forward(model, batch, canvas, None, None, start, lens)
    hidden, dec_logits = joint_forward(model, batch, canvas, sc_logits,
                                       use_sc if sc_logits is not None else None, start, lens)
    # Encoder next-token loss over the valid clean sequence (token mean); logits only where needed.
    targets = (batch.clean if batch.labels is None else batch.labels)[:, 1:]
    if batch.loss_mask is None:
        total_len = batch.prompt_lens + batch.resp_lens
        pos = torch.arange(batch.clean.shape[1] - 1, device=device)[None]
        ar_valid = pos + 1 < total_len[:, None]
    else:
        ar_valid = batch.loss_mask[:, 1:]
    enc_logits = model.logits(hidden[:, :-1][ar_valid])
    ar_loss = F.cross_entropy(enc_logits, targets[ar_valid])
    # Diffusion loss over every position of the chosen canvas (per-example mean, then batch mean).
    diff_loss = F.cross_entropy(dec_logits.transpose(1, 2), target, reduction="none").mean(1).mean()
    return LossParts(total=diff_loss + encoder_weight * ar_loss, diffusion=diff_loss, encoder=ar_loss)
