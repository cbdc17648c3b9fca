"""The small DiffusionGemma model trained by this project and shipped inside the package.

`dgemma generate "..."` uses it when no `--model` is given; docs/quality.md reports how it was trained
and how good it is.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_NAME = "small"


def bundled_model_dir() -> Path:
    path = Path(__file__).parent / BUNDLED_NAME
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"the bundled model is missing from this installation ({path}); "
                                "pass --model DIR to use a checkpoint directory")
    return path


def resolve_model(model: str | None) -> Path:
    """`None` or "bundled" -> the bundled model; anything else is a checkpoint directory."""
    if model is None or model == "bundled":
        return bundled_model_dir()
    return Path(model)
