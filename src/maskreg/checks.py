"""Tests of configuration values, and how a value is shown in messages: shared by the torch-free settings
modules (:mod:`maskreg.stages`, :mod:`maskreg.learning`). Each ``*_at_least``/``list_of`` returns a predicate."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any


def show(v: Any) -> str:
    """A value as YAML would write it (lists in brackets, true/false/null), for messages."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {show(x)}" for k, x in v.items()) + "}"
    if hasattr(v, "tolist"):  # numpy scalars and arrays
        return show(v.tolist())
    return str(v)


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def is_list(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def int_at_least(low: int):
    return lambda v: is_int(v) and v >= low


def num_at_least(low: float):
    return lambda v: is_num(v) and v >= low


def list_of(ok, min_items: int = 1):
    return lambda v: is_list(v) and len(v) >= min_items and all(ok(x) for x in v)
