"""Per-rank GPU memory plan for fine-tuning, computed from a ModelConfig alone (parameter shapes on the meta
device; no GPU, no process group).

What it counts, per rank, for the layout `train.parallel` builds (FSDP2 units: per layer the attention, the
dense MLP and, without EP, the experts; a root unit with the embedding and the rest; FSDP shards each tensor's
dim 0 into ceil(d0 / W) rows; with EP each rank holds E / W whole experts):
- full SFT as NeMo's recipe runs it: fp32 master weights, fp32 gradients, AdamW's two fp32 moments (16 B per
  parameter shard), bf16 compute copies gathered per unit;
- LoRA on a frozen bf16 base: 2 B per base parameter shard, adapters replicated with fp32 weights, grads and
  moments (16 B per adapter parameter);
- `gathered`: the transient all-gather peak. The root unit stays gathered for the whole step (bf16 params,
  bf16 grads and the fp32 reduce copy in full SFT), plus the largest other unit being worked on and the next
  one prefetched. A single process (W = 1) runs unsharded and gathers nothing;
- activations: an inventory of what autograd saves per token and layer (bf16 activations, fp32 where the model
  upcasts: norms, router, logits), with activation checkpointing as `parallel.py` applies it, plus the head
  (fp32 soft-capped logits and log-softmax over the 262k vocabulary), which checkpointing does not touch.
  An estimate, not a measurement: expect +-30%.
The CUDA context, allocator fragmentation and NCCL buffers are not modelled: a row "fits" a card when its total
is within `usable` (90%) of the card. tests/test_memory_plan.py checks the released config's numbers against hand
arithmetic and the sharded sizes against `parallel.py` on a fake process group.
"""

from __future__ import annotations

import math

import torch

from dgemma.config import ModelConfig
from dgemma.model.modeling import DiffusionGemma
from dgemma.train.lora import LoraConfig, target_linears

GiB = 2**30
CARD_BYTES = 80 * GiB  # an "80 GB" H100/A100 reports 80 GiB
USABLE = 0.9
WORLDS = (1, 2, 4, 8)


def _meta_model(config: ModelConfig) -> DiffusionGemma:
    with torch.device("meta"):
        return DiffusionGemma(config)


def parameter_units(config: ModelConfig) -> dict[str, list[list[tuple[int, ...]]]]:
    """Parameter shapes grouped as `parallel.apply_fsdp` groups them: one list of shapes per unit."""
    model = _meta_model(config)
    units: dict[str, list[list[tuple[int, ...]]]] = {"root": [[]], "attention": [], "mlp": [], "experts": []}
    in_units = set()
    for layer in model.stack.layers:
        for kind, module in (("attention", layer.self_attn), ("mlp", layer.mlp), ("experts", layer.experts)):
            units[kind].append([tuple(p.shape) for p in module.parameters()])
            in_units.update(id(p) for p in module.parameters())
    units["root"][0] = [tuple(p.shape) for p in model.parameters() if id(p) not in in_units]
    return units


def parameter_count(config: ModelConfig) -> int:
    return sum(math.prod(s) for unit_list in parameter_units(config).values() for u in unit_list for s in u)


def lora_parameter_count(config: ModelConfig, lora: LoraConfig | None = None) -> int:
    lora = lora or LoraConfig()
    linears = target_linears(_meta_model(config), lora.targets)
    return sum(lora.rank * (m.in_features + m.out_features) for m in linears.values())


def _numel(unit: list[tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in unit)


def _shard_numel(unit: list[tuple[int, ...]], world: int) -> int:
    """Elements of rank 0's FSDP shard (the largest): ceil(d0 / W) rows of each tensor."""
    return sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in unit)


