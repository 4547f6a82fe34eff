"""argparse value types shared by samtune's command-line tools."""
from __future__ import annotations

import argparse
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
