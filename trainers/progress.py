"""Progress for long loops: a rich bar on a terminal, a line every 10% in a log file."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, description: str) -> Iterator[T]:
    """Yield items while showing progress on stderr."""
    if sys.stderr.isatty():
        from rich.progress import track
        yield from track(items, total=total, description=description, console=None, transient=True)
        return
    start, next_tenth = time.monotonic(), 1      # in whole tenths: 0.1 added up thrice is past 0.3
    for i, item in enumerate(items, 1):
        yield item
        if total and i * 10 >= next_tenth * total:
            print(f"{description}: {i}/{total} ({time.monotonic() - start:.1f}s)", file=sys.stderr, flush=True)
            while next_tenth * total <= i * 10:
                next_tenth += 1
