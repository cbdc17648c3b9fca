"""Regex text helpers shared by the llguidance path and the exact-mode compiler.

`regex_escape(s)` gives a regex matching exactly `s` in both dialects we feed (Rust's `regex` crate
through llguidance, and `dgemma.constrain.regex_dfa`): the metacharacters `\\.+*?()|[]{}^$` get a
backslash, control characters and `/` (which would end a Lark regex literal) become `\\xHH`, the
rest stays literal (non-ASCII characters included). tests/test_constrain_regex.py checks that
escaped strings match themselves and nothing else in both.
"""

from __future__ import annotations

_META = set("\\.+*?()|[]{}^$")


def regex_escape(text: str) -> str:
    out = []
    for ch in text:
        if ch in _META:
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch in "/\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)
