"""`curate normsim --p 2d` as one driver running rounds of map tasks (curate.metrics.normsim.normsim_2d).

The schedule is the reference's VAS-D loop (ypwang61/negCLIPLoss_NormSim, baselines/vas2.py
`load_uids_with_vas_d_filter`): S_0 = the pre-filter's subset (or the pool), T iterations each removing an
equal chunk of the lowest scores (S_{i+1} ⊂ S_i), scored against C_i = (1/k) Σ x xᵀ over subsample i (a seeded
~10 % of S_i; of the whole pool for C_0). The pool is cut into spans of whole tables (`--tasks`, default 32,
capped by the table count; the same spans for every executor and worker count). Per task and iteration the
state is two files in the parts directory: `l<i>-tNNNNN.npy` (int16 level of each row: 0 removed by the
pre-filter, j+1 removed in iteration j, T+1 still in S_i) and `s<i>-tNNNNN.npy` (float32: each row's score in
the last iteration that scored it). Map rounds:
1. start: levels l0 from the pre-filter (uids looked up in its sorted uid file) and the float64 D×D partial
   Σ x xᵀ over subsample 0 of every row (`m0-tNNNNN.npy`); the driver adds the partials in span order into
   C_0 = sum / k (`c0.npy`).
2. score (iteration i): each task scores its rows of S_i (every row in iteration 0, so the pre-filter's
   dropped rows get an order too) with QuadraticForm(C_i) into s<i>, and returns the sparse 16-bit digit
   histogram of the order keys of S_i's scores (the other rows count as -inf).
3. select: the exact top |S_{i+1}| by radix select (curate.metrics.topk, as the distributed filter does),
   ties by lower pool index as `top_count_mask`: histogram rounds narrow the key prefix until the bucket of
   the cut holds at most `collect_rows` rows (collected whole) or one key value (one task names the tied row
   at the rank needed). A row stays when key > cut, or key == cut and row <= row cut.
4. advance: each task writes l<i+1> (the rows the cut drops get level i+1) and, unless i+1 = T, the partial
   moment over subsample i+1 of S_{i+1}, summed by the driver into C_{i+1}.
The table's column is `normsim_2d_column(l<T>, s<T-1>)`, read one table at a time by `write_score_table`.
Embedding passes: 2 per iteration (advance's moment, then score), blocks without a needed row unread from the
cache. Memory: the driver holds D×D moments, histograms and at most `collect_rows` collected rows, never N
values; a task holds its span's levels, scores and order keys (~15 bytes a row) and one block of rows.

Bits: every mode (in process, --workers, Ray, any --tasks giving the same spans) runs this code, with the
same blocks, the same float64 summation order and BLAS pinned to the driver's thread count (OpenBLAS sgemm
rounding depends on it), so the tables are byte-identical. `--rank/--world-size` are refused: each round
needs every task's result, so one driver submits them all.

Files live in `<out>.parts/normsim_2d-<layout hash>/` and are deleted after the table is written; a killed
run is rerun from the start (every task overwrites its files atomically and reads only the previous
iteration's).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from curate.config import RunOptions
from curate.errors import CurateError
from curate.io.atomic import atomic_path, sweep_stale_temps
from curate.io.prefetch import prefetch
from curate.io.tables import READ_BATCH_ROWS, EmbeddingPool
from curate.io.uids import is_sorted_unique, load_subset, sorted_unique_pairs, subset_file
from curate.metrics import topk
from curate.metrics.normsim import QuadraticForm, nested_sizes, normsim_2d_column, second_moment, subsample_mask
from curate.run.executors import executor_session
from curate.run.mapreduce import DEFAULT_TASKS, PoolSpanTask, layout_key, pool_source, remove_parts, task_names
from curate.run.threads import blas_thread_count, blas_threads
from curate.stages.normsim import Normsim2dSchedule
from curate.stages.normsim.common import image_blocks, table_spans, table_starts
from curate.io.uids import DATACOMP_DTYPE, uid_halves

STAGE = "normsim_2d"
DEFAULT_COLLECT_ROWS = 1 << 20  # (key, row) pairs (12 B each) a cut's bucket may hold to be collected whole
PREFILTER_FILE = "prefilter.npy"  # the pre-filter's uids, sorted and unique, copied into the parts directory


@dataclass
class Normsim2dLayout:
    """What fixes the round outputs; its hash names `<out>.parts/normsim_2d-<hash>`."""

    fingerprint: str
    n_rows: int
    dim: int
    iterations: int
    final_fraction: float
    subsample: float
    seed: int
    prefilter: str  # path|size|mtime of the pre-filter's uid file, "" without one
    block_rows: int
    tasks: int
    numpy: str


@dataclass
class Normsim2dTask(PoolSpanTask):
    """One map task of iteration `iteration` over pool rows start..stop-1 (whole tables).

    kind "start": levels l0 (from `prefilter`, the uid file in the parts directory, or all candidates) and
    the partial moment of subsample 0; "score": the scores of S_i against `c<i>.npy` (+ the digit histogram
    when `histogram`); "select": `query` answered over S_i's scores; "advance": levels l<i+1> from the cut
    (cut_key, cut_row) and, unless i+1 = T, the partial moment of subsample i+1 of S_{i+1}.
    """

    kind: str
    iteration: int
    iterations: int
    subsample: float
    seed: int
    block_rows: int
    blas_threads: int  # the driver's BLAS thread count, which the products' bits depend on (0: leave)
    prefilter: bool = False
    histogram: bool = True
    cut_key: int = 0
    cut_row: int = -1
    query: tuple = ()  # ("hist", prefix, bits) | ("collect", prefix, bits) | ("nth", key, rank)


def moment_file(parts_dir, i: int, name: str | None = None) -> Path:
    """The driver's C_i (`name` None) or task `name`'s partial sum of iteration i."""
    return Path(parts_dir) / (f"c{i}.npy" if name is None else f"m{i}-{name}.npy")


def level_file(parts_dir, i: int, name: str) -> Path:
    return Path(parts_dir) / f"l{i}-{name}.npy"


def score_file(parts_dir, i: int, name: str) -> Path:
    return Path(parts_dir) / f"s{i}-{name}.npy"


def load_part(path: Path, shape: tuple, dtype, mmap: bool = False) -> np.ndarray:
    """A part written by this run; anything else (gone, cut short, other shape) is a clear error."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as exc:
        raise CurateError(f"{path}: a part of this normsim --p 2d run is missing or unreadable ({exc}); "
                          "was its directory deleted or shared by two runs? Rerun the command") from None
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise CurateError(f"{path}: holds {array.shape} {array.dtype}, expected {tuple(shape)} "
                          f"{np.dtype(dtype)}; rerun the command")
    return array


