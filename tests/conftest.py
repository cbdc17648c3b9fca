import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; more threads oversubscribe and slow torch down badly
sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import build_hf_model, save_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Factory: (name, seed, vision) -> (transformers model, checkpoint dir), cached per session."""
    cache = {}

    def make(name="base", seed=0, vision=True, eos=(1,)):
        key = (name, seed, vision, tuple(eos))
        if key not in cache:
            model = build_hf_model(name, seed=seed, vision=vision)
            path = tmp_path_factory.mktemp(f"ckpt_{name}_{seed}")
            save_hf_checkpoint(model, path, eos=eos)
            cache[key] = (model, path)
        return cache[key]

    return make
