"""One place for the value checks every config and message repeats.

Each ``*_problem`` function returns ``None`` when the value is fine, or one sentence naming the value
(dp_accounting's style: ``"clip_norm must be > 0, got -1.0"``), so callers can collect every problem of
a configuration and raise once with :meth:`fedguard.errors.ConfigError.collect`. ``bool`` is never
accepted where an integer is meant (``True`` is an ``int`` in Python).

>>> int_problem("rounds", 0, low=1)
'rounds must be an int >= 1, got 0'
>>> int_problem("ring_bits", 65, low=2, high=64)
'ring_bits must be an int in [2, 64], got 65'
>>> int_problem("neighbours", None, low=1, optional=True) is None
True
>>> number_problem("lr", float("nan"), low=0.0, low_open=True)
'lr must be a finite number > 0.0, got nan'
>>> check_int("seed", True, low=0)
Traceback (most recent call last):
...
fedguard.errors.ConfigError: seed must be an int >= 0, got True
"""

from __future__ import annotations

import math
import numbers

from fedguard.errors import ConfigError

__all__ = ["check_int", "check_number", "int_problem", "is_int", "number_problem"]


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a ``bool``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _range_text(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def int_problem(name: str, value: object, *, low: int | None = None, high: int | None = None,
                optional: bool = False) -> str | None:
    """Why ``value`` is not an int in ``[low, high]`` (either bound may be omitted), or ``None``.
    ``optional``: ``None`` is accepted too (and named in the message)."""
    if optional and value is None:
        return None
    ok = is_int(value) and (low is None or value >= low) and (high is None or value <= high)  # type: ignore[operator]
    if ok:
        return None
    prefix = "None or " if optional else ""
    return f"{name} must be {prefix}an int{_range_text(low, high)}, got {value!r}"


def number_problem(name: str, value: object, *, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False, optional: bool = False) -> str | None:
    """Why ``value`` is not a finite real number in the given range, or ``None``. ``low_open`` /
    ``high_open`` make a bound strict (``> low``, ``< high``)."""
    if optional and value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)  # type: ignore[arg-type]
        if low is not None and (v <= low if low_open else v < low):
            ok = False
        if high is not None and (v >= high if high_open else v > high):
            ok = False
    if ok:
        return None
    prefix = "None or " if optional else ""
    return (f"{name} must be {prefix}a finite number"
            f"{_range_text(low, high, low_open=low_open, high_open=high_open)}, got {value!r}")


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int:
    """``value`` as an ``int`` if :func:`int_problem` finds nothing; else :class:`ConfigError`."""
    problem = int_problem(name, value, low=low, high=high, optional=optional)
    if problem:
        raise ConfigError(problem)
    return value if value is None else int(value)  # type: ignore[return-value,call-overload]


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a ``float`` if :func:`number_problem` finds nothing; else :class:`ConfigError`."""
    problem = number_problem(name, value, low=low, high=high, low_open=low_open, high_open=high_open)
    if problem:
        raise ConfigError(problem)
    return float(value)  # type: ignore[arg-type]
