"""Cost of the constraint engine on the CPU: draft-path masks, reuse, unpacking, projection, exact mode.

Two vocabularies: the bundled 4,096-token tokenizer (V = 4,100) and a synthetic 262,144-token byte-level
vocabulary (the 256 bytes plus random ASCII pieces of 2-9 characters, half with a leading space; the
released model's V). One thread. Prints a table; docs/structured.md quotes it.

    PYTHONPATH=src python3 bench/constrain_cost.py [--skip-big]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dgemma.constrain import CanvasDP, ConstraintSpec, LLGuidanceBackend, bitmask, project

SCHEMA = {"type": "array", "maxItems": 12, "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "role": {"enum": ["admin", "user", "guest"]}}, "required": ["name", "age", "role"]}}
DOC = [{"name": f"person {i}", "age": 20 + i, "role": ["admin", "user", "guest"][i % 3]} for i in range(12)]
BUNDLED = Path(__file__).parents[1] / "src" / "dgemma" / "bundled" / "small" / "tokenizer.json"


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best * 1000, out


def synthetic_tokenizer(vocab: int, seed: int = 0) -> str:
    """tokenizer.json text of a byte-level BPE with `vocab` ids (no merges: only the pieces matter here)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    byte_chars = [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]
    pieces = {"<pad>": 0, "<eos>": 1}
    for ch in byte_chars:
        pieces.setdefault(ch, len(pieces))
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}[]:,\"'-_. ")
    while len(pieces) < vocab:
        piece = "".join(rng.choice(alphabet, rng.integers(2, 10))).replace(" ", "Ġ")
        if rng.random() < 0.5:
            piece = "Ġ" + piece
        pieces.setdefault(piece, len(pieces))
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in (("<pad>", 0), ("<eos>", 1))]
    return json.dumps({"version": "1.0", "added_tokens": added, "normalizer": None,
                       "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                         "use_regex": True},
                       "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True,
                                                           "trim_offsets": True, "use_regex": True},
                       "model": {"type": "BPE", "vocab": pieces, "merges": [], "unk_token": None,
                                 "byte_fallback": False}})


def masks_section(backend: LLGuidanceBackend, name: str, lengths=(32, 256)) -> None:
    spec = ConstraintSpec("json_schema", SCHEMA)
    ms, _ = timed(lambda: backend.grammar(ConstraintSpec("json_schema", {**SCHEMA, "title": str(time.time())})))
    print(f"[{name}] compile schema: {ms:.1f} ms")
    tokens = backend.tokenizer.tokenize_str(json.dumps(DOC, separators=(",", ":")))
    for length in lengths:
        draft = (tokens + [backend.end_ids[0]] * length)[:length]
        matcher = backend.matcher(spec)

        def fresh_call(m=matcher, d=draft):
            m._prev = None  # no rows to reuse
            return m.draft_bitmask(d)

        fresh, rows = timed(fresh_call)
        alt = {}
        for frac in (0.9, 0.1):  # a second valid document that first differs near frac * length
            changed, at = _variant(backend, draft, frac * length)
            matcher.draft_bitmask(draft)
            alt[frac], _ = timed(lambda m=matcher, a=draft, b=changed: (m.draft_bitmask(b), m.draft_bitmask(a)))
            alt[frac] = (alt[frac], at)
        (late, late_at), (early, early_at) = (alt[0.9][0] / 2, alt[0.9][1]), (alt[0.1][0] / 2, alt[0.1][1])
        unpack_ms, _ = timed(lambda r=rows: bitmask.unpack(r, backend.vocab_size))
        logits = torch.randn(length, backend.vocab_size)
        noisy = [t if i % 7 else int(np.random.default_rng(i).integers(backend.vocab_size)) for i, t in
                 enumerate(draft)]
        proj_ms, _ = timed(lambda n=noisy, lg=logits: project(backend.matcher(spec), n, lg), repeat=2)
        print(f"[{name}] C={length}: draft masks fresh {fresh:.1f} ms; reusing rows, draft changed from position "
              f"{late_at} {late:.1f} ms, from {early_at} {early:.1f} ms; unpack to bool {unpack_ms:.1f} ms; "
              f"projection of a draft with every 7th token random {proj_ms:.1f} ms")


def _variant(backend: LLGuidanceBackend, draft: list[int], target: float) -> tuple[list[int], int]:
    """Another valid document's tokens (one name changed) whose first difference is nearest `target`."""
    best = None
    for j in range(len(DOC)):
        doc = [dict(p, name="zq" + p["name"]) if i == j else p for i, p in enumerate(DOC)]
        tokens = backend.tokenizer.tokenize_str(json.dumps(doc, separators=(",", ":")))
        other = (tokens + [backend.end_ids[0]] * len(draft))[:len(draft)]
        at = next((i for i, (a, b) in enumerate(zip(draft, other, strict=True)) if a != b), len(draft))
        if best is None or abs(at - target) < abs(best[1] - target):
            best = (other, at)
    return best


def exact_section(backend: LLGuidanceBackend, name: str, lengths=(32, 256)) -> None:
    spec = ConstraintSpec("json_schema", {**SCHEMA, "maxItems": 4}, mode="exact")
    t = time.perf_counter()
    backend.token_bytes()
    bytes_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    automaton = backend.automaton(spec)
    build_ms = (time.perf_counter() - t) * 1000
    print(f"[{name}] exact: token bytes {bytes_ms:.0f} ms; regex+DFA+lifting {build_ms:.0f} ms -> "
          f"{automaton.num_states} states x {automaton.num_classes} classes")
    for length in lengths:
        logits = torch.randn(length, backend.vocab_size)
        dp = CanvasDP(automaton, logits, automaton.start)
        scores_ms, _ = timed(lambda lg=logits: CanvasDP(automaton, lg, automaton.start), repeat=2)
        marg_ms, _ = timed(lambda lg=logits: CanvasDP(automaton, lg, automaton.start).marginal_logits(), repeat=2)
        vit_ms, _ = timed(dp.viterbi, repeat=2)
        g = torch.Generator().manual_seed(0)
        samp_ms, _ = timed(lambda d=dp, gen=g: d.sample(gen), repeat=2)
        print(f"[{name}] exact C={length}: class scores {scores_ms:.0f} ms; + forward-backward marginals "
              f"{marg_ms:.0f} ms; Viterbi {vit_ms:.0f} ms; FFBS sample (forward cached) {samp_ms:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-big", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t = time.perf_counter()
    bundled = LLGuidanceBackend.for_tokenizer(BUNDLED, 4100, [1, 6])
    print(f"[bundled V=4100] backend (llguidance tokenizer + rows): {(time.perf_counter() - t) * 1000:.0f} ms")
    masks_section(bundled, "bundled V=4100")
    exact_section(bundled, "bundled V=4100")
    if args.skip_big:
        return
    text = synthetic_tokenizer(262_144)
    t = time.perf_counter()
    big = LLGuidanceBackend(text, 262_144, [1])
    print(f"[synthetic V=262144] backend: {(time.perf_counter() - t) * 1000:.0f} ms")
    masks_section(big, "synthetic V=262144", lengths=(256,))
    exact_section(big, "synthetic V=262144")


if __name__ == "__main__":
    main()
