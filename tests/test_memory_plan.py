"""Memory plan: the released config's numbers against hand arithmetic, the sharded sizes against what
`parallel.py` builds (fake process group, meta tensors), the activation inventory against measurement."""

import gc

import pytest
import torch

from dgemma.model.init import count_parameters, preset_config, random_model
from dgemma.train.memory import (
    GiB,
    activation_breakdown,
    format_plan,
    lora_parameter_count,
    memory_plan,
    parameter_count,
    params_per_rank,
)
from dgemma.train.objective import Batch, objective

GB = 1e9


@pytest.fixture(scope="module")
def released():
    config = preset_config("released")
    return config, {(r["mode"], r["world"], r["expert_parallel"]): r for r in memory_plan(config)}


def test_released_parameters_match_hand_arithmetic(released):
    config, _ = released
    n = parameter_count(config)
    assert n == count_parameters(config)
    assert 25.2e9 <= n <= 26.5e9
    experts = 30 * 128 * (2 * 704 * 2816 + 2816 * 704)  # 22.84 B of the 25.25 B
    assert params_per_rank(config, 8, True) - experts // 8 == pytest.approx((n - experts) / 8, rel=1e-3)
    # LoRA r=16 on q,k,v,o + dense MLP: 25 sliding layers (q 4096, k/v 2048 wide), 5 full (q 8192, k 1024, no v)
    mlp = 2 * (2816 + 2112) + (2112 + 2816)
    sliding = 2 * (2816 + 4096) + 2 * (2816 + 2048) + mlp
    full = 2 * (2816 + 8192) + (2816 + 1024) + mlp
    assert lora_parameter_count(config) == 16 * (25 * sliding + 5 * full)


def test_lora_on_one_card_and_full_sft_on_a_node(released):
    _, rows = released
    lora1 = rows[("lora", 1, False)]
    assert 50 * GB <= lora1["weights"] <= 53 * GB  # bf16 base, adapters in fp32
    assert lora1["total_ckpt"] < 80 * GB and lora1["fits_ckpt"]
    full1 = rows[("full", 1, False)]
    assert full1["weights"] + full1["grads"] + full1["optimizer"] == 16 * parameter_count(preset_config("released"))
    assert full1["total_ckpt"] > 80 * GB and not full1["fits_ckpt"]
    full8 = rows[("full", 8, True)]
    # reference notes 2.3 (fake process group, world 8, EP=8): 47.0 GiB before activations
    assert 46 * GiB <= full8["weights"] + full8["grads"] + full8["optimizer"] <= 48 * GiB
    assert full8["fits_ckpt"]
    assert not rows[("full", 4, True)]["fits_ckpt"]
    assert all(r["activations_ckpt"] < r["activations_full"] for r in rows.values())
    table = format_plan(list(rows.values()))
    assert len(table.splitlines()) == 2 + len(rows) and "lora   1 no" in table


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_plan_shards_equal_parallel_layout_on_fake_process_group(released, expert_parallel):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from dgemma.model.modeling import DiffusionGemma
    from dgemma.train import parallel

    config, _ = released
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=8)
    try:
        mesh = init_device_mesh("cpu", (8,))
        with torch.device("meta"):
            model = DiffusionGemma(config)
        if expert_parallel:
            parallel.apply_expert_parallel(model, mesh)
        parallel.apply_fsdp(model, mesh)
        local = sum(p.to_local().numel() for p in model.parameters())  # rank 0 holds the largest shards
    finally:
        dist.destroy_process_group()
    assert local == params_per_rank(config, 8, expert_parallel)


def _saved_after_forward(model, batch):
    """Bytes allocated and still alive when the forward ends (the profiler's net CPU allocations)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = objective(model, batch, torch.Generator().manual_seed(0), pad_id=0, self_cond_prob=1.0).total
    del loss
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_inventory_matches_measurement(checkpointing):
    """A bf16 model with the released shape ratios (GQA, wider full layers, top-4 of 8 experts): what stays
    alive after forward is within 20% of the estimate's `saved` part (measured: 3% and 6%)."""
    from dgemma.train.parallel import apply_activation_checkpointing

    config = preset_config("tiny", vocab_size=2048, hidden_size=256, intermediate_size=384, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=64, global_head_dim=128, num_experts=8, top_k_experts=4,
                           moe_intermediate_size=64, canvas_length=32, sliding_window=64, num_hidden_layers=3,
                           layer_types=["sliding_attention"] * 2 + ["full_attention"], dtype="bfloat16")
    seq = 160
    clean = torch.randint(3, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    batch = Batch(clean, torch.tensor([seq - 32]), torch.tensor([32]))
    model = random_model(config, seed=0).train().requires_grad_(True)
    if checkpointing:
        apply_activation_checkpointing(model)
    measured = _saved_after_forward(model, batch)
    estimate = activation_breakdown(config, seq, checkpointing=checkpointing)["saved"]
    assert 0.8 <= measured / estimate <= 1.2, (measured, estimate)
