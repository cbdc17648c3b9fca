"""The errors a user can act on. Front ends (CLI, HTTP, chat) report exactly these, as one line or a 400; any other
exception is a bug and keeps its traceback (tests/test_tokenizer_cli.py checks the CLI side)."""

from __future__ import annotations


class UserError(ValueError):
    """Something a user gave (a flag, a file, a request) that cannot be used; the message says what to fix.
    Every error meant for users derives from it, so that front ends report exactly these and let internal
    errors surface as bugs."""


class ConfigError(UserError):
    """An invalid model config, generation setting or request size."""
