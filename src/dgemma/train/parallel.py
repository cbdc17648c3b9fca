"""Data-parallel training across processes: FSDP2, expert parallelism, activation checkpointing, checkpoint I/O.

The only module of dgemma that imports torch.distributed. Launch with `torchrun`; gloo on CPU, NCCL on CUDA.
- FSDP2 units follow the calls the training objective makes (`objective.joint_forward` calls a layer's pieces,
  never `DecoderLayer.forward`): per layer, the attention (methods `qkv` and `attend` registered as forwards),
  the dense MLP and the experts are units; the root unit (`ShardedModel`, whose forward runs
  `fn(model, ...)`) holds the embedding, the self-conditioning block, norms and routers (~3% of the 26B).
- Expert parallelism (`ExpertParallelExperts`): rank r keeps experts [r E/W, (r+1) E/W) whole, as DTensor
  Shard(0) parameters under the checkpoint names. Tokens are all-gathered, each rank computes its experts'
  contributions for every token, and a reduce-scatter sums them back to the owners. Expert weights then see the
  gradient of every rank's loss: the sum, where FSDP gives the other weights the mean, so their gradient is
  divided by W in backward (`divide_gradients`; the FSDP+EP pitfall, reference notes 2.3). Experts are kept out
  of FSDP (ignored params): an expert lives on exactly one rank, there is nothing to reduce.
- Activation checkpointing recomputes each of those calls (and the input norm) in backward.
tests/test_parallel.py checks one objective step on 2 gloo processes against one process (gradients, AdamW
update, EP with and without the division, LoRA on a frozen sharded base, DCP resume, HF export).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard
from torch.utils.checkpoint import checkpoint

from dgemma.model.loading import save_model
from dgemma.model.modeling import DiffusionGemma
from dgemma.model.moe import Experts

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # 1-D data-parallel mesh; None when not launched by torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> Dist:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT): NCCL with one GPU per local rank when CUDA is available, else gloo. Without that
    environment: a single process, no group. `timeout_s` bounds every collective, so a desync fails."""
    cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return Dist(0, 1, 0, torch.device("cuda" if cuda else "cpu"), None)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return Dist(rank, world, local_rank, device, mesh)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- expert parallelism ----------------------------------------------------------------------------
class _AllGather(torch.autograd.Function):
    """(n, ...) per rank -> (W n, ...) in rank order; backward sums the gradient slices back to their owner."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


class _ReduceScatter(torch.autograd.Function):
    """(W n, ...) per rank -> the sum over ranks of slice `rank`, (n, ...); backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
        dist.reduce_scatter_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllGather.apply(grad, ctx.group), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `factor`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


