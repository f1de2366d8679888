"""What NormSim's in-process path, its map tasks and its 2-D rounds share: the image column in blocks (from the fp16
cache or the tables, the same blocks either way), the scorers and the threads that run them, the target, and the
runs of whole tables that map tasks take."""

from __future__ import annotations

import bisect
import contextlib
import functools
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from curate.errors import CurateError
from curate.io.prefetch import prefetch
from curate.io.tables import (READ_BATCH_ROWS, EmbeddingPool, column_to_numpy, open_table, require_columns,
                               to_float32)
from curate.io.targets import IMAGENET_TEXT
from curate.models.teacher import resolve_device
from curate.run.threads import blas_threads, torch_threads
from curate.stages.common import PoolRows, check_finite
from curate.stages.normsim import NormsimConfig
from curate.stages.normsim.targets import normsim_target
from curate.metrics import normsim as ns

def target_and_device(pool: EmbeddingPool, cfg: NormsimConfig, info: dict):
    """(target (M, D) float32, torch device or None) of a checked p = inf or 2 config; records the target's kind,
    source, rows and digest (and the templates of imagenet-text) in `info`."""
    # torch (and a device) only where needed: the exact p=inf product and embedding the imagenet-text prompts.
    needs_device = (cfg.p == "inf" and cfg.index == "flat") or str(cfg.target) == IMAGENET_TEXT
    torch_device = resolve_device(cfg.device) if needs_device else None
    target = normsim_target(cfg.target, pool.teacher, device=str(torch_device or "cpu"), cache_dir=cfg.cache_dir,
                            templates=cfg.templates)
    info.update({"target": str(cfg.target), **target.meta()})
    if target.format == IMAGENET_TEXT:
        info["templates"] = cfg.templates
    return target.matrix, torch_device


def _ivf_sizes(target_rows: int, nlist: int | None, nprobe: int | None) -> tuple[int, int]:
    """The nlist and nprobe `build_ivf_index` uses for these options, without training it."""

    nlist = ns.default_nlist(target_rows) if nlist is None else int(nlist)
    if not 1 <= nlist <= 2 * target_rows:
        raise CurateError(f"--index ivf: nlist must be between 1 and 2·M = {2 * target_rows}, got {nlist}")
    nprobe = ns.default_nprobe(nlist) if nprobe is None else int(min(max(1, nprobe), nlist))
    return nlist, nprobe


def scorer_params(p: str, index: str, target_rows: int, dim: int, torch_device, nlist, nprobe) -> dict:
    """The metadata of the scoring route: index and device (inf), nlist/nprobe (ivf) or route (2)."""
    if p == "inf" and index == "flat":
        return {"index": "flat", "device": torch_device.type}
    if p == "inf":
        nlist, nprobe = _ivf_sizes(target_rows, nlist, nprobe)
        return {"index": "ivf", "nlist": nlist, "nprobe": nprobe}
    # Σ_x <v,x>² straight from V Xᵀ costs M < D products per row
    return {"route": "direct" if target_rows < dim else "second moment"}


def scorer(p: str, index: str, target: np.ndarray, torch_device, dim: int, nlist=None, nprobe=None,
           faiss_index=None) -> Callable[[np.ndarray], np.ndarray]:
    """(n, D) float32 rows -> (n,) float32 NormSim_p against `target`; `faiss_index` reuses a built ivf index."""

    if p == "inf" and index == "flat":
        import torch

        return ns.MaxAbsInnerProduct(torch.from_numpy(target).to(torch_device))
    if p == "inf":
        if faiss_index is None:
            try:
                faiss_index = ns.build_ivf_index(target, nlist, nprobe)
            except ValueError as exc:
                raise CurateError(f"--index ivf: {exc}") from None
        return lambda rows: ns.normsim_inf(rows, faiss_index)
    if len(target) < dim:
        return lambda rows: ns.normsim_2_direct(rows, target)
    return ns.QuadraticForm(ns.second_moment(target))


