"""`dgemma train` settings in three parts (model shape, data, optimisation) plus the run's bookkeeping.

Every field is a flag of `dgemma train` (`config.flags`; nested parts give flat flags such as `--lr`), and the
resolved config is stored in each checkpoint's `train_state/state.json` (`TrainConfig.from_dict` reads it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgemma.config.errors import ConfigError
from dgemma.config.flags import setting
from dgemma.config.model import FULL, SLIDING, ModelConfig


@dataclass
class ModelShape:
    """The shape of a model trained from scratch (sliding and full layers alternate; the vocabulary and the
    special ids come from the tokenizer)."""

    hidden_size: int = setting(192, "hidden size")
    num_hidden_layers: int = setting(4, "layers (sliding and full alternate)")
    num_attention_heads: int = setting(4, "query heads")
    num_key_value_heads: int = setting(2, "key/value heads of sliding layers (full layers: 1, head_dim doubled)")
    head_dim: int = setting(48, "head size of sliding layers")
    intermediate_size: int = setting(384, "dense MLP width")
    num_experts: int = setting(4, "routed experts per layer")
    top_k_experts: int = setting(2, "experts per token")
    moe_intermediate_size: int = setting(128, "expert MLP width")
    sliding_window: int = setting(128, "sliding-window size")
    canvas_length: int = setting(32, "canvas length")

    def model_config(self, vocab_size: int, pad_id: int | None, bos_id: int | None, eos_ids: list[int]) -> ModelConfig:
        n = self.num_hidden_layers
        types = [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
        return ModelConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=n, layer_types=types, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, global_head_dim=2 * self.head_dim,
            num_global_key_value_heads=1, sliding_window=self.sliding_window, num_experts=self.num_experts,
            top_k_experts=self.top_k_experts, moe_intermediate_size=self.moe_intermediate_size,
            canvas_length=self.canvas_length, max_position_embeddings=8192, dtype="float32", pad_token_id=pad_id,
            bos_token_id=bos_id, eos_token_id=eos_ids, image_token_id=None, boi_token_id=None, eoi_token_id=None)


@dataclass
class DataConfig:
    data: str = setting("data/corpus", "corpus directory (output of `dgemma data build`)")
    tokenizer: str = setting("data/tokenizer", "tokenizer directory (output of `dgemma data build`)")
    batch_size: int = setting(16, "examples per step")
    max_prompt: int = setting(64, "longest prompt of a pretraining window")
    max_canvases: int = setting(2, "most canvases in a response")
    chat_fraction: float = setting(0.3, "share of examples that are chat pairs")


@dataclass
class OptimConfig:
    steps: int = setting(2600, "optimisation steps of the whole run (a resumed run continues to this step)")
    lr: float = setting(3e-3, "peak learning rate (AdamW 0.95/0.99)")
    min_lr_ratio: float = setting(0.1, "final learning rate as a share of the peak (cosine decay)")
    warmup: int = setting(100, "linear warm-up steps")
    weight_decay: float = setting(1e-4, "AdamW weight decay of matrices")
    clip: float = setting(1.0, "gradient norm clipping")
    self_cond_prob: float = setting(0.5, "probability of the self-conditioning pass per example")
    seed: int = setting(0, "seed of the initialisation and of every step's random choices")


@dataclass
class TrainConfig:
    out: str = setting("runs/small", "run directory: checkpoints step-N/ (resumes from the newest)")
    model: ModelShape = field(default_factory=ModelShape)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = setting(200, "steps between evaluations")
    eval_batches: int = setting(4, "batches per evaluation")
    save_every: int = setting(100, "steps between checkpoints")
    keep_checkpoints: int = setting(2, "complete checkpoints kept (the newest)")
    resume_fallback: bool = setting(False, "resume from an older checkpoint when the newest is damaged")
    log_every: int = setting(20, "steps between log lines")
    device: str = setting("cpu", "torch device")
    threads: int = setting(0, "torch CPU threads (0: torch's default)")

    @classmethod
    def build(cls, **flat: Any) -> TrainConfig:
        """From flat field names (`lr=...`, `hidden_size=...`), each routed to its part."""
        parts = {"model": ModelShape, "data": DataConfig, "optim": OptimConfig}
        kwargs: dict[str, dict[str, Any]] = {name: {} for name in parts}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            owner = next((name for name, part in parts.items()
                          if key in {f.name for f in dataclasses.fields(part)}), None)
            if owner is None:
                top[key] = value
            else:
                kwargs[owner][key] = value
        return cls(**top, **{name: parts[name](**kw) for name, kw in kwargs.items()})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """From `dataclasses.asdict` output (as stored in state.json)."""
        nested = {"model": ModelShape, "data": DataConfig, "optim": OptimConfig}
        return cls(**{k: nested[k](**v) if k in nested else v for k, v in data.items()})

    def validate(self) -> None:
        checks = [("steps", self.optim.steps, 1), ("batch_size", self.data.batch_size, 1),
                  ("max_prompt", self.data.max_prompt, 1), ("max_canvases", self.data.max_canvases, 1),
                  ("warmup", self.optim.warmup, 0)]
        checks += [(name, getattr(self, name), 1) for name in ("eval_every", "eval_batches", "save_every",
                                                                "keep_checkpoints", "log_every")]
        for name, value, low in checks:
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if not self.optim.lr > 0 or not 0 <= self.data.chat_fraction <= 1 or not 0 <= self.optim.self_cond_prob <= 1:
            raise ConfigError("lr must be > 0; chat_fraction and self_cond_prob must lie in [0, 1]")
        for name in ("data", "tokenizer"):
            if not Path(getattr(self.data, name)).is_dir():
                raise ConfigError(f"--{name} {getattr(self.data, name)}: no such directory (run `dgemma data build`)")


@dataclass
class SFTData:
    data: str = setting("", "training data: JSONL, one example per line, {\"messages\": [...]} (chat, loss on the "
                            "assistant turns) or {\"prompt\": ..., \"completion\": ...} (plain text)")
    eval_data: str = setting("", "held-out JSONL (default: --eval-fraction of --data)")
    eval_fraction: float = setting(0.05, "share of --data held out for the eval loss when no --eval-data is given")
    max_length: int = setting(2048, "longest example in tokens (prompt + answer padded to whole canvases)")
    truncate: bool = setting(False, "cut longer examples' prompts from the left instead of refusing them")
    batch_size: int = setting(8, "examples per optimisation step (all ranks together)")


@dataclass
class LoraSettings:
    lora_rank: int = setting(0, "LoRA rank; 0 fine-tunes every weight")
    lora_alpha: float = setting(32.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = setting(0.0, "dropout on the LoRA input")
    lora_targets: str = setting("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                                "linears that get adapters: attention q/k/v/o and the dense MLP (never the router, "
                                "the experts or the self-conditioning MLP)")


@dataclass
class FinetuneOptim:
    steps: int = setting(800, "optimisation steps (a resumed run continues to this step)")
    lr: float = setting(1.5e-4, "peak learning rate (AdamW 0.95/0.99; the released model's recipe)")
    min_lr_ratio: float = setting(0.1, "final learning rate as a share of the peak (cosine decay)")
    warmup: int = setting(25, "linear warm-up steps")
    weight_decay: float = setting(1e-4, "AdamW weight decay of matrices")
    clip: float = setting(1.0, "gradient norm clipping")
    self_cond_prob: float = setting(0.5, "probability of the self-conditioning pass per example")
    lower_fill_noise: float = setting(0.0, "probability per example that its end-id fill is noised below its answer "
                                           "(at t * u, u ~ U(0, 1)); 0: the reference objective")
    seed: int = setting(0, "seed of the adapters' initialisation and of every step's random choices")
    train_router: bool = setting(False, "also train the router (frozen by default, as in the released recipe)")


@dataclass
class FinetuneConfig:
    model: str = setting("bundled", "base checkpoint directory (or 'bundled')")
    out: str = setting("runs/finetune", "run directory: the result (an adapter, or model/ for full fine-tuning) "
                                       "and checkpoints/step-N/ (resumes from the newest)")
    data: SFTData = field(default_factory=SFTData)
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    eval_every: int = setting(100, "steps between eval losses")
    eval_examples: int = setting(64, "held-out examples per eval (the first ones, so evals compare)")
    save_every: int = setting(200, "steps between checkpoints")
    keep_checkpoints: int = setting(2, "complete checkpoints kept (the newest)")
    resume_fallback: bool = setting(False, "resume from an older checkpoint when the newest is damaged")
    log_every: int = setting(10, "steps between log lines (without a terminal)")
    device: str = setting("cpu", "torch device (under torchrun: each rank's own GPU, or cpu)")
    dtype: str = setting("float32", "master weight dtype (the base of a LoRA run may be bfloat16)")
    threads: int = setting(0, "torch CPU threads (0: torch's default)")
    expert_parallel: bool = setting(False, "under torchrun: split the experts across ranks")
    checkpointing: bool = setting(False, "activation checkpointing (recompute each layer's pieces in backward)")
    stop_after: int = setting(0, "stop (with a checkpoint) at this step, to resume later; 0: run to --steps")

    def validate(self) -> None:
        for name, value, low in (("steps", self.optim.steps, 1), ("stop_after", self.stop_after, 0),
                                 ("batch_size", self.data.batch_size, 1),
                                 ("max_length", self.data.max_length, 2), ("eval_every", self.eval_every, 1),
                                 ("eval_examples", self.eval_examples, 1),
                                 ("save_every", self.save_every, 1), ("keep_checkpoints", self.keep_checkpoints, 1),
                                 ("log_every", self.log_every, 1), ("warmup", self.optim.warmup, 0),
                                 ("lora_rank", self.lora.lora_rank, 0)):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if not self.optim.lr > 0 or not 0 <= self.data.eval_fraction < 1 or not 0 <= self.optim.self_cond_prob <= 1:
            raise ConfigError("lr must be > 0, eval_fraction in [0, 1), self_cond_prob in [0, 1]")
        if not 0 <= self.optim.lower_fill_noise <= 1:
            raise ConfigError(f"--lower-fill-noise is a probability in [0, 1], got {self.optim.lower_fill_noise}")
        if not self.data.data:
            raise ConfigError("--data is required: a JSONL file of training examples")
        for flag in ("data", "eval_data"):
            value = getattr(self.data, flag)
            if value and not Path(value).is_file():
                raise ConfigError(f"--{flag.replace('_', '-')} {value}: no such file")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        nested = {"data": SFTData, "lora": LoraSettings, "optim": FinetuneOptim}
        return cls(**{k: nested[k](**v) if k in nested else v for k, v in data.items()})