class ExpertParallelExperts(nn.Module):
    """This rank's experts of one layer, a drop-in for `moe.Experts` (same call, same parameter names, global
    shapes as DTensor Shard(0)). Numerics equal the dense path: fp32 weighted contributions, summed in fp32
    (across ranks by the reduce-scatter), one cast to the activation dtype."""

    def __init__(self, experts: Experts, mesh: DeviceMesh, *, divide_gradients: bool = True) -> None:
        super().__init__()
        world = mesh.size()
        if experts.num_experts % world:
            raise ValueError(f"expert parallelism needs num_experts ({experts.num_experts}) divisible by the "
                             f"world size ({world})")
        self.num_experts, self.world = experts.num_experts, world
        self.local = experts.num_experts // world
        self.first = mesh.get_local_rank() * self.local
        self.group = mesh.get_group()
        self.divide_gradients = divide_gradients
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            mine = full.detach()[self.first:self.first + self.local].clone()  # reads only this rank's slice
            param = DTensor.from_local(mine, mesh, [Shard(0)], run_check=False)
            setattr(self, name, nn.Parameter(param, requires_grad=full.requires_grad))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (T, H), expert_ids (T, K), weights (T, K) fp32 -> (T, H) in x.dtype."""
        n = x.shape[0]
        sizes = torch.empty(self.world, dtype=torch.long, device=x.device)
        dist.all_gather_single(sizes, torch.tensor([n], device=x.device), group=self.group)
        rows = int(sizes.max())  # sync: token counts differ per rank (padding lengths)
        pad = rows - n
        xg = _AllGather.apply(F.pad(x, (0, 0, 0, pad)), self.group)  # (W rows, H)
        wg = _AllGather.apply(F.pad(weights, (0, 0, 0, pad)), self.group)
        with torch.no_grad():
            ids = _AllGather.apply(F.pad(expert_ids, (0, 0, 0, pad), value=-1), self.group)
        gate_up, down = self.gate_up_proj.to_local(), self.down_proj.to_local()
        if self.divide_gradients:
            gate_up, down = _ScaleGrad.apply(gate_up, 1.0 / self.world), _ScaleGrad.apply(down, 1.0 / self.world)
        partial = self._local_experts(xg, ids, wg, gate_up.to(x.dtype), down.to(x.dtype))
        return _ReduceScatter.apply(partial, self.group)[:n].to(x.dtype)

    def _local_experts(self, x, expert_ids, weights, gate_up, down) -> torch.Tensor:
        """Contributions of this rank's experts, (T, H) fp32; other slots contribute zero."""
        t, k = expert_ids.shape
        out = x.new_zeros((t, k, x.shape[-1]), dtype=torch.float32)
        local = expert_ids - self.first
        flat = torch.where((local >= 0) & (local < self.local), local, self.local).reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.local + 1).tolist()  # sync: as the dense reference path
        start = 0
        for expert, count in enumerate(counts[:-1]):
            slots = order[start:start + count]
            start += count
            if count == 0:
                continue
            tok, kk = slots // k, slots % k
            gate, up = F.linear(x[tok], gate_up[expert]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, down[expert])
            out[tok, kk] = y * weights[tok, kk, None]
        return out.sum(dim=1)


def apply_expert_parallel(model: DiffusionGemma, mesh: DeviceMesh, *, divide_gradients: bool = True) -> None:
    """Replace every layer's experts by this rank's share (EP degree = mesh size). `divide_gradients=False`
    leaves the expert gradients W times too large; it exists so the test can show that."""
    for layer in model.stack.layers:
        layer.experts = ExpertParallelExperts(layer.experts, mesh, divide_gradients=divide_gradients)


# -- activation checkpointing ----------------------------------------------------------------------
def _recomputed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(model: DiffusionGemma) -> None:
    """Recompute in backward, per layer: the input norm, `qkv`, `attend` and `finish` (norms, dense MLP,
    router, experts). What stays saved per layer and stream is their inputs: the residual, the normed input,
    q/k/v and the attention output."""
    for layer in model.stack.layers:
        layer.input_layernorm.forward = _recomputed(layer.input_layernorm.forward)
        layer.self_attn.qkv = _recomputed(layer.self_attn.qkv)
        layer.self_attn.attend = _recomputed(layer.self_attn.attend)
        layer.finish = _recomputed(layer.finish)


# -- FSDP2 -----------------------------------------------------------------------------------------
class ShardedModel(nn.Module):
    """The FSDP root. `sharded(fn, *args, **kwargs)` runs `fn(sharded.model, *args, **kwargs)` as one forward
    (e.g. `sharded(objective, batch, generator, pad_id=...)`); `sharded.model` keeps the checkpoint names."""

    def __init__(self, model: DiffusionGemma) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def mixed_precision(device: torch.device, enabled: bool | None = None) -> MixedPrecisionPolicy:
    """bf16 compute copies of fp32 master weights with fp32 gradient reduction on CUDA (the recipe), plain fp32
    on CPU. Inputs are not cast: the model's activations follow its (bf16) parameters by themselves, and the
    router's fp32 combination weights must stay fp32."""
    if enabled is None:
        enabled = device.type == "cuda"
    if enabled:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy(cast_forward_inputs=False)