def save_part(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def kept_rows(keys: np.ndarray, rows: np.ndarray, cut_key: int, cut_row: int) -> np.ndarray:
    """The rows a finished selection keeps: key > cut, or key == cut and pool row <= row cut."""
    key = keys.dtype.type(cut_key)
    return (keys > key) | ((keys == key) & (rows <= cut_row))


def selection_keys(levels: np.ndarray, scores: np.ndarray, alive_level: int) -> np.ndarray:
    """Order keys of the scores of S_i's rows (level T+1); every other row counts as -inf, below them all."""
    return topk.order_keys(np.where(levels == alive_level, scores, np.float32(-np.inf)).astype(np.float32))


# ---------------------------------------------------------------- the tasks

_POOLS: dict[tuple, EmbeddingPool] = {}  # one open pool per process: a worker runs many tasks
_FORMS: dict[str, QuadraticForm] = {}  # the iteration's C_i, loaded once per process


def _pool(task: Normsim2dTask) -> EmbeddingPool:
    key = (str(task.emb_dir), task.fingerprint)
    if key not in _POOLS:
        _POOLS.clear()
        _POOLS[key] = task.open_pool("normsim")
    return _POOLS[key]


def _form(task: Normsim2dTask, dim: int) -> QuadraticForm:
    path = moment_file(task.parts_dir, task.iteration)
    try:
        stat = path.stat()
    except OSError:
        stat = None  # load_part says what is wrong
    key = f"{path}|{stat and stat.st_mtime_ns}|{stat and stat.st_size}"  # a Ray worker outlives runs
    if key not in _FORMS:
        _FORMS.clear()
        _FORMS[key] = QuadraticForm(load_part(path, (dim, dim), np.float64))
    return _FORMS[key]


def _blocks(task: Normsim2dTask, pool: EmbeddingPool, needed: np.ndarray):
    # the cache when this process finds it, else the tables: the same blocks, the same bytes
    return prefetch(image_blocks(pool, task.cache_dir, task.start, task.stop, task.block_rows, needed))


def _levels(task: Normsim2dTask, i: int) -> np.ndarray:
    return load_part(level_file(task.parts_dir, i, task.name), (task.stop - task.start,), np.int16)


def _scores(task: Normsim2dTask, i: int) -> np.ndarray:
    return load_part(score_file(task.parts_dir, i, task.name), (task.stop - task.start,), np.float32)


def normsim_2d_task(task: Normsim2dTask) -> dict:
    """Run one map task (module level, so worker processes and Ray can unpickle it)."""
    with blas_threads(task.blas_threads):
        if task.kind == "start":
            return _start_task(task)
        if task.kind == "score":
            return _score_task(task)
        if task.kind == "advance":
            return _advance_task(task)
        return _select_task(task)


def _partial_moment(task: Normsim2dTask, pool: EmbeddingPool, members: np.ndarray, i: int) -> dict:
    """Σ x xᵀ over the rows of subsample i among `members` (one float32 product per block, added in float64)
    into m<i>; returns how many rows it summed."""
    picked = members.copy()
    for at in range(0, len(picked), 1 << 20):  # the draws' uint64 temporaries stay a few MiB
        rows = np.arange(task.start + at, min(task.start + at + (1 << 20), task.stop))
        picked[at:at + len(rows)] &= subsample_mask(rows, task.seed, i, task.subsample)
    moment = np.zeros((pool.dim, pool.dim), dtype=np.float64)
    for _, _, rows in _blocks(task, pool, picked):  # the picked rows of each block
        if rows is not None:
            second_moment(rows, moment, chunk_rows=len(rows))
    save_part(moment_file(task.parts_dir, i, task.name), moment)
    return {"sampled": int(picked.sum())}


def prefilter_members(pool: EmbeddingPool, start: int, stop: int, pairs: np.ndarray) -> np.ndarray:
    """Which pool rows start..stop-1 (whole tables) have their uid in `pairs` (sorted, unique `u8,u8`)."""


    members = []
    for file, first in zip(pool.files, table_starts(pool)[:-1]):
        if start <= first < stop:
            high, low = uid_halves(pq.read_table(file, columns=["uid"]).column("uid"), str(file))
            query = np.empty(len(high), dtype=DATACOMP_DTYPE)
            query["f0"], query["f1"] = high, low
            at = np.minimum(np.searchsorted(pairs, query), max(len(pairs) - 1, 0))
            members.append(pairs[at] == query if len(pairs) else np.zeros(len(query), bool))
    return np.concatenate(members) if members else np.zeros(0, bool)


def _start_task(task: Normsim2dTask) -> dict:
    pool = _pool(task)
    alive = task.iterations + 1
    if task.prefilter:
        pairs = np.load(Path(task.parts_dir) / PREFILTER_FILE, mmap_mode="r")  # this run's own copy
        members = prefilter_members(pool, task.start, task.stop, pairs)
    else:
        members = np.ones(task.stop - task.start, dtype=bool)
    save_part(level_file(task.parts_dir, 0, task.name), np.where(members, alive, 0).astype(np.int16))
    everyone = np.ones(task.stop - task.start, dtype=bool)  # the reference's C_0: before the pre-filter
    return {"task": task.name, "rows": int(members.sum()), **_partial_moment(task, pool, everyone, 0)}


def _score_task(task: Normsim2dTask) -> dict:
    pool = _pool(task)
    form = _form(task, pool.dim)
    i, alive = task.iteration, task.iterations + 1
    levels = _levels(task, i)
    members = levels == alive
    scored = np.ones(len(levels), dtype=bool) if i == 0 else members
    scores = np.zeros(len(levels), dtype=np.float32) if i == 0 else _scores(task, i - 1).copy()
    for first, end, rows in _blocks(task, pool, scored):  # the scored rows of each block
        if rows is not None:
            at = first - task.start
            scores[at + np.flatnonzero(scored[at:end - task.start])] = form(rows)
    save_part(score_file(task.parts_dir, i, task.name), scores)
    if not task.histogram:
        return {"task": task.name}
    return {"task": task.name, **score_histogram(selection_keys(levels, scores, alive))}


def _select_task(task: Normsim2dTask) -> dict:
    keys = selection_keys(_levels(task, task.iteration), _scores(task, task.iteration), task.iterations + 1)
    return {"task": task.name, **answer_query(keys, task.start, task.query)}


def _advance_task(task: Normsim2dTask) -> dict:
    i, alive = task.iteration, task.iterations + 1
    levels = _levels(task, i)
    members = levels == alive
    keys = selection_keys(levels, _scores(task, i), alive)
    kept = members & kept_rows(keys, np.arange(task.start, task.stop), task.cut_key, task.cut_row)
    levels = levels.copy()
    levels[members & ~kept] = i + 1
    save_part(level_file(task.parts_dir, i + 1, task.name), levels)
    result = {"task": task.name, "rows": int(kept.sum())}
    if i + 1 < task.iterations:
        result.update(_partial_moment(task, _pool(task), kept, i + 1))
    return result


def answer_query(keys: np.ndarray, start: int, query: tuple) -> dict:
    """A selection query over the order keys of pool rows start, start+1, ... (see Normsim2dTask.query)."""
    kind, value, number = query
    if kind == "nth":  # the `number`-th row (1-based, pool order) whose key is `value`
        tied = np.flatnonzero(keys == keys.dtype.type(value))
        if not 1 <= number <= len(tied):
            raise RuntimeError(f"rows {start}..: asked for tied row {number} of {len(tied)}")
        return {"row": start + int(tied[number - 1])}
    rows = np.flatnonzero(topk.in_prefix(keys, value, number))
    if kind == "hist":
        return {"hist": topk.sparse_histogram(topk.digit_histogram(keys[rows], number))}
    return {"keys": keys[rows], "rows": start + rows.astype(np.int64)}


def score_histogram(keys: np.ndarray) -> dict:
    """The score map's answer: the first 16-bit digit of every row's order key."""
    return {"hist": topk.sparse_histogram(topk.digit_histogram(keys, 0))}


# ---------------------------------------------------------------- the driver

class ColumnParts:
    """The normsim_2d column in pool order, computed part by part on slicing from the final levels and
    scores (for `write_score_table`)."""

    def __init__(self, parts_dir: Path, iterations: int, names: list[str], spans: list[tuple[int, int]]):
        self.parts_dir, self.iterations, self.names, self.spans = parts_dir, iterations, names, spans
        self.n = spans[-1][1]

    def __len__(self) -> int:
        return self.n

    def _part(self, index: int, lo: int, hi: int) -> np.ndarray:
        start, stop = self.spans[index]
        levels = load_part(level_file(self.parts_dir, self.iterations, self.names[index]), (stop - start,),
                           np.int16, mmap=True)
        scores = load_part(score_file(self.parts_dir, self.iterations - 1, self.names[index]), (stop - start,),
                           np.float32, mmap=True)
        return normsim_2d_column(levels[lo:hi], scores[lo:hi])

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.n)
        pieces = [self._part(i, max(start, a) - a, min(stop, b) - a)
                  for i, (a, b) in enumerate(self.spans) if a < stop and start < b]
        return np.concatenate(pieces) if pieces else np.empty(0, np.float32)

    def to_array(self) -> np.ndarray:
        return self[0:self.n]