def params_per_rank(config: ModelConfig, world: int, expert_parallel: bool, units: dict | None = None) -> int:
    units = units or parameter_units(config)
    dense = sum(_shard_numel(u, world) for kind in ("root", "attention", "mlp") for u in units[kind])
    if expert_parallel:
        experts = sum(_numel(u) // world for u in units["experts"])
    else:
        experts = sum(_shard_numel(u, world) for u in units["experts"])
    return dense + experts


def _gathered_bytes(units: dict, world: int, expert_parallel: bool, full: bool) -> int:
    """Transient peak of all-gathered units: the root for the whole step, the largest other unit and the
    next one (prefetch). Full SFT adds each unit's bf16 grads and their fp32 reduce copy."""
    if world == 1:
        return 0
    others = [_numel(u) for kind in ("attention", "mlp") for u in units[kind]]
    if not expert_parallel:
        others += [_numel(u) for u in units["experts"]]
    largest = sorted(others)[-2:]
    per_param = (2 + 2 + 4) if full else 2  # bf16 params (+ bf16 grads + fp32 reduce-scatter input)
    return per_param * _numel(units["root"][0]) + per_param * largest[-1] + 2 * largest[0]


def _layer_dims(config: ModelConfig, layer_idx: int) -> tuple[int, int]:
    shape = config.layer_shape(layer_idx)
    return config.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim


def activation_breakdown(config: ModelConfig, tokens_per_rank: int, *, seq_len: int | None = None,
                         checkpointing: bool = True) -> dict[str, int]:
    """Activations of one training step on a rank that holds `tokens_per_rank` clean tokens in examples of
    `seq_len` (default: one example): the encoder runs over all of them, the denoiser over one canvas per example
    whose keys are the example's clean tokens and the canvas. `saved`: alive when forward ends (what autograd
    saves, or the checkpointed calls' inputs); `backward_peak`: added during backward (one layer recomputed,
    the logits' gradients)."""
    seq_len = seq_len or tokens_per_rank
    h, i, im, k, e, v = (config.hidden_size, config.intermediate_size, config.moe_intermediate_size,
                         config.top_k_experts, config.num_experts, config.vocab_size)
    examples = max(1, tokens_per_rank // seq_len)
    dec = examples * config.canvas_length
    tokens = tokens_per_rank + dec  # queries through the stack
    keys = tokens_per_rank + examples * (seq_len + config.canvas_length)  # encoder keys + denoiser keys

    def full_layer(idx: int) -> int:
        qd, kvd = _layer_dims(config, idx)
        per_token = (8 * 8 * h  # 7 layer norms + the router's: fp32 input and normalised copies
                     + 8 * (qd + 2 * kvd)  # q/k/v norms
                     + 2 * h + 2 * qd  # q/k/v and o_proj inputs
                     + 2 * qd + 2 * qd + 4 * config.num_attention_heads  # SDPA q, output, log-sum-exp
                     + 2 * h + 8 * i  # dense MLP: input, gate, up, gelu(gate), product
                     + 2 * h + 8 * e  # router: projection input, fp32 scores and probabilities
                     + k * (4 * h + 8 * im + 4)  # routed slots: gathered input, gate/up/gelu/product, output
                     + 2 * h)  # layer scalar input
        return per_token * tokens + 4 * qd * keys + 4 * kvd * dec  # GQA-repeated K/V per key; concatenated K/V

    def checkpointed_layer(idx: int) -> int:
        qd, kvd = _layer_dims(config, idx)
        return (6 * h + 2 * qd + 4 * kvd) * tokens + 4 * kvd * examples * (seq_len + config.canvas_length)

    layers = range(config.num_hidden_layers)
    head_saved = tokens * (10 * h + 8 * v) + dec * 4 * v  # final norm, fp32 tanh and log-softmax; SC logits
    head_grad = tokens * 6 * v  # bf16 + fp32 logits gradient
    if not checkpointing:
        return dict(saved=sum(full_layer(j) for j in layers) + head_saved, backward_peak=head_grad)
    return dict(saved=sum(checkpointed_layer(j) for j in layers) + head_saved,
                backward_peak=max(full_layer(j) for j in layers) + head_grad)


def activation_bytes(config: ModelConfig, tokens_per_rank: int, *, seq_len: int | None = None,
                     checkpointing: bool = True) -> int:
    """Peak activation bytes of one step (`activation_breakdown`: saved + backward peak)."""
    parts = activation_breakdown(config, tokens_per_rank, seq_len=seq_len, checkpointing=checkpointing)
    return parts["saved"] + parts["backward_peak"]


def memory_plan(config: ModelConfig, *, worlds: tuple[int, ...] = WORLDS, tokens_per_rank: int = 1024,
                seq_len: int | None = None, lora: LoraConfig | None = None, card_bytes: int = CARD_BYTES,
                usable: float = USABLE) -> list[dict]:
    """One row per (mode, world size, expert parallelism): bytes per rank for weights, grads, optimizer state,
    gathered units and activations with and without checkpointing, and whether it fits one card."""
    lora_params = lora_parameter_count(config, lora)
    units = parameter_units(config)
    act = {ac: activation_bytes(config, tokens_per_rank, seq_len=seq_len, checkpointing=ac) for ac in (True, False)}
    rows = []
    for mode in ("full", "lora"):
        for world in worlds:
            for ep in ((False,) if world == 1 else (False, True)):
                if ep and config.num_experts % world:
                    continue
                shard = params_per_rank(config, world, ep, units)
                if mode == "full":
                    weights, grads, optim = 4 * shard, 4 * shard, 8 * shard
                else:
                    weights, grads, optim = 2 * shard + 4 * lora_params, 4 * lora_params, 8 * lora_params
                gathered = _gathered_bytes(units, world, ep, mode == "full")
                static = weights + grads + optim + gathered
                row = dict(mode=mode, world=world, expert_parallel=ep, params_per_rank=shard, weights=weights,
                           grads=grads, optimizer=optim, gathered=gathered, activations_ckpt=act[True],
                           activations_full=act[False], total_ckpt=static + act[True], total_full=static + act[False])
                row["fits_ckpt"] = row["total_ckpt"] <= usable * card_bytes
                row["fits_full"] = row["total_full"] <= usable * card_bytes
                rows.append(row)
    return rows


def format_plan(rows: list[dict], card_bytes: int = CARD_BYTES) -> str:
    """A fixed-width table in GiB."""
    head = (f"{'mode':<5} {'W':>2} {'EP':<3} {'params/rank':>11} {'weights':>8} {'grads':>7} {'optim':>7} "
            f"{'gathered':>8} {'act(AC)':>8} {'act':>7} {'total(AC)':>10} {'total':>8}  "
            f"fits {card_bytes / GiB:.0f} GiB")
    lines = [head, "-" * len(head)]
    for r in rows:
        fits = "yes" if r["fits_full"] else "with AC only" if r["fits_ckpt"] else "no"
        lines.append(
            f"{r['mode']:<5} {r['world']:>2} {'yes' if r['expert_parallel'] else 'no':<3} "
            f"{r['params_per_rank'] / 1e9:>10.2f}B "
            + " ".join(f"{r[c] / GiB:>{w}.1f}" for c, w in (("weights", 8), ("grads", 7), ("optimizer", 7),
                                                              ("gathered", 8), ("activations_ckpt", 8),
                                                              ("activations_full", 7), ("total_ckpt", 10),
                                                              ("total_full", 8)))
            + f"  {fits}")
    return "\n".join(lines)
