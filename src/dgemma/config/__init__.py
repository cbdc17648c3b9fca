"""Every configuration of dgemma, in one package at the bottom of the import graph.

- `model`: ModelConfig (a checkpoint's config.json), layer types;
- `generation`: GenerationConfig (generation_config.json), the documented limits, `check_request`, `check_seed`;
- `runtime`: EngineConfig, ServerConfig, BenchConfig;
- `train`: TrainConfig and its parts (ModelShape, DataConfig, OptimConfig);
- `flags`: CLI flags derived from these dataclasses; `errors`: UserError, ConfigError.
"""

from dgemma.config.errors import ConfigError, UserError
from dgemma.config.generation import (
    MAX_CONFIDENCE_THRESHOLD,
    MAX_DENOISING_STEPS,
    MAX_ENTROPY_BOUND,
    MAX_NEW_TOKENS,
    MAX_STABILITY,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    SEED_RANGE,
    GenerationConfig,
    check_request,
    check_seed,
)
from dgemma.config.model import DTYPES, FULL, LAYER_TYPES, SLIDING, LayerShape, ModelConfig, parse_dtype
from dgemma.config.runtime import BenchConfig, EngineConfig, ServerConfig
from dgemma.config.train import (
    DataConfig,
    FinetuneConfig,
    FinetuneOptim,
    LoraSettings,
    ModelShape,
    OptimConfig,
    SFTData,
    TrainConfig,
)

__all__ = [
    "BenchConfig", "ConfigError", "DTYPES", "DataConfig", "EngineConfig", "FULL", "GenerationConfig", "LAYER_TYPES",
    "LayerShape", "MAX_CONFIDENCE_THRESHOLD", "MAX_DENOISING_STEPS", "MAX_ENTROPY_BOUND", "MAX_NEW_TOKENS",
    "MAX_STABILITY", "MAX_TEMPERATURE", "MIN_TEMPERATURE", "ModelConfig", "ModelShape", "OptimConfig", "SEED_RANGE",
    "SLIDING", "ServerConfig", "TrainConfig", "UserError", "check_request", "check_seed", "parse_dtype",
    "FinetuneConfig", "FinetuneOptim", "LoraSettings", "SFTData",
]