CPU_BLOCK_ROWS = 1024  # CPU products: cache-resident blocks, and a short tail when one thread finishes last


def _cpu_products(p: str, index: str, device_type: str | None) -> bool:
    """Whether the scorer is a numpy product on the CPU (safe to call from several threads), not FAISS IVF
    (which runs its own OpenMP threads) or torch on a GPU."""
    return p == "2" or (index == "flat" and device_type == "cpu")


def block_rows_for(p: str, params: dict) -> int:
    """Rows per block for the scoring route `params` (`scorer_params`); a row's bits depend on it."""
    return CPU_BLOCK_ROWS if _cpu_products(p, params.get("index", "flat"), params.get("device")) else READ_BATCH_ROWS


def score_threads(p: str, index: str, device_type: str | None, cpu_threads: int | None) -> int | None:
    """Worker threads for `score_rows`: `cpu_threads` (BLAS's count) for the CPU products, else None."""
    return max(1, int(cpu_threads or 1)) if _cpu_products(p, index, device_type) else None


def score_rows(pool: EmbeddingPool, score_chunk, memmap_dir, start: int, stop: int, block_rows: int,
               progress: Callable[[int], None] | None = None, threads: int | None = None,
               pending: bool = False) -> "np.ndarray | ScoringThreads":
    """NormSim of pool rows start..stop-1, block by block (`_half_blocks`), float32.

    `threads` (a CPU scorer that can be called from several threads): `ScoringThreads` with that many
    workers, returned still running when `pending` (slicing it waits for the rows asked for), else its
    finished scores. None: blocks read ahead by one thread for a scorer that runs its own threads (FAISS,
    the GPU).
    """
    blocks = _half_blocks(pool, memmap_dir, start, stop, block_rows)
    if threads is not None:
        scoring = ScoringThreads(blocks, score_chunk, start, stop, pool.dim, block_rows, threads, progress)
        if pending:
            return scoring
        with scoring:
            return scoring.result()
    scores = np.empty(stop - start, dtype=np.float32)
    row = 0
    with torch_threads(1), blocks as half_blocks:
        for rows in prefetch(_float32_blocks(half_blocks, pool.dim, block_rows)):
            scores[row:row + len(rows)] = score_chunk(rows)
            row += len(rows)
            if progress:
                progress(len(rows))
    return scores


