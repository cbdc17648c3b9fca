import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; more threads oversubscribe and slow torch down badly
sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import add_bpe_tokenizer, build_hf_model, save_hf_checkpoint  # noqa: E402


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


SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
CORPUS = ["the king said to the queen that the night was long", "why is the sky blue? because of scattering",
          "a model answers the user in plain words"] * 20


@pytest.fixture(scope="session")
def checkpoint_with_tokenizer(hf_checkpoint, tmp_path_factory):
    _, path = hf_checkpoint("base")
    return add_bpe_tokenizer(path, tmp_path_factory.mktemp("with_tok"), CORPUS, SPECIALS, 300, TEMPLATE)




def pytest_addoption(parser):
    parser.addoption("--fuzz-requests", type=int, default=300,
                     help="malformed requests tests/test_server_fuzz.py sends (documented longer run: 2000)")
