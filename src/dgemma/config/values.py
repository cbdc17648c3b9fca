"""Small value checks shared by the config modules."""

from __future__ import annotations

import math
from typing import Any

from dgemma.config.errors import ConfigError


def as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"token ids must be an integer or a list of integers, got {value!r}")
    return tuple(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
