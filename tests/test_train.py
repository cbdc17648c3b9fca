"""A short CPU training run: the loss falls, runs are deterministic, resuming is exact, the result loads."""

import json

import pytest
import torch

from dgemma.config import TrainConfig
from dgemma.model.loading import load_model
from dgemma.train.data import DOC_SEP, train_tokenizer
from dgemma.train.loop import train

TEXT = ("the cat sat on the mat and the dog sat on the log. " * 3 + "a bird sang in the tree by the river. " * 2)


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    corpus = root / "corpus"
    corpus.mkdir()
    docs = [f"{TEXT} story {i}." for i in range(30)]
    (corpus / "pretrain.train.txt").write_text(DOC_SEP.join(docs))
    (corpus / "pretrain.val.txt").write_text(DOC_SEP.join(docs[:3]))
    pairs = [{"prompt": "where did the cat sit?", "response": "on the mat."},
             {"prompt": "where did the dog sit?", "response": "on the log."}]
    for split in ("train", "val"):
        (corpus / f"chat.{split}.jsonl").write_text("\n".join(json.dumps(p) for p in pairs) + "\n")
    train_tokenizer(corpus, root / "tok", vocab_size=300)
    return corpus, root / "tok"


def _config(data_dirs, out, **kw):
    corpus, tok = data_dirs
    base = dict(data=str(corpus), tokenizer=str(tok), out=str(out), hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=48, num_experts=2,
                top_k_experts=1, moe_intermediate_size=16, sliding_window=16, canvas_length=8, batch_size=4,
                max_prompt=8, max_canvases=2, steps=24, lr=1e-2, warmup=2, eval_every=12, eval_batches=1,
                save_every=100, log_every=100)
    base.update(kw)
    return TrainConfig.build(**base)


def _weights(path):
    model, _ = load_model(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_loss_falls_and_run_is_deterministic(data_dirs, tmp_path):
    out_a = train(_config(data_dirs, tmp_path / "a"))
    history = json.loads((out_a / "train_state" / "state.json").read_text())["history"]
    assert history[-1]["val_ar_loss"] < history[0]["val_ar_loss"]
    assert history[-1]["val_ar_loss"] < 0.8 * torch.log(torch.tensor(300.0)).item()
    out_b = train(_config(data_dirs, tmp_path / "b"))
    a, b = _weights(out_a), _weights(out_b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted(data_dirs, tmp_path):
    full = train(_config(data_dirs, tmp_path / "full", steps=10, eval_every=100))
    cfg = _config(data_dirs, tmp_path / "split", steps=10, eval_every=100)
    train(cfg, stop_after=4)
    assert json.loads((tmp_path / "split" / "step-00000004" / "train_state" / "state.json").read_text())["step"] == 4
    last = train(cfg)
    assert last == tmp_path / "split" / "step-00000010"
    a, b = _weights(full), _weights(last)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_checkpoint_loads_in_transformers(data_dirs, tmp_path):
    from transformers import DiffusionGemmaForBlockDiffusion

    out = train(_config(data_dirs, tmp_path / "c", steps=3, eval_every=100))
    assert max(p.stat().st_size for p in out.glob("*.safetensors")) <= 16 * 2**20
    ours, _ = load_model(out)
    hf = DiffusionGemmaForBlockDiffusion.from_pretrained(out).eval()
    ids, canvas = torch.tensor([[2, 10, 11, 12]]), torch.arange(8)[None] + 20
    with torch.no_grad():
        ref = hf(input_ids=ids, decoder_input_ids=canvas).logits
        cache = ours.new_cache()
        ours.encode(ids, cache)
        torch.testing.assert_close(ours.denoise(canvas, cache), ref, atol=1e-5, rtol=1e-5)


def _driver(cfg, tmp_path, delay):
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    cfg_file = tmp_path / f"{Path(cfg.out).name}.json"
    cfg_file.write_text(json.dumps(dataclasses.asdict(cfg)))
    driver = Path(__file__).parent / "train_driver.py"
    return subprocess.Popen([sys.executable, str(driver), str(cfg_file), str(delay)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, timeout=60.0):
    import time

    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.time() < deadline, "the training run did not reach the kill point"
        time.sleep(0.003)
    return True


def test_sigkill_at_any_moment_then_resume_is_exact(data_dirs, tmp_path):
    """SIGKILL a run repeatedly (during saves, between them, at start-up); each restart resumes from the newest
    complete checkpoint, and the final weights equal those of an uninterrupted run bit for bit."""
    import signal
    import time

    kw = dict(steps=12, save_every=2, eval_every=6, keep_checkpoints=2)
    full = _driver(_config(data_dirs, tmp_path / "full", **kw), tmp_path, 0.0)
    assert full.wait(timeout=120) == 0, full.stderr.read()
    out = tmp_path / "killed"
    cfg = _config(data_dirs, out, **kw)
    kills = {"save": 0, "step": 0, "start": 0}
    schedule = ["save", "step", "save", "start", "step", "save", "step"]
    def saving():
        return any(out.glob(".tmp-step-*"))

    for moment in schedule:
        proc = _driver(cfg, tmp_path, 0.25)
        if moment == "save":
            reached = _wait_for(saving, proc)
        elif moment == "step":
            done = {p.name for p in out.glob("step-*")}
            reached = _wait_for(lambda d=done: {p.name for p in out.glob("step-*")} - d and not saving(), proc)
        else:
            time.sleep(0.5)
            reached = proc.poll() is None
        if not reached:
            break  # the run finished before this kill point
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills[moment] += 1
    last = _driver(cfg, tmp_path, 0.0)
    assert last.wait(timeout=120) == 0, last.stderr.read()
    assert "resuming" in last.stderr.read()
    print(f"SIGKILLs by moment: {kills}")
    assert kills["save"] >= 2 and sum(kills.values()) >= 5, kills
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000010", "step-00000012"]
    a, b = _weights(tmp_path / "full" / "step-00000012"), _weights(out / "step-00000012")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_newest_checkpoint_is_named_and_fallback_is_opt_in(data_dirs, tmp_path):
    from dgemma.model.loading import CheckpointError

    cfg = _config(data_dirs, tmp_path / "run", steps=4, save_every=2, eval_every=100)
    train(cfg)
    shard = next((tmp_path / "run" / "step-00000004").glob("model*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    cfg6 = _config(data_dirs, tmp_path / "run", steps=6, save_every=2, eval_every=100)
    with pytest.raises(CheckpointError, match=shard.name):
        train(cfg6)
    cfg6.resume_fallback = True
    assert train(cfg6) == tmp_path / "run" / "step-00000006"  # resumed from step 2, then went on