class ScoringThreads:
    """Scores of pool rows start..stop-1 computed by worker threads, each taking the next block, reading and
    converting it and scoring it with single-threaded BLAS.

    On 2 cores this beats one 2-thread BLAS fed by a read-ahead thread by ~10 %: BLAS splits each product
    evenly between its threads, so any other work on a core (reading, fp16 conversion, the per-row max)
    stalls both, where whole blocks per thread balance themselves. A block's bits do not depend on the
    thread count (one BLAS thread each time). Slicing waits until the rows asked for are scored, so the
    score table's first row groups are written while later blocks are scored. Use as a context manager:
    leaving it stops the workers (after their current block) and restores the thread settings.
    """

    def __init__(self, blocks: contextlib.AbstractContextManager, score_chunk, start: int, stop: int, dim: int,
                 block_rows: int, threads: int, progress: Callable[[int], None] | None = None):
        """`blocks`: `_half_blocks(...)`, entered here and left when the workers are done."""
        self.scores = np.empty(stop - start, dtype=np.float32)
        self.start = start
        self._score_chunk, self._progress = score_chunk, progress
        self._changed = threading.Condition()  # guards everything below and the generator `blocks`
        self._ends: list[int | None] = []  # per block handed out: its end (relative row) once scored
        self._prefix = 0  # blocks scored in a row from the first
        self._error: BaseException | None = None
        self._stop = False
        self._settings = contextlib.ExitStack()  # left in reverse: thread settings, then the block source
        self._blocks = self._settings.enter_context(blocks)
        self._settings.enter_context(torch_threads(1))
        self._settings.enter_context(blas_threads(1))
        self._workers = ThreadPoolExecutor(threads, thread_name_prefix="curate-normsim")
        self._running = [self._workers.submit(self._work, dim, block_rows) for _ in range(threads)]

    def _work(self, dim: int, block_rows: int) -> None:
        half = np.empty((block_rows, dim), dtype=np.float16)
        full = np.empty((block_rows, dim), dtype=np.float32)
        try:
            while True:
                with self._changed:  # the generator advances under the lock; a cache read runs outside it
                    if self._stop or self._error is not None:
                        return
                    row, read = next(self._blocks, (None, None))
                    if read is None:
                        return
                    number = len(self._ends)
                    self._ends.append(None)
                rows = to_float32(read(half), out=full)
                first = row - self.start
                self.scores[first:first + len(rows)] = self._score_chunk(rows)
                with self._changed:
                    self._ends[number] = first + len(rows)
                    while self._prefix < len(self._ends) and self._ends[self._prefix] is not None:
                        self._prefix += 1
                    self._changed.notify_all()
                    if self._progress:
                        self._progress(len(rows))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread by _wait_for
            with self._changed:
                self._error = self._error or exc
                self._changed.notify_all()

    def _wait_for(self, rows: int) -> None:
        """Block until the first `rows` rows are scored (or all workers stopped); a worker's error is raised."""
        with self._changed:
            while (self._error is None and (self._ends[self._prefix - 1] if self._prefix else 0) < rows
                   and not all(done.done() for done in self._running)):
                self._changed.wait(timeout=1.0)  # the timeout also notices workers that returned
            if self._error is not None:
                raise self._error

    def __len__(self) -> int:
        return len(self.scores)

    def __getitem__(self, index: slice) -> np.ndarray:
        self._wait_for(range(len(self.scores))[index].stop if isinstance(index, slice) else len(self.scores))
        return self.scores[index]

    def result(self) -> np.ndarray:
        """All the scores, once every worker is done."""
        for done in self._running:
            done.result()
        self._wait_for(len(self.scores))
        return self.scores

    def __enter__(self) -> "ScoringThreads":
        return self

    def __exit__(self, *exc_info) -> None:
        with self._changed:
            self._stop = True
        self._workers.shutdown(wait=True)
        self._settings.close()


def image_source(pool: EmbeddingPool, memmap_dir: str | Path | None) -> str:
    """'cache' when this pool version's fp16 image cache exists in `memmap_dir`, else 'tables'."""
    if memmap_dir is not None and pool.cache_file("image_embedding", memmap_dir).exists():
        return "cache"
    return "tables"


def table_starts(pool: EmbeddingPool) -> list[int]:
    """Pool row of each table's first row, and N: blocks never cross these, so map tasks cut only here."""
    return [0] + np.cumsum(pool.file_rows, dtype=np.int64).tolist()


