"""`curate normsim`: NormSim_∞ / NormSim_2 / NormSim_2-D of a pool's image embeddings -> Parquet table.

Passes over the pool:
* p = inf and p = 2: one streaming pass in bounded blocks (per table, CPU_BLOCK_ROWS each for the CPU
  products, which worker threads share out, READ_BATCH_ROWS on the GPU and for IVF), from the pool's fp16
  `.npy` image cache (built first when `curate score` has not built it already in the cache directory).
  The target is small: for inf the (M, D) matrix on the device (exact, tiled V Xᵀ with a max-|.| reduction)
  or a FAISS IVF index over ±X (`--index ivf`); for 2 the D×D second moment.
  The scores are per row, so distributed (--rank/--world-size or a Slurm array, --executor, --workers,
  --tasks) the pool is cut into T runs of whole tables (map tasks, curate.run.mapreduce): each writes its
  float32 scores to `<out>.parts/normsim_<p>-<layout hash>/tNNNNN.npy`, then a marker; the reduce is a
  concatenation. Tasks read the same blocks as one process (the CPU products run one BLAS thread per
  block, whatever the thread count; the rest runs BLAS with the driver's count, as OpenBLAS rounds
  differently with other counts), against the target (and ivf index) the first rank stored in the parts
  directory, so the table is byte-identical to a one-process run.
* p = 2d: the pool is its own target, as the reference's VAS-D loop runs it (curate.metrics.normsim.normsim_2d):
  T iterations (default 100) remove equal chunks of the lowest scores from S_0 (the --prefilter subset or the
  pool) down to ⌈F·N⌉, each scored against the second moment of a seeded 10 % subsample of the current subset.
  It reads the image column twice per iteration (from the fp16 cache, built first), always as one driver
  running rounds of map tasks over runs of whole tables (curate/stages/normsim_2d.py): partial moments summed
  in task order, scores and levels written as parts, each cut by an exact radix select over them. In process
  by default, in worker processes or on Ray under --workers/--executor, with the same bytes; a rank split
  (--rank/--world-size, Slurm) is refused.
Output: `uid` + `normsim_inf` | `normsim_2` | `normsim_2d` (float32), one row group per input table.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.prefetch import prefetch
from curate.io.tables import (READ_BATCH_ROWS, EmbeddingPool, require_columns, column_to_numpy, open_table,
                               to_float32)
from curate.run.mapreduce import (DEFAULT_TASKS, PoolSpanTask, check_task_options, layout_parts_dir,
                                  open_task_output, parts_root, parts_started, pool_source, remove_parts, start_map,
                                  remove_single_driver_parts, task_file, wants_tasks, write_once)
from curate.run.markers import Markers
from curate.run.threads import blas_thread_count, blas_threads, torch_threads
from curate.models.teacher import resolve_device
from curate.stages.common import PoolRows, check_finite, pool_cache_dir, write_score_table

P_VALUES = ("inf", "2", "2d")
INDEX_KINDS = ("flat", "ivf")
SCHEDULE_OPTIONS = "--iterations, --final-fraction, --subsample, --seed and --prefilter"


def parse_p(p) -> str:
    """'inf' | '2' | '2d' (also accepts 2, float('inf'), '∞')."""
    text = str(p).strip().lower()
    text = {"∞": "inf", "infinity": "inf", "2.0": "2", "2-d": "2d"}.get(text, text)
    if text not in P_VALUES:
        raise CurateError(f"--p must be one of inf, 2, 2d, got {p!r}")
    return text


def column_name(p: str) -> str:
    return f"normsim_{parse_p(p)}"


def _check_options(p: str, target_spec, index: str, schedule=None) -> None:
    """`schedule`: the NormSim_2-D options (Normsim2dOptions), checked with p = 2d, refused with another p."""
    if p == "2d":
        if target_spec not in (None, "none"):
            raise CurateError(f"--p 2d uses the pool itself as target; pass --target none (got {target_spec!r})")
        if schedule is not None:
            schedule.check()
    elif schedule is not None:
        raise CurateError(f"{SCHEDULE_OPTIONS} set NormSim_2-D's schedule: use them with --p 2d, not --p {p}")
    elif target_spec in (None, "none"):
        raise CurateError(f"--p {p} needs a target: an embedding directory, a .npy/.pt/.parquet matrix, or "
                          "imagenet-text (only --p 2d works without one)")
    if index not in INDEX_KINDS:
        raise CurateError(f"--index must be flat or ivf, got {index!r}")


def normsim_scores(pool: EmbeddingPool, target_spec, p, index: str = "flat", nlist: int | None = None,
                   nprobe: int | None = None, schedule=None, device: str = "auto",
                   cache_dir: str | Path | None = None, templates: str = "openai",
                   progress: Callable[[int], None] | None = None, info: dict | None = None,
                   memmap_dir: str | Path | None = None, pending: bool = False) -> "np.ndarray | ScoringThreads":
    """NormSim_p of every pool row against `target_spec`, float32 in pool order (for `curate filter` too);
    for p = 2d the `normsim_2d_column` values of the schedule `schedule` (Normsim2dOptions, None: defaults).

    `cache_dir`: where the imagenet-text target is cached (default ~/.cache/curate or $CURATE_CACHE).
    `memmap_dir`: where p=2d keeps the pool's fp16 cache and its round files (default: cache_dir, else
    `<pool dir>/.curate-cache`).
    `info`, when given, receives what was used (target rows and hash, index parameters) for metadata.
    `pending`: may return a `ScoringThreads` still running (see `_score_rows`).
    """
    p = parse_p(p)
    _check_options(p, target_spec, index, schedule)
    info = {} if info is None else info
    n = pool.n_rows
    if n == 0:
        raise CurateError(f"{pool.files[0].parent}: the pool has no rows; nothing to score")
    if p == "2d":
        import tempfile


        memmap_dir = Path(memmap_dir or cache_dir or pool.files[0].parent / ".curate-cache")
        memmap_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=".normsim_2d-", dir=memmap_dir))  # no `out` here to put parts beside
        try:
            parts, _ = _normsim_2d(pool, pool.files, memmap_dir, root, schedule, info)
            scores = parts.to_array()
        finally:
            remove_parts(root)
        if progress:
            progress(n)
        return scores

    target, torch_device = _load_target(pool, target_spec, p, index, device, cache_dir, templates, info)
    params = _scorer_params(p, index, len(target), pool.dim, torch_device, nlist, nprobe)
    info.update(params)
    score_chunk = _scorer(p, index, target, torch_device, pool.dim, nlist=nlist, nprobe=nprobe)
    threads = _score_threads(p, index, torch_device and torch_device.type, blas_thread_count())
    return _score_rows(pool, score_chunk, memmap_dir, 0, n, _block_rows(p, params), progress, threads, pending)


def _normsim_2d(pool: EmbeddingPool, emb_dir, memmap_dir, root, schedule, info: dict, **options):
    """NormSim_2-D by the rounds of curate/stages/normsim_2d.py (every mode runs them, for the same bits);
    records the schedule, the sizes |S_0..S_T| and the subsample sizes in `info`."""
    from curate.stages.normsim_2d import Normsim2dOptions, normsim_2d_rounds

    schedule = (schedule or Normsim2dOptions()).check()
    pool.matrix("image_embedding", memmap_dir)  # the fp16 cache: 2T passes read it instead of decoding Parquet
    parts, ran = normsim_2d_rounds(pool, emb_dir, memmap_dir, root, schedule, block_rows=READ_BATCH_ROWS,
                                   **options)
    info.update({"target": "none", "schedule": "nested", **schedule.describe(), "kept_rows": ran["kept_rows"],
                 "subsample_rows": ran["subsample_rows"],
                 "column": "level + min(s, 1)/2: level 0 removed by the pre-filter, i+1 removed in iteration i, "
                           "T+1 kept; s = sqrt(v'Cv) with C the mean x x' of the last subsample it was scored on"})
    if schedule.prefilter:
        info["prefilter_uids"] = ran["prefilter_uids"]
    return parts, ran


def _load_target(pool: EmbeddingPool, target_spec, p: str, index: str, device: str, cache_dir, templates: str,
                 info: dict):
    """(target (M, D) float32, torch device or None); records the target's kind, source, rows and digest (and
    the templates of imagenet-text) in `info`."""
    from curate.io.targets import IMAGENET_TEXT, open_target

    # torch (and a device) only where needed: the exact p=inf product and embedding the imagenet-text prompts.
    needs_device = (p == "inf" and index == "flat") or str(target_spec) == IMAGENET_TEXT
    torch_device = resolve_device(device) if needs_device else None
    target = open_target(target_spec, pool.teacher, device=str(torch_device or "cpu"), cache_dir=cache_dir,
                         templates=templates)
    info.update({"target": str(target_spec), **target.meta()})
    if target.format == IMAGENET_TEXT:
        info["templates"] = templates
    return target.matrix, torch_device


def _target_sha256(target: np.ndarray) -> str:
    from curate.io.targets import matrix_digest

    return matrix_digest(target)


def _ivf_sizes(target_rows: int, nlist: int | None, nprobe: int | None) -> tuple[int, int]:
    """The nlist and nprobe `build_ivf_index` uses for these options, without training it."""
    from curate.metrics import normsim as ns

    nlist = ns.default_nlist(target_rows) if nlist is None else int(nlist)
    if not 1 <= nlist <= 2 * target_rows:
        raise CurateError(f"--index ivf: nlist must be between 1 and 2·M = {2 * target_rows}, got {nlist}")
    nprobe = ns.default_nprobe(nlist) if nprobe is None else int(min(max(1, nprobe), nlist))
    return nlist, nprobe


def _scorer_params(p: str, index: str, target_rows: int, dim: int, torch_device, nlist, nprobe) -> dict:
    """The metadata of the scoring route: index and device (inf), nlist/nprobe (ivf) or route (2)."""
    if p == "inf" and index == "flat":
        return {"index": "flat", "device": torch_device.type}
    if p == "inf":
        nlist, nprobe = _ivf_sizes(target_rows, nlist, nprobe)
        return {"index": "ivf", "nlist": nlist, "nprobe": nprobe}
    # Σ_x <v,x>² straight from V Xᵀ costs M < D products per row
    return {"route": "direct" if target_rows < dim else "second moment"}


def _scorer(p: str, index: str, target: np.ndarray, torch_device, dim: int, nlist=None, nprobe=None,
            faiss_index=None) -> Callable[[np.ndarray], np.ndarray]:
    """(n, D) float32 rows -> (n,) float32 NormSim_p against `target`; `faiss_index` reuses a built ivf index."""
    from curate.metrics import normsim as ns

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


def _block_rows(p: str, params: dict) -> int:
    """Rows per block for the scoring route `params` (`_scorer_params`); a row's bits depend on it."""
    return CPU_BLOCK_ROWS if _cpu_products(p, params.get("index", "flat"), params.get("device")) else READ_BATCH_ROWS


