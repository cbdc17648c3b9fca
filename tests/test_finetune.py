"""`dgemma finetune`: SFT data (rendering, errors), loss masking, LoRA and full runs that learn and resume exactly,
adapters at inference (engine and reference paths) equal to the merged model, `dgemma merge`, torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgemma.config import ConfigError, EngineConfig, FinetuneConfig, SFTData
from dgemma.engine.engine import Engine
from dgemma.model.loading import load_model, read_generation_config
from dgemma.tokenizer import Tokenizer
from dgemma.train.finetune import finetune
from dgemma.train.objective import objective
from dgemma.train.sft_data import Batches, collate, load_examples

WORDS = ["red", "blue", "green", "king", "queen", "night", "sky", "bird", "tree", "river"]


def _task(n, seed=0):
    """'say X twice' -> 'X X': a format the base model cannot do."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        w = WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]
        rows.append({"messages": [{"role": "user", "content": f"say {w} twice"},
                                  {"role": "assistant", "content": f"{w} {w}"}]})
    return rows


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def base(checkpoint_with_tokenizer):
    return checkpoint_with_tokenizer


def _cfg(base, tmp, data, **kw):
    flat = dict(model=str(base), out=str(tmp / "run"), data=str(data), batch_size=4, steps=12, eval_every=6,
                save_every=4, log_every=100, lr=3e-3, warmup=2, lora_rank=4, eval_fraction=0.2)
    flat.update(kw)
    cfg = FinetuneConfig()
    for key, value in flat.items():
        for part in ("data", "lora", "optim"):
            if hasattr(getattr(cfg, part), key):
                setattr(getattr(cfg, part), key, value)
                break
        else:
            setattr(cfg, key, value)
    return cfg


