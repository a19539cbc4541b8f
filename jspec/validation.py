"""The one validation layer: every public argument and strategy option is checked here, before tracing.

Each check raises `ArgumentError` (a ValueError and a TypeError at once, so callers may catch either) whose
message starts with the argument's name, then says what was expected and what was given. Nothing is silently
converted: a string where a number belongs, a float where an int belongs, or a bool where a number belongs is
an error.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


class ArgumentError(ValueError, TypeError):
    """A bad argument or option: the message names it, the expected form and the value given."""


def fail(name: str, expected: str, value: Any) -> None:
    raise ArgumentError(f"{name}: expected {expected}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, why: str = "") -> int:
    """An int (not a bool, not a float) within [minimum, maximum]; `why` explains the maximum."""
    bounds = _bounds(minimum, maximum)
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        fail(name, f"an int{bounds}{why}", value)
    return int(value)


def check_float(name: str, value: Any, ok: Callable[[float], bool], expected: str) -> float:
    """A real number (int or float, not a bool or a string), finite, with ok(value) true; `expected` says the range."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        fail(name, expected, value)
    if not np.isfinite(value) or not ok(float(value)):
        fail(name, expected, value)
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        fail(name, "True or False", value)
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if not isinstance(value, str) or value not in choices:
        fail(name, f"one of {tuple(choices)}", value)
    return value


def check_int_sequence(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None, allow_empty: bool = False
) -> tuple[int, ...]:
    """A list or tuple of ints within [minimum, maximum] (a bare int or a string is an error)."""
    bounds = _bounds(minimum, maximum)
    expected = f"a list or tuple of ints{bounds}" + ("" if allow_empty else " (at least one)")
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        fail(name, expected, value)
    items = list(value)
    if (not items and not allow_empty) or not all(is_int(v) for v in items):
        fail(name, expected, value)
    if any((minimum is not None and v < minimum) or (maximum is not None and v > maximum) for v in items):
        fail(name, expected, value)
    return tuple(int(v) for v in items)


def check_per_row(name: str, value: Any, batch_size: int, ok: Callable[[np.ndarray], np.ndarray], expected: str) -> None:
    """A traced number given as a scalar or one per row ([B]): a real number (int or float, not a bool or a
    string), finite, with ok(value) true."""
    array = _numbers(value)
    if array is None:
        fail(name, f"{expected} (a number, or a list of {batch_size} numbers: one per row)", value)
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] != batch_size):
        raise ArgumentError(f"{name}: expected a scalar or {batch_size} values (one per row), got shape {array.shape}")
    if not np.all(np.isfinite(array)) or not np.all(ok(array)):
        fail(name, expected, value)


def _numbers(value: Any) -> np.ndarray | None:
    """value as a float64 array if it is a real number or a sequence / array of them; else None."""
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # numpy or jax array
        dtype = np.dtype(value.dtype)
        if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            return None
        return np.asarray(value, np.float64)
    items = value if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in items):
        return None
    return np.asarray(value, np.float64)


def _bounds(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return f" <= {maximum}" if maximum is not None else ""
