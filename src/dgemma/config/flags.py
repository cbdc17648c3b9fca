"""Command-line flags derived from config dataclasses: one flag per field, with defaults in one place.

A field's flag is `--field-name`. Its type comes from the annotation (int, float, str, bool, or one of them
`| None`) and its help text from the field's `help` metadata (`setting(default, "help")`). Booleans are
switches. Nested dataclass fields (TrainConfig's parts) give flat flags. `from_flags` builds the dataclass back
from the parsed arguments, so the CLI never copies a default. tests/test_tokenizer_cli.py checks the round trip.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
_SCALARS = (int, float, str, bool)


def setting(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - argparse's word
    """A dataclass field with its CLI help text."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _scalar_type(annotation: Any) -> type:
    """int for `int`, `int | None` and the like; the field's type for argparse."""
    if annotation in _SCALARS:
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _scalar_type(args[0])
    raise TypeError(f"no flag type for {annotation!r}")


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, *, skip: tuple[str, ...] = (),
              overrides: bool = False) -> None:
    """One flag per field of `cls` (nested dataclasses flattened). `overrides`: every default is None ("keep the
    value from elsewhere", e.g. a checkpoint's generation_config.json) and the help says so."""
    for f, annotation in _fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(annotation):
            add_flags(parser, annotation, skip=skip, overrides=overrides)
            continue
        kind = _scalar_type(annotation)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None if overrides else default,
                                help=f"{help_text} (default: the checkpoint's)" if overrides else help_text)
            continue
        if overrides:
            parser.add_argument(flag, type=kind, default=None,
                                help=f"{help_text} (default: the checkpoint's)".strip())
            continue
        parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})".strip())


def from_flags(cls: type[T], args: argparse.Namespace, *, skip: tuple[str, ...] = (), **given: Any) -> T:
    """The dataclass `cls` from parsed flags (`add_flags`); `given` fields are taken as they are."""
    kwargs: dict[str, Any] = {}
    for f, annotation in _fields(cls):
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif dataclasses.is_dataclass(annotation):
            kwargs[f.name] = from_flags(annotation, args, skip=skip)
        elif f.name not in skip and hasattr(args, f.name):
            kwargs[f.name] = getattr(args, f.name)
    return cls(**kwargs)


def overrides_from_flags(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` given on the command line (added with `overrides=True`): name -> value."""
    return {f.name: getattr(args, f.name) for f, _ in _fields(cls)
            if getattr(args, f.name, None) is not None}
