"""Read ahead: produce the next item of an iterator in a background thread while the caller computes.

Reads (preadv, Parquet decoding) and fp16 -> float32 conversion release the GIL, so reading block i+1
overlaps the BLAS product of block i.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


def prefetch(items: Iterable[T]) -> Iterator[T]:
    """The items of `items` in order, each produced one step ahead in a worker thread (errors re-raised here)."""
    source = iter(items)
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = worker.submit(next, source, _DONE)
        while True:
            item = pending.result()
            if item is _DONE:
                return
            pending = worker.submit(next, source, _DONE)
            yield item