def test_sft_data_renders_turns_and_names_bad_lines(base, tmp_path):
    tok = Tokenizer.from_directory(base)
    end = (1, 5)  # <eos>, <turn|>
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "hello again"}]},
            {"prompt": "the king", "completion": " said"}]
    examples, report = load_examples(_write(tmp_path / "a.jsonl", rows), tok, end, 16, SFTData())
    assert report.examples == 3 and len(examples) == 3  # one per assistant turn, plus the completion
    first, second, plain = examples
    assert tok.decode(first.response[:first.answer_length]) == "hello"  # the end token is special: not decoded
    assert first.response[first.answer_length - 1] == 5 and len(first.response) % 16 == 0
    assert second.prompt[:len(first.prompt)] == first.prompt  # the second turn's prompt holds the first
    assert tok.decode(plain.response[:plain.answer_length - 1]) == " said"
    assert plain.response[plain.answer_length - 1] == 1
    bad = [("{not json", "not valid JSON"), ('{"text": "x"}', "must be an object"),
           ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
           ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0"),
           ('{"prompt": 3, "completion": "x"}', "must be strings")]
    for line, message in bad:
        (tmp_path / "b.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
        with pytest.raises(ConfigError, match=rf"b.jsonl:2: .*{message}"):
            load_examples(tmp_path / "b.jsonl", tok, end, 16, SFTData())
    long = [{"prompt": "the king " * 40, "completion": "x"}, {"prompt": "hi", "completion": "x"}]
    with pytest.raises(ConfigError, match=r"1 example\(s\) longer than --max-length 64 tokens \(lines 1\)"):
        load_examples(_write(tmp_path / "c.jsonl", long), tok, end, 16, SFTData(max_length=64))
    kept, report = load_examples(tmp_path / "c.jsonl", tok, end, 16, SFTData(max_length=64, truncate=True))
    assert report.truncated == 1 and all(e.length <= 64 for e in kept)


def test_only_answer_labels_count(base):
    """Changing the label of a prompt position never changes the loss; changing an answer's label does."""
    model, _ = load_model(base)
    tok = Tokenizer.from_directory(base)
    examples, _ = load_examples(_write(Path(base).parent / "mask.jsonl", _task(2)), tok, (1, 5), 16, SFTData())
    batch = collate(examples, 0)

    def loss(labels):
        batch.labels = labels
        t = torch.full((2,), 0.5)
        return objective(model, batch, torch.Generator().manual_seed(0), pad_id=0, t=t).total.item()

    base_labels = batch.labels.clone()
    ref = loss(base_labels.clone())
    p = int(batch.prompt_lens[0]) - 2
    changed = base_labels.clone()
    changed[0, p] = (changed[0, p] + 7) % 300
    assert loss(changed) == ref
    a = int(batch.prompt_lens[0]) + 1
    changed = base_labels.clone()
    changed[0, a] = (changed[0, a] + 7) % 300
    assert loss(changed) != ref


def test_batches_are_a_function_of_the_step():
    from dgemma.train.sft_data import SFTExample

    examples = [SFTExample([1] * n, [2] * 16, 3, n) for n in range(1, 40)]
    a, b = Batches(examples, 4, seed=3), Batches(examples, 4, seed=3)
    steps = [17, 3, 40, 3, 0, 95]
    assert [[e.line for e in a.batch(s)] for s in steps] == [[e.line for e in b.batch(s)] for s in steps]
    lengths = [max(e.length for e in a.batch(s)) - min(e.length for e in a.batch(s)) for s in range(9)]
    assert sum(lengths) / len(lengths) < 10  # bucketed: batches hold examples of similar lengths


def test_lora_finetune_learns_and_resumes_exactly(base, tmp_path):
    data = _write(tmp_path / "task.jsonl", _task(40))
    out = finetune(_cfg(base, tmp_path, data, steps=12))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    state = json.loads(sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    history = state["history"]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    split = tmp_path / "split"
    finetune(_cfg(base, split, data, steps=12, stop_after=5))
    second = finetune(_cfg(base, split, data, steps=12))
    from safetensors.torch import load_file

    a, b = load_file(out / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_at_inference_equals_the_merged_model(base, tmp_path):
    """An adapter applied without merging (engine: folded into its packed copies; reference: the hooks) gives the
    tokens of the model `dgemma merge` writes."""
    from dgemma.cli import main
    from dgemma.train.lora import load_adapter

    data = _write(tmp_path / "task.jsonl", _task(24))
    adapter = finetune(_cfg(base, tmp_path, data, steps=6, eval_fraction=0.0))
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, _ = load_model(tmp_path / "merged")
    adapted, _ = load_model(base)
    load_adapter(adapted, adapter)
    gen = read_generation_config(base, adapted.config).replace(max_new_tokens=32, max_denoising_steps=4,
                                                                eos_token_ids=())
    prompts = [[2, 40, 41, 42], [2, 7]]
    outs = [[r.output for r in Engine(m, EngineConfig(max_batch=2, max_context=128)).generate(prompts, gen, [1, 2])]
            for m in (merged, adapted)]
    assert outs[0] == outs[1]
    cache_a, cache_m = adapted.new_cache(), merged.new_cache()
    canvas = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(0))
    adapted.encode(torch.tensor([prompts[0]]), cache_a)
    merged.encode(torch.tensor([prompts[0]]), cache_m)
    torch.testing.assert_close(adapted.denoise(canvas, cache_a), merged.denoise(canvas, cache_m), atol=1e-5, rtol=1e-5)
    argv = ["generate", "--model", str(base), "--prompt-ids", "2,40,41,42", "--max-new-tokens", "16",
            "--max-denoising-steps", "3", "--seed", "1", "--json"]
    assert main([*argv, "--adapter", str(adapter)]) == 0
    other = tmp_path / "other"
    shutil.copytree(adapter, other)
    meta_model = tmp_path / "wrong_base"
    from dgemma.model.init import preset_config, random_model
    from dgemma.model.loading import save_model

    save_model(random_model(preset_config("tiny", vocab_size=384)), meta_model)
    assert main(["generate", "--model", str(meta_model), "--prompt-ids", "2,3", "--adapter", str(other)]) == 2


def test_full_finetune_writes_a_checkpoint_and_refuses_bad_settings(base, tmp_path):
    data = _write(tmp_path / "task.jsonl", _task(16))
    own = tmp_path / "base"  # a base with its own sampler settings, which the result must keep
    shutil.copytree(base, own)
    gen = json.loads((own / "generation_config.json").read_text()) if (own / "generation_config.json").exists() else {}
    (own / "generation_config.json").write_text(json.dumps({**gen, "max_denoising_steps": 7, "t_min": 0.25}))
    out = finetune(_cfg(own, tmp_path, data, steps=3, lora_rank=0, lr=1e-4, eval_fraction=0.0))
    assert out == tmp_path / "run" / "model"
    model, _ = load_model(out)
    before, _ = load_model(base)
    assert read_generation_config(out, model.config) == read_generation_config(own, model.config)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert changed and not any(".router." in k for k in changed)  # the router stays frozen
    with pytest.raises(ConfigError, match="--data"):
        finetune(_cfg(base, tmp_path, "", steps=3))
    with pytest.raises(ConfigError, match="fp32 master weights"):
        finetune(_cfg(base, tmp_path, data, steps=3, lora_rank=0, dtype="bfloat16"))
    with pytest.raises(ConfigError, match="--lower-fill-noise is a probability"):
        finetune(_cfg(base, tmp_path, data, steps=3, lower_fill_noise=1.5))


def test_lower_fill_noise_reaches_the_training_steps_only(base, tmp_path, monkeypatch):
    import dgemma.train.objective as objective_module

    calls = []
    original = objective_module.fill_noise_levels

    def spy(t, answer_lens, r, lower_prob, generator):
        calls.append((answer_lens.tolist(), lower_prob))
        return original(t, answer_lens, r, lower_prob, generator)

    monkeypatch.setattr(objective_module, "fill_noise_levels", spy)
    data = _write(tmp_path / "task.jsonl", _task(16))
    finetune(_cfg(base, tmp_path, data, steps=2, eval_every=1, lower_fill_noise=0.5))
    assert len(calls) == 2 and all(p == 0.5 for _, p in calls)  # two steps; the evals use the reference objective
    assert all(0 < n <= 32 for lens, _ in calls for n in lens)  # answer lengths reached the objective


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_lora_under_torchrun_resumes_exactly(base, tmp_path):
    """Two gloo processes: a run stopped at step 3 and resumed ends with the adapter of an uninterrupted run."""
    data = _write(tmp_path / "task.jsonl", _task(24))

    def run(out, *extra):
        argv = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "dgemma", "finetune", "--model",
                str(base), "--data", str(data), "--out", str(out), "--steps", "6", "--batch-size", "4",
                "--lora-rank", "4", "--lr", "3e-3", "--warmup", "1", "--save-every", "3", "--eval-fraction", "0",
                "--threads", "1", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    run(tmp_path / "full")
    run(tmp_path / "split", "--stop-after", "3")
    assert "resuming" in run(tmp_path / "split").stderr
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sys.executable  # the same interpreter runs torchrun's workers
