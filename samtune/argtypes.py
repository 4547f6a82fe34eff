"""argparse value types shared by samtune's command-line tools, and the number ranges they check (which the APIs
behind the tools check with the same words: :func:`in_range`, :func:`range_text`)."""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable


def comma_separated(kind: Callable[[str], Any], count: int | None = None) -> Callable[[str], list[Any]]:
    """An argparse ``type``: ``"1,2,3"`` -> ``[kind("1"), kind("2"), kind("3")]``, exactly ``count`` values when
    given; a bad value is an ``ArgumentTypeError`` that quotes the text."""
    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if count is not None and len(items) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values, got {text!r}")
        try:
            return [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None

    parse.__name__ = f"list of {kind.__name__}"
    return parse


def _checked(kind: Callable[[str], Any], expected: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` when ``ok`` accepts it; errors say ``expected <expected>, got ...``,
    quoting text that does not parse and giving the value that ``ok`` refuses."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = expected
    return parse


def integer(minimum: int, expected: str | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``; errors say ``expected <expected>, got ...`` (by default
    ``an integer >= minimum``)."""
    return _checked(int, expected or f"an integer >= {minimum}", lambda value: value >= minimum)


def range_text(low: float, high: float | None = None, high_open: bool = False) -> str:
    """``">= low"``, ``"in [low, high]"`` or ``"in [low, high)"`` (``high_open``): the range of :func:`in_range`."""
    return f">= {low:g}" if high is None else f"in [{low:g}, {high:g}{')' if high_open else ']'}"


def in_range(value: float, low: float, high: float | None = None, high_open: bool = False) -> bool:
    """Whether ``value`` is a finite number in :func:`range_text`'s range (NaN and infinities are not)."""
    if not (math.isfinite(value) and value >= low):
        return False
    return high is None or (value < high if high_open else value <= high)


def number(low: float, high: float | None = None, high_open: bool = False,
           expected: str | None = None) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[low, high]`` (``[low, high)`` with ``high_open``; no upper bound
    when ``high`` is None); NaN and infinities are refused. Errors say ``expected <expected>, got ...``."""
    return _checked(float, expected or f"a number {range_text(low, high, high_open)}",
                    lambda value: in_range(value, low, high, high_open))