def apply_fsdp(model: DiffusionGemma, mesh: DeviceMesh, *, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True) -> ShardedModel:
    """Shard `model` in place and return the root to call. Frozen parameters may sit in any unit."""
    mp_policy = mp_policy or mixed_precision(torch.device(mesh.device_type))
    kw = dict(mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # q/k/v come back as transposed views; nothing modifies them in place, so FSDP2's warning is moot here.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPAttention\) returned a view tensor")
    ignored = set()
    for layer in model.stack.layers:
        if mp_policy.param_dtype is not None:
            # A buffer, so FSDP does not cast it; an fp32 (1,) tensor would promote the bf16 stream to fp32.
            # The checkpoint stores it in bf16, so nothing is lost.
            layer.layer_scalar = layer.layer_scalar.to(mp_policy.param_dtype)
        attn = fully_shard(layer.self_attn, **kw)
        register_fsdp_forward_method(attn, "qkv")
        register_fsdp_forward_method(attn, "attend")
        fully_shard(layer.mlp, **kw)
        if isinstance(layer.experts, ExpertParallelExperts):
            ignored.update(layer.experts.parameters())
        else:
            fully_shard(layer.experts, **kw)
    root = ShardedModel(model)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored or None)
    return root


@dataclass
class ParallelConfig:
    expert_parallel: bool = False
    checkpointing: bool = False
    mixed_precision: bool | None = None  # None: bf16 on CUDA, fp32 on CPU
    reshard_after_forward: bool = True
    divide_expert_gradients: bool = True  # tests only


def parallelize(model: DiffusionGemma, env: Dist, config: ParallelConfig | None = None) -> ShardedModel:
    """EP, then activation checkpointing, then FSDP (torchtitan's order). Attach LoRA adapters before this."""
    config = config or ParallelConfig()
    if env.mesh is None:
        raise ValueError("parallelize needs a process group: launch with torchrun and call init_distributed()")
    if config.expert_parallel:
        apply_expert_parallel(model, env.mesh, divide_gradients=config.divide_expert_gradients)
    if config.checkpointing:
        apply_activation_checkpointing(model)
    return apply_fsdp(model, env.mesh, mp_policy=mixed_precision(env.device, config.mixed_precision),
                      reshard_after_forward=config.reshard_after_forward)


def all_reduce_gradients(params) -> None:
    """Average the gradients of replicated parameters (LoRA adapters, which live outside FSDP) over all ranks,
    in one collective. Call after backward, before clipping. A missing gradient counts as zero."""
    params = [p for p in params if p.requires_grad]
    if not params or not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
        offset += p.numel()


# -- checkpoints -----------------------------------------------------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter or gradient (a collective: call on every rank)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def export_hf_checkpoint(model: DiffusionGemma, directory: str | os.PathLike, **save_kwargs) -> Path | None:
    """Gather the full state dict to rank 0 (on CPU) and write it in the Hugging Face layout with
    `save_model`; every rank must call this. Returns the directory on rank 0, None elsewhere."""
    if not dist.is_initialized():
        return save_model(model, directory, **save_kwargs)
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = None
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = DiffusionGemma(model.config)
        plain.load_state_dict(state, assign=True, strict=True)
        plain.stack.reset_buffers("cpu")
        out = save_model(plain, directory, **save_kwargs)
    dist.barrier()
    return out


def save_training_state(directory: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Sharded save with DCP: each rank writes its own shards of `module`'s trainable state and the optimizer
    moments (the model for full SFT, the adapter for LoRA). Restored exactly by `load_training_state`, also
    at another world size."""
    model_state, optim_state = get_state_dict(module, optimizer)
    with warnings.catch_warnings():  # one process: DCP says it assumes a single process, which is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))


def load_training_state(directory: str | os.PathLike, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model_state, optim_state = get_state_dict(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# -- small collectives for the training loops (no-ops in a single process) ----------------------------------
def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: float) -> float:
    """The mean of a number over all ranks."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (e.g. Ctrl-C reached one rank first)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