def _score_threads(p: str, index: str, device_type: str | None, cpu_threads: int | None) -> int | None:
    """Worker threads for `_score_rows`: `cpu_threads` (BLAS's count) for the CPU products, else None."""
    return max(1, int(cpu_threads or 1)) if _cpu_products(p, index, device_type) else None


def _score_rows(pool: EmbeddingPool, score_chunk, memmap_dir, start: int, stop: int, block_rows: int,
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


# ---------------------------------------------------------------- p = inf and 2 as map tasks + a reduce

NORMSIM_STAGE = "normsim"


@dataclass
class NormsimLayout:
    """Everything that fixes the map outputs; its hash names the parts directory `normsim_<p>-<hash>`."""

    fingerprint: str
    n_rows: int
    dim: int
    p: str
    target_sha256: str
    target_rows: int
    index: str
    nlist: int | None
    nprobe: int | None
    block_rows: int
    tasks: int
    numpy: str
    faiss: str  # ivf only: the index is faiss's


@dataclass
class NormsimTask(PoolSpanTask):
    """Map task: NormSim of pool rows start..stop-1 (whole tables) into `<parts>/<name>.npy`."""

    p: str
    index: str
    nprobe: int | None
    target_sha256: str
    block_rows: int
    device: str
    blas_threads: int  # the BLAS thread count of the run's driver, which a row's bits depend on (0: leave)


def normsim_layout(pool: EmbeddingPool, p: str, params: dict, block_rows: int, tasks: int | None) -> NormsimLayout:
    faiss_version = ""
    if params.get("index") == "ivf":
        import faiss

        faiss_version = faiss.__version__
    return NormsimLayout(pool.fingerprint(), pool.n_rows, pool.dim, p, params["target_sha256"],
                         params["target_rows"], params.get("index", "flat"), params.get("nlist"),
                         params.get("nprobe"), int(block_rows), int(tasks or DEFAULT_TASKS), np.__version__,
                         faiss_version)


def normsim_task_spans(pool: EmbeddingPool, layout: NormsimLayout) -> list[tuple[int, int]]:
    """min(T, tables) contiguous row spans, each a run of whole tables."""
    bounds = table_starts(pool)
    units = len(bounds) - 1
    count = max(1, min(layout.tasks, units))
    cuts = [bounds[(index * units) // count] for index in range(count + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


TARGET_FILE = "_target.npy"  # beside the tNNNNN.npy outputs, never matched by t*.npy
IVF_FILE = "_ivf.faiss"

# One pool and scorer per process: a worker (spawned or Ray) running several tasks loads the target once.
_TASK_STATE: dict[tuple, tuple[EmbeddingPool, Callable]] = {}


def _task_state(task: NormsimTask) -> tuple[EmbeddingPool, Callable]:
    key = (str(task.emb_dir), task.fingerprint, task.parts_dir, task.device)
    if key not in _TASK_STATE:
        pool = task.open_pool("normsim")
        target_path = Path(task.parts_dir) / TARGET_FILE
        target = np.load(target_path)
        if _target_sha256(target) != task.target_sha256:
            raise CurateError(f"{target_path}: holds another target than this run's (sha256 "
                              f"{_target_sha256(target)}, expected {task.target_sha256}); delete it and rerun")
        faiss_index = None
        if task.p == "inf" and task.index == "ivf":
            import faiss

            faiss_index = faiss.read_index(str(Path(task.parts_dir) / IVF_FILE))
            faiss_index.nprobe = int(task.nprobe)
        device = None
        if task.p == "inf" and task.index == "flat":
            import torch

            device = torch.device(task.device)
        _TASK_STATE.clear()
        _TASK_STATE[key] = (pool, _scorer(task.p, task.index, target, device, pool.dim, faiss_index=faiss_index))
    return _TASK_STATE[key]


def normsim_map_task(task: NormsimTask, progress: Callable[[int], None] | None = None) -> dict:
    """Score one span into `<parts>/<name>.npy` (float32, pool order), then mark it."""
    markers = Markers(task.parts_dir, NORMSIM_STAGE)
    if markers.is_done(task.name):  # another rank or an earlier attempt finished it
        return {"task": task.name, "ran": False}
    started = time.perf_counter()
    with blas_threads(task.blas_threads):  # the scorer (e.g. the second moment) is BLAS too
        pool, score_chunk = _task_state(task)
        # the cache when this process finds it, else the tables: the same blocks, the same bytes
        threads = _score_threads(task.p, task.index, task.device.split(":")[0], task.blas_threads or blas_thread_count())
        scores = _score_rows(pool, score_chunk, task.cache_dir, task.start, task.stop, task.block_rows,
                             progress, threads)
    with atomic_path(task_file(task.parts_dir, task.name)) as tmp, open(tmp, "wb") as f:
        np.save(f, scores)
    device = task.device.split(":")[0]  # the device type, as the one-process metadata records it
    markers.mark(task.name, {"device": device, "rows": task.stop - task.start, "start": task.start,
                             "stop": task.stop, "seconds": round(time.perf_counter() - started, 3)})
    return {"task": task.name, "ran": True}


def _plan(pool: EmbeddingPool, target_spec, p: str, out, memmap_dir, index: str, nlist, nprobe, device: str,
          cache_dir, templates: str, tasks: int | None):
    """(layout, parts dir, target, torch device, params) of a map-task run with these options."""
    params: dict = {}
    target, torch_device = _load_target(pool, target_spec, p, index, device, cache_dir, templates, params)
    params.update(_scorer_params(p, index, len(target), pool.dim, torch_device, nlist, nprobe))
    layout = normsim_layout(pool, p, params, _block_rows(p, params), tasks)
    return layout, layout_parts_dir(out, f"normsim_{p}", layout), target, torch_device, params


def normsim_distributed(pool: EmbeddingPool, emb_dir, target_spec, p: str, out, memmap_dir, index: str = "flat",
                        nlist: int | None = None, nprobe: int | None = None, device: str = "auto",
                        cache_dir=None, templates: str = "openai", executor: str = "local", workers: int = 1,
                        ray_address: str | None = None, rank: int | None = None, world_size: int | None = None,
                        retries: int = 1, tasks: int | None = None,
                        progress: Callable[[int], None] | None = None) -> tuple[np.ndarray | None, dict, dict]:
    """Run this rank's unmarked map tasks, then the reduce if every task is done.

    Returns (scores in pool order or None while tasks are missing, params for the metadata, task info).
    The target (and the ivf index) go to the parts directory once, first writer wins, and every task
    scores against those bytes, so ranks never disagree on them.
    """
    layout, parts_dir, target, torch_device, params = _plan(pool, target_spec, p, out, memmap_dir, index, nlist,
                                                            nprobe, device, cache_dir, templates, tasks)
    spans = normsim_task_spans(pool, layout)
    job = start_map(parts_dir, layout, NORMSIM_STAGE, len(spans), executor, workers, rank, world_size)

    def save_target(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, target)

    if job.todo:
        write_once(parts_dir / TARGET_FILE, save_target)
    if job.todo and p == "inf" and index == "ivf":
        import faiss

        write_once(parts_dir / IVF_FILE, lambda tmp: faiss.write_index(
            _ivf_index(target, layout.nlist, layout.nprobe), str(tmp)))
    flat = p == "inf" and index == "flat"
    source = pool_source(emb_dir)
    device_name = str(torch_device) if flat else "cpu"
    threads = blas_thread_count() or 0
    task_list = [NormsimTask(job.names[i], spans[i][0], spans[i][1], source, str(memmap_dir), layout.fingerprint,
                             str(parts_dir), p, index, layout.nprobe, layout.target_sha256, layout.block_rows,
                             device_name, threads)
                 for i in job.todo]
    try:
        report = job.run(task_list, normsim_map_task, lambda t: normsim_map_task(t, progress),
                         ray_address=ray_address, retries=retries,
                         num_gpus=1.0 if flat and torch_device.type == "cuda" else 0.0,
                         label=f"normsim {p} (map tasks)")
    finally:
        _TASK_STATE.clear()  # in process: do not keep the target (maybe on the GPU) after the run
    info = job.summary(report)
    if not info["reduced"]:
        return None, params, info
    if flat:  # the devices the map tasks ran on (equal to an in-process run's when they agree)
        params["device"] = info["device"]
    scores = np.empty(pool.n_rows, dtype=np.float32)
    for name, (start, stop) in zip(job.names, spans):
        with open_task_output(parts_dir, NORMSIM_STAGE, name, stop - start) as f:
            scores[start:stop] = np.fromfile(f, np.float32, stop - start)
    return scores, params, info


def _ivf_index(target: np.ndarray, nlist: int, nprobe: int):
    from curate.metrics import normsim as ns

    return ns.build_ivf_index(target, nlist, nprobe)


# ---------------------------------------------------------------- the stage

def normsim(emb_dir: str | Path, target: str | None, p, out: str | Path, index: str = "flat",
            nlist: int | None = None, nprobe: int | None = None, iterations: int | None = None,
            final_fraction: float | None = None, device: str = "auto",
            cache_dir: str | Path | None = None, templates: str = "openai",
            progress: Callable[[int], None] | None = None, *, subsample: float | None = None,
            seed: int | None = None, prefilter: str | Path | None = None, executor: str = "local",
            workers: int = 1, ray_address: str | None = None, rank: int | None = None,
            world_size: int | None = None, retries: int = 1, tasks: int | None = None) -> dict:
    """Compute one NormSim column for the pool in `emb_dir` and write `out`; returns a summary.

    iterations, final_fraction, subsample, seed, prefilter: NormSim_2-D's schedule (curate/stages/normsim_2d.py
    `Normsim2dOptions`; None: its default), refused with p = inf or 2.

    p = inf and 2 run as map tasks (curate.run.mapreduce) when any of executor/workers/rank/world_size/tasks
    (or a Slurm array) asks for them, or finished tasks of the same layout lie beside `out`; `out` is None
    in the summary while other ranks' tasks are missing, and `normsim_tasks` says how many. p = 2d is always
    one driver running rounds of map tasks (curate/stages/normsim_2d.py; `normsim_2d_tasks` says what ran),
    in this process unless executor/workers say otherwise; a rank split (rank/world_size, Slurm) is an error.
    """
    from curate.stages.normsim_2d import options_from

    started = time.perf_counter()
    p = parse_p(p)
    given = [iterations, final_fraction, subsample, seed, prefilter]
    schedule = options_from(*given) if p == "2d" or any(v is not None for v in given) else None
    check_task_options(workers, tasks, retries)
    pool = EmbeddingPool(emb_dir)
    if hasattr(progress, "set_total"):
        progress.set_total(pool.n_rows)
    memmap_dir = pool_cache_dir(out, cache_dir)
    summary: dict = {}
    if p == "2d" and (rank is not None or world_size is not None or "SLURM_ARRAY_TASK_ID" in os.environ):
        raise CurateError("--p 2d cannot be split into ranks: each of its rounds needs every map task's result, so "
                          "one driver submits them all. Leave out --rank/--world-size and run it outside a Slurm "
                          "array; --executor ray, --workers N and --tasks T spread its map tasks")
    if executor not in ("local", "ray"):
        raise CurateError(f"--executor {executor!r}: choose local or ray")
    if p == "2d":
        return _normsim_2d_stage(pool, emb_dir, target, out, memmap_dir, schedule, progress, started,
                                 executor=executor, workers=int(workers), tasks=tasks, retries=int(retries),
                                 ray_address=ray_address)
    if pool.n_rows:
        # Parquet list vectors cost ~1 µs per row to decode: the one pass reads the fp16 cache, built here once
        # (each rank builds it when missing; the writes are atomic and the bytes identical)
        pool.matrix("image_embedding", memmap_dir)
    distributed = wants_tasks(executor, workers, tasks, rank, world_size)
    if not distributed and parts_root(out).exists():
        _check_options(p, target, index, schedule)
        if pool.n_rows:  # finished tasks of this layout beside `out`: a plain rerun completes them
            _, parts_dir, *_ = _plan(pool, target, p, out, memmap_dir, index, nlist, nprobe, device, cache_dir,
                                     templates, tasks)
            distributed = parts_started(parts_dir, NORMSIM_STAGE)
    if distributed:
        _check_options(p, target, index, schedule)
        if pool.n_rows == 0:
            raise CurateError(f"{pool.files[0].parent}: the pool has no rows; nothing to score")
        scores, info, tasks_info = normsim_distributed(pool, emb_dir, target, p, out, memmap_dir, index, nlist,
                                                       nprobe, device, cache_dir, templates, executor, int(workers),
                                                       ray_address, rank, world_size, int(retries), tasks, progress)
        summary["normsim_tasks"] = tasks_info
        if scores is None:  # other ranks' tasks are still missing: whoever finishes last reduces
            seconds = time.perf_counter() - started
            return {"out": None, "rows": pool.n_rows, "column": column_name(p), "seconds": seconds,
                    "rows_per_s": pool.n_rows / seconds if seconds > 0 else float("inf"),
                    "params": {"p": p, **info}, "missing": 0, **summary}
    else:
        info = {}
        scores = normsim_scores(pool, target, p, index, nlist, nprobe, schedule, device, cache_dir, templates,
                                progress, info, memmap_dir=memmap_dir, pending=True)
    name = column_name(p)
    params = {"p": p, **info}
    meta = {"stage": "normsim", "teacher": pool.teacher.to_dict(), "source": str(emb_dir),
            "n_rows": pool.n_rows, "params": params}
    with scores if isinstance(scores, ScoringThreads) else contextlib.nullcontext():
        write_score_table(pool, {name: scores}, out, meta)  # a table's rows as soon as they are scored
        scores = scores.result() if isinstance(scores, ScoringThreads) else scores
    remove_single_driver_parts(summary.get("normsim_tasks"), out)
    seconds = time.perf_counter() - started
    return {"out": str(out), "rows": pool.n_rows, "column": name, "seconds": seconds,
            "rows_per_s": pool.n_rows / seconds if seconds > 0 else float("inf"), "params": params,
            "missing": int(np.isnan(scores).sum()), **summary}


def _normsim_2d_stage(pool: EmbeddingPool, emb_dir, target, out, memmap_dir, schedule, progress, started: float,
                      **options) -> dict:
    """`normsim` for p = 2d: the rounds with their parts in `<out>.parts/`, then the table from the parts."""
    _check_options("2d", target, "flat", schedule)
    if pool.n_rows == 0:
        raise CurateError(f"{pool.files[0].parent}: the pool has no rows; nothing to score")
    info: dict = {}
    parts, ran = _normsim_2d(pool, emb_dir, memmap_dir, parts_root(out), schedule, info, **options)
    params = {"p": "2d", **info}
    meta = {"stage": "normsim", "teacher": pool.teacher.to_dict(), "source": str(emb_dir),
            "n_rows": pool.n_rows, "params": params}
    try:
        write_score_table(pool, {column_name("2d"): parts}, out, meta)  # one table at a time from the parts
    finally:
        remove_parts(parts.parts_dir, parts_root(out))
    if progress:
        progress(pool.n_rows)
    seconds = time.perf_counter() - started
    summary = {"out": str(out), "rows": pool.n_rows, "column": column_name("2d"), "seconds": seconds,
               "rows_per_s": pool.n_rows / seconds if seconds > 0 else float("inf"), "params": params, "missing": 0,
               "normsim_2d_tasks": ran}
    if ran["executor"] != "local" or ran["workers"] > 1:
        where = "ray" if ran["executor"] == "ray" else f"{ran['workers']} worker processes"
        summary["note"] = f"{ran['map_rounds']} rounds of map tasks over {ran['tasks']} runs of tables ({where})"
    return summary