@contextlib.contextmanager
def _half_blocks(pool: EmbeddingPool, memmap_dir: str | Path | None, start: int = 0, stop: int | None = None,
                 block_rows: int | None = None, source: str | None = None) -> Iterator[Iterator[tuple[int, Callable]]]:
    """A context giving the image embeddings of pool rows start..stop-1 in blocks in pool order, as
    (first pool row, read): `read(out)` returns the block as fp16 rows, checked (finite, non-zero), in `out`
    (a (block_rows, D) float16 buffer) or in an array of its own, until the context is left. `start` and
    `stop` must be table starts (`table_starts`).

    From the fp16 `.npy` cache when one for this pool version exists in `memmap_dir` (the stage builds it
    first; `curate score` builds the same one): positional reads, done by `read` itself (so several threads
    can read at once), far cheaper than decoding Parquet lists. Otherwise (no cache directory, as in
    `curate filter --normsim`) streamed from the tables, decoded as the iterator advances.
    Both sources give the same blocks (per table, `block_rows` each): a BLAS product's rounding can depend
    on the block's row count, and both sources, and map tasks over any span of tables, must give the
    one-process bytes.
    """
    block_rows = int(block_rows or READ_BATCH_ROWS)
    stop = pool.n_rows if stop is None else int(stop)
    source = source or image_source(pool, memmap_dir)
    spans = [(index, first) for index, first in enumerate(table_starts(pool)[:-1]) if start <= first < stop]
    column = "image_embedding"

    def from_tables() -> Iterator[tuple[int, Callable]]:
        for index, first in spans:
            parquet = open_table(pool.files[index])
            require_columns(pool.files[index], parquet.schema_arrow, [column])
            row = first
            for batch in parquet.iter_batches(batch_size=block_rows, columns=[column], use_threads=False):
                half = column_to_numpy(batch.column(column), np.float16, pool.files[index])
                yield row, functools.partial(_checked, pool, half, row, column)
                row += len(half)

    def from_cache(rows: PoolRows) -> Iterator[tuple[int, Callable]]:
        for index, first in spans:
            n = pool.file_rows[index]
            for offset in range(0, n, block_rows):
                block = slice(first + offset, first + min(offset + block_rows, n))
                yield first + offset, functools.partial(rows.read, block)

    if source != "cache":
        yield from_tables()
        return
    rows = PoolRows(pool, column, memmap_dir)  # PoolRows checks every read
    try:
        yield from_cache(rows)
    finally:
        rows.close()


def _checked(pool: EmbeddingPool, rows: np.ndarray, first_row: int, column: str, out=None) -> np.ndarray:
    """`rows` once check_finite passed (`out` unused: the rows are already in memory)."""
    check_finite(pool, rows, first_row, column)
    return rows


def _float32_blocks(blocks: Iterator[tuple[int, Callable]], dim: int, block_rows: int) -> Iterator[np.ndarray]:
    """The blocks of `_half_blocks` as float32, converted into a ring of 3 reused buffers (the caller's block,
    the next one, the one being read ahead by `prefetch`): a block is valid until the caller asks for the
    block after the next."""
    half = np.empty((block_rows, dim), dtype=np.float16)
    ring = [np.empty((block_rows, dim), dtype=np.float32) for _ in range(3)]
    for number, (_, read) in enumerate(blocks):
        yield to_float32(read(half), out=ring[number % 3])


def image_blocks(pool: EmbeddingPool, memmap_dir: str | Path | None, start: int = 0, stop: int | None = None,
                 block_rows: int | None = None, needed: np.ndarray | None = None
                 ) -> Iterator[tuple[int, int, np.ndarray | None]]:
    """(first pool row, end row, float32 rows) for the blocks of `_half_blocks`, the rows valid until the block
    after the next is asked for (a ring of 3 buffers, as `_float32_blocks`). `needed` (a bool per row
    start..stop-1): only a block's needed rows, in order, are converted (and a block without one is not read
    from the cache, its rows None)."""
    block_rows = int(block_rows or READ_BATCH_ROWS)
    stop = pool.n_rows if stop is None else int(stop)
    ends = table_starts(pool)[1:]
    half = np.empty((block_rows, pool.dim), dtype=np.float16)
    ring = [np.empty((block_rows, pool.dim), dtype=np.float32) for _ in range(3)]
    number = 0
    with _half_blocks(pool, memmap_dir, start, stop, block_rows) as blocks:
        for first, read in blocks:
            end = min(first + block_rows, ends[bisect.bisect_right(ends, first)])  # blocks end at tables
            wanted = None if needed is None else needed[first - start:end - start]
            if wanted is not None and not wanted.any():
                yield first, end, None
                continue
            rows = read(half)
            yield first, end, to_float32(rows if wanted is None or wanted.all() else rows[wanted], out=ring[number % 3])
            number += 1


def table_spans(pool: EmbeddingPool, count: int) -> list[tuple[int, int]]:
    """min(count, tables) contiguous row spans, each a run of whole tables (what map tasks take)."""
    bounds = table_starts(pool)
    units = len(bounds) - 1
    count = max(1, min(int(count), units))
    cuts = [bounds[(index * units) // count] for index in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))