def _count_at(answer: dict, digit: int) -> int:
    digits, counts = answer["hist"]
    at = np.flatnonzero(digits == digit)
    return int(counts[at[0]]) if len(at) else 0


def select_cut(answers: list[dict], count: int, collect_rows: int, ask: Callable[[list[int], tuple], list[dict]]
               ) -> tuple[int, int]:
    """(cut key, row cut) of the `count` largest keys, ties by lower row, from the score
    map's digit histograms (`answers`, one per task); `ask(task indices, query)` runs a select map."""
    prefix = bits = above = 0
    while True:
        hist = topk.sum_histograms(a["hist"] for a in answers)
        digit, more = topk.bucket_of_rank(hist, count - above)
        above += more
        prefix, bits = (prefix << topk.DIGIT_BITS) | digit, bits + topk.DIGIT_BITS
        need = count - above  # rows still needed from the bucket (>= 1)
        if bits == 32:  # one key value: the need-th tied row in pool order, found in the task holding it
            tied = np.cumsum([_count_at(a, digit) for a in answers])
            task = int(np.searchsorted(tied, need))
            before = int(tied[task - 1]) if task else 0
            return prefix, ask([task], ("nth", prefix, need - before))[0]["row"]
        if hist[digit] <= collect_rows:
            collected = ask(list(range(len(answers))), ("collect", prefix, bits))
            keys = np.concatenate([a["keys"] for a in collected])
            rows = np.concatenate([a["rows"] for a in collected]).astype(np.uint64)
            cut, _, row, _ = topk.exact_cut(keys, np.zeros(len(keys), np.uint64), rows, need)
            return cut, row
        answers = ask(list(range(len(answers))), ("hist", prefix, bits))


