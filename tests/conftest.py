import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # CI has 2 cores; more threads oversubscribe and slow torch down badly
sys.path.insert(0, str(Path(__file__).parent))

from hf_fixtures import build_hf_model, save_hf_checkpoint  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402


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
    out = tmp_path_factory.mktemp("with_tok")
    shutil.copytree(path, out, dirs_exist_ok=True)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte is a token, as in real byte-level vocabularies
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                        initial_alphabet=alphabet))
    assert tok.get_vocab_size() <= 384
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out




def pytest_addoption(parser):
    parser.addoption("--fuzz-requests", type=int, default=300,
                     help="malformed requests tests/test_server_fuzz.py sends (documented longer run: 2000)")
