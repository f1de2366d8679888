"""Thread counts of the numeric libraries, set for the length of a block.

Two reasons to pin them: speed (torch's thread team spinning beside BLAS's on the same cores slowed the
NormSim products by 20-30 % on 2 cores) and reproducibility (OpenBLAS sgemm rounding depends on its thread
count, and Ray starts workers with OMP_NUM_THREADS=1, so a map task pins the driver's count to give the
driver's bits).
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def torch_threads(count: int | None):
    """torch's intra-op CPU threads set to `count` inside the block (None or 0: unchanged)."""
    if not count:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def blas_thread_count() -> int | None:
    """Threads of the BLAS numpy uses (threadpoolctl), or None when no BLAS library is found."""
    from threadpoolctl import threadpool_info

    counts = [lib["num_threads"] for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts) if counts else None


@contextlib.contextmanager
def blas_threads(count: int | None):
    """The BLAS libraries with `count` threads inside the block (None or 0: unchanged)."""
    if not count:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(count), user_api="blas"):
        yield
