"""Argument checks that run at construction, before anything is traced.

A value that is only known at run time (a tracer from ``jax.jit`` or ``optax.inject_hyperparams``) cannot be
checked here; the transforms document what such a value does instead.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import numpy as np

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
ORDS = (1, 2, math.inf)


def concrete_float(value: Any) -> float | None:
    """``float(value)`` for a concrete scalar, ``None`` for a tracer; ``ValueError`` for anything else.

    Strings and bools are refused although ``float()`` takes them: ``max_norm="1"`` or ``True`` is a bug upstream.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise ValueError(f"expected a number, got {value!r}")
    if np.ndim(value) != 0:
        raise ValueError(f"expected a scalar, got an array of shape {np.shape(value)}: {value!r}")
    return float(value)


def check_non_negative(value: Any, arg: str) -> None:
    """A threshold: a concrete value must be a number >= 0 (0 is valid: the update becomes zero)."""
    try:
        number = concrete_float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{arg} must be a non-negative number or a schedule, got {value!r}") from err
    if number is not None and not number >= 0:  # `not >=` also catches NaN
        raise ValueError(f"{arg} must be a non-negative number, got {value!r}")


def check_finite(value: Any, arg: str) -> None:
    try:
        number = concrete_float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{arg} must be a number, got {value!r}") from err
    if number is not None and not math.isfinite(number):
        raise ValueError(f"{arg} must be a finite number, got {value!r}")


def check_ord(ord: Any, arg: str = "ord") -> None:
    """1, 2 or inf. A tracer passes: ``optax.inject_hyperparams`` injects every number, ``ord`` included."""
    try:
        number = concrete_float(ord)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{arg} must be 1, 2 or inf, got {ord!r}") from err
    if number is not None and number not in ORDS:
        raise ValueError(f"{arg} must be 1, 2 or inf, got {ord!r}")


def check_name(name: Any, arg: str = "name") -> None:
    """Names key the statistics in state and in ``optclip.stats``: letters, digits, ``_ . -`` only."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{arg} must be a non-empty string of letters, digits, '_', '.' or '-', got {name!r}")