def prefilter_identity(prefilter: str) -> str:
    """path|size|mtime of the pre-filter's uid file (a changed file gets a new parts directory)."""
    if not prefilter:
        return ""
    path = subset_file(prefilter)
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def copy_prefilter(prefilter: str, parts_dir: Path) -> int:
    """The pre-filter's uids, sorted and unique, into the parts directory (tasks map this copy, which no one
    else truncates); returns how many."""
    path = subset_file(prefilter)
    pairs = load_subset(path, mmap=True)  # only read here, and copied before the tasks map anything
    if is_sorted_unique(pairs):  # as `curate filter` writes it: copied as bytes, never held in memory
        with atomic_path(parts_dir / PREFILTER_FILE) as tmp:
            shutil.copyfile(path, tmp)
    else:
        save_part(parts_dir / PREFILTER_FILE, sorted_unique_pairs(np.asarray(pairs)))
    return len(np.load(parts_dir / PREFILTER_FILE, mmap_mode="r"))


def normsim_2d_parts(pool: EmbeddingPool, emb_dir, memmap_dir, root: Path, schedule: Normsim2dSchedule,
                     opts: RunOptions = RunOptions(), collect_rows: int | None = None,
                     block_rows: int | None = None) -> tuple[ColumnParts, dict]:
    """The normsim_2d column as parts: every iteration run with its files in `root/normsim_2d-<layout hash>`
    (opts: executor, workers, tasks, retries, ray_address); returns the column (parts there: the caller deletes
    them, `remove_parts`) and what ran. Builds the pool's fp16 image cache in `memmap_dir` first."""
    started = time.perf_counter()
    executor, workers, tasks, retries = opts.executor, int(opts.workers), opts.tasks, int(opts.retries)
    pool.matrix("image_embedding", memmap_dir)  # the fp16 cache: 2T passes read it instead of decoding Parquet
    collect_rows = DEFAULT_COLLECT_ROWS if collect_rows is None else int(collect_rows)
    layout = Normsim2dLayout(pool.fingerprint(), pool.n_rows, pool.dim, schedule.iterations, schedule.final_fraction,
                             schedule.subsample, schedule.seed, prefilter_identity(schedule.prefilter),
                             int(block_rows or READ_BATCH_ROWS), int(tasks or DEFAULT_TASKS), np.__version__)
    spans = table_spans(pool, layout.tasks)
    names = task_names(len(spans))
    parts_dir = Path(root) / f"{STAGE}-{layout_key(layout)}"
    parts_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(parts_dir)  # left by writers killed in an earlier run
    source, threads = pool_source(emb_dir), blas_thread_count() or 0
    iterations, n, dim = schedule.iterations, pool.n_rows, pool.dim
    map_rounds = 0

    def task(index: int, kind: str, i: int, **fields) -> Normsim2dTask:
        return Normsim2dTask(names[index], spans[index][0], spans[index][1], source, str(memmap_dir),
                             layout.fingerprint, str(parts_dir), kind, i, iterations, schedule.subsample,
                             schedule.seed, layout.block_rows, threads, **fields)

    def reduce_moment(i: int, results: list[dict]) -> int:
        """C_i = the partials summed in span order (one float64 order for every executor) / k; returns k."""
        moment = np.zeros((dim, dim), dtype=np.float64)
        for name in names:
            part = moment_file(parts_dir, i, name)
            moment += load_part(part, (dim, dim), np.float64)
            part.unlink()
        sampled = sum(r["sampled"] for r in results)
        save_part(moment_file(parts_dir, i), moment / sampled if sampled else moment)
        return sampled

    prefilter_uids = None
    try:
        if schedule.prefilter:
            prefilter_uids = copy_prefilter(schedule.prefilter, parts_dir)
        with executor_session(executor, workers=workers, ray_address=opts.ray_address) as run:

            def submit(round_tasks: list[Normsim2dTask], label: str) -> list[dict]:
                nonlocal map_rounds
                report = run.run(normsim_2d_task, round_tasks, retries=retries)
                if report.failures:  # not raise_if_failed: no finished work is kept here
                    lines = "; ".join(f"{f.task}: {f.error.splitlines()[-1] if f.error else 'error'}"
                                      for f in report.failures)
                    raise CurateError(f"normsim --p 2d {label} (map tasks): {lines}")
                map_rounds += 1
                return report.results

            results = submit([task(i, "start", 0, prefilter=bool(schedule.prefilter)) for i in range(len(spans))],
                             "start")
            candidates = sum(r["rows"] for r in results)
            if candidates == 0:
                raise CurateError(f"--prefilter {schedule.prefilter}: none of its {prefilter_uids} uids is in the "
                                  "pool; give the subset `curate filter` wrote from this pool's score tables")
            try:
                sizes = nested_sizes(n, candidates, schedule.final_fraction, iterations)
            except ValueError as exc:
                raise CurateError(f"--prefilter {schedule.prefilter}: {exc}; lower --final-fraction or keep more "
                                  "in the pre-filter") from None
            subsampled = [reduce_moment(0, results)]
            for i in range(iterations):
                select = sizes[i + 1] < sizes[i]
                results = submit([task(k, "score", i, histogram=select) for k in range(len(spans))],
                                 f"iteration {i + 1} score")
                moment_file(parts_dir, i).unlink()
                for name in names if i else ():  # the previous scores live on in this iteration's
                    score_file(parts_dir, i - 1, name).unlink(missing_ok=True)
                cut = (0, n)  # nothing to remove: every key >= 0 passes
                if select:

                    def ask(indices: list[int], query: tuple, i=i) -> list[dict]:
                        return submit([task(k, "select", i, query=query) for k in indices],
                                      f"iteration {i + 1} selection")

                    cut = tuple(int(c) for c in select_cut(results, sizes[i + 1], collect_rows, ask))
                results = submit([task(k, "advance", i, cut_key=cut[0], cut_row=cut[1]) for k in range(len(spans))],
                                 f"iteration {i + 1} advance")
                if sum(r["rows"] for r in results) != sizes[i + 1]:  # the cut must select exactly the count
                    raise RuntimeError(f"iteration {i + 1}: the advance map kept {sum(r['rows'] for r in results)} "
                                       f"rows, expected {sizes[i + 1]}")
                for name in names:
                    level_file(parts_dir, i, name).unlink(missing_ok=True)
                if i + 1 < iterations:
                    subsampled.append(reduce_moment(i + 1, results))
    except BaseException:
        remove_parts(parts_dir, root)  # a rerun starts over: nothing here is reused
        raise
    finally:
        _POOLS.clear()  # in process: drop the pool and C_i after the run
        _FORMS.clear()
    (parts_dir / PREFILTER_FILE).unlink(missing_ok=True)
    info = {"executor": executor, "workers": workers, "tasks": len(spans), "map_rounds": map_rounds,
            "kept_rows": sizes, "subsample_rows": subsampled, "prefilter_uids": prefilter_uids,
            "seconds": round(time.perf_counter() - started, 3)}
    return ColumnParts(parts_dir, iterations, names, spans), info


def normsim_2d_params(schedule: Normsim2dSchedule, ran: dict) -> dict:
    """What a table of `normsim_2d_parts` records: the schedule, the sizes |S_0..S_T|, the subsample sizes."""
    params = {"target": "none", "schedule": "nested", **schedule.describe(), "kept_rows": ran["kept_rows"],
              "subsample_rows": ran["subsample_rows"],
              "column": "level + min(s, 1)/2: level 0 removed by the pre-filter, i+1 removed in iteration i, "
                        "T+1 kept; s = sqrt(v'Cv) with C the mean x x' of the last subsample it was scored on"}
    if schedule.prefilter:
        params["prefilter_uids"] = ran["prefilter_uids"]
    return params
