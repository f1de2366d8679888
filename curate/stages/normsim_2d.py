"""`curate normsim --p 2d` as one driver running rounds of map tasks (curate.metrics.normsim.normsim_2d).

The pool is cut into T spans of whole tables (`--tasks`, default 32, capped by the table count; the same
spans for every executor and worker count). Round t = 0..T'-1 of NormSim_2-D (T' = --iterations):
1. moment map: each task returns (as `m<t>-tNNNNN.npy`) the float64 D×D partial Σ x xᵀ over its rows
   kept in round t (every row in round 0), block by block (`_image_blocks`: blocks never cross a table);
   the driver adds the partials in span order into C_t (`c<t>.npy`).
2. score map: each task scores its rows with QuadraticForm(C_t) into `r<t>-tNNNNN.npy` (float32) and,
   before the last round, returns the sparse 16-bit digit histogram of the scores' order keys.
3. selection (before the last round): the exact top ⌈f_{t+1}·N⌉ by radix select (curate.metrics.topk,
   as the distributed filter does) over the score parts, ties by lower pool index as `top_fraction_mask`:
   histogram rounds narrow the key prefix until the bucket of the cut holds at most `collect_rows` rows
   (collected whole: (key, row) pairs) or one key value (then one task names the tied row at the rank
   needed). A row is kept next round when key > cut, or key == cut and row <= row cut.
The table is the last round's parts (read one table at a time by `write_score_table`). Memory: the driver
holds D×D moments, histograms and at most `collect_rows` collected rows, never N scores; a task holds
its span's scores and one block of rows.

Bits: every mode (in process, --workers, Ray, any --tasks giving the same spans) runs this code, with the
same blocks, the same float64 summation order and BLAS pinned to the driver's thread count (OpenBLAS sgemm
rounding depends on it), so the tables are byte-identical. `--rank/--world-size` are refused: each round
needs every task's result, so one driver submits them all.

Files live in `<out>.parts/normsim_2d-<layout hash>/` and are deleted after the table is written; a killed
run is rerun from the start (every task overwrites its files atomically).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from curate.errors import CurateError
from curate.io.atomic import atomic_path, sweep_stale_temps
from curate.io.prefetch import prefetch
from curate.io.tables import READ_BATCH_ROWS, EmbeddingPool
from curate.metrics import topk
from curate.metrics.normsim import QuadraticForm, keep_count, normsim_2d_fractions, second_moment
from curate.run.executors import executor_session
from curate.run.mapreduce import DEFAULT_TASKS, PoolSpanTask, layout_key, pool_source, remove_parts, task_names
from curate.run.threads import blas_thread_count, blas_threads

STAGE = "normsim_2d"
DEFAULT_COLLECT_ROWS = 1 << 20  # (key, row) pairs (12 B each) a cut's bucket may hold to be collected whole


@dataclass
class Normsim2dLayout:
    """What fixes the round outputs; its hash names `<out>.parts/normsim_2d-<hash>`."""

    fingerprint: str
    n_rows: int
    dim: int
    iterations: int
    final_fraction: float
    block_rows: int
    tasks: int
    numpy: str


@dataclass
class Normsim2dTask(PoolSpanTask):
    """One map task of round `round` over pool rows start..stop-1 (whole tables).

    kind "moment": the partial second moment of the rows kept this round (cut_key/cut_row: the previous
    round's cut; cut_row < 0 for every row); "score": the scores against `c<round>.npy` (+ the digit
    histogram unless `last`); "select": `query` answered over this round's scores.
    """

    kind: str
    round: int
    block_rows: int
    blas_threads: int  # the driver's BLAS thread count, which the products' bits depend on (0: leave)
    cut_key: int = 0
    cut_row: int = -1
    last: bool = False
    query: tuple = ()  # ("hist", prefix, bits) | ("collect", prefix, bits) | ("nth", key, rank)


def moment_file(parts_dir, t: int, name: str | None = None) -> Path:
    """The driver's C_t (`name` None) or task `name`'s partial of round t."""
    return Path(parts_dir) / (f"c{t}.npy" if name is None else f"m{t}-{name}.npy")


def score_file(parts_dir, t: int, name: str) -> Path:
    return Path(parts_dir) / f"r{t}-{name}.npy"


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


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def kept_rows(keys: np.ndarray, rows: np.ndarray, cut_key: int, cut_row: int) -> np.ndarray:
    """The rows a finished selection keeps: key > cut, or key == cut and pool row <= row cut."""
    key = keys.dtype.type(cut_key)
    return (keys > key) | ((keys == key) & (rows <= cut_row))


# ---------------------------------------------------------------- the tasks

_POOLS: dict[tuple, EmbeddingPool] = {}  # one open pool per process: a worker runs many tasks
_FORMS: dict[str, QuadraticForm] = {}  # the round's C_t, loaded once per process


def _pool(task: Normsim2dTask) -> EmbeddingPool:
    key = (str(task.emb_dir), task.fingerprint)
    if key not in _POOLS:
        _POOLS.clear()
        _POOLS[key] = task.open_pool("normsim")
    return _POOLS[key]


def _form(task: Normsim2dTask, dim: int) -> QuadraticForm:
    path = moment_file(task.parts_dir, task.round)
    try:
        stat = path.stat()
    except OSError:
        stat = None  # load_part says what is wrong
    key = f"{path}|{stat and stat.st_mtime_ns}|{stat and stat.st_size}"  # a Ray worker outlives runs
    if key not in _FORMS:
        _FORMS.clear()
        _FORMS[key] = QuadraticForm(load_part(path, (dim, dim), np.float64))
    return _FORMS[key]


def _blocks(task: Normsim2dTask, pool: EmbeddingPool):
    from curate.stages.normsim import _image_blocks

    # the cache when this process finds it, else the tables: the same blocks, the same bytes
    return prefetch(_image_blocks(pool, task.cache_dir, task.start, task.stop, task.block_rows))


def _span_keys(task: Normsim2dTask, t: int) -> np.ndarray:
    scores = load_part(score_file(task.parts_dir, t, task.name), (task.stop - task.start,), np.float32)
    return topk.order_keys(scores)


def normsim_2d_task(task: Normsim2dTask) -> dict:
    """Run one map task (module level, so worker processes and Ray can unpickle it)."""
    with blas_threads(task.blas_threads):
        if task.kind == "moment":
            return _moment_task(task)
        if task.kind == "score":
            return _score_task(task)
        return _select_task(task)


def _moment_task(task: Normsim2dTask) -> dict:
    pool = _pool(task)
    kept = None
    if task.cut_row >= 0:
        keys = _span_keys(task, task.round - 1)
        kept = kept_rows(keys, np.arange(task.start, task.stop), task.cut_key, task.cut_row)
    moment = np.zeros((pool.dim, pool.dim), dtype=np.float64)
    row = 0
    for rows in _blocks(task, pool):
        chosen = rows if kept is None else rows[kept[row:row + len(rows)]]
        row += len(rows)
        if len(chosen):  # one float32 product per block, added in float64
            second_moment(chosen, moment, chunk_rows=len(chosen))
    _save(moment_file(task.parts_dir, task.round, task.name), moment)
    return {"task": task.name, "rows": int(row if kept is None else kept.sum())}


def _score_task(task: Normsim2dTask) -> dict:
    pool = _pool(task)
    form = _form(task, pool.dim)
    scores = np.empty(task.stop - task.start, dtype=np.float32)
    row = 0
    for rows in _blocks(task, pool):
        scores[row:row + len(rows)] = form(rows)
        row += len(rows)
    _save(score_file(task.parts_dir, task.round, task.name), scores)
    if task.last:
        return {"task": task.name}
    return {"task": task.name, **score_histogram(scores)}


def _select_task(task: Normsim2dTask) -> dict:
    return {"task": task.name, **answer_query(_span_keys(task, task.round), task.start, task.query)}


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


def score_histogram(scores: np.ndarray) -> dict:
    """The score map's answer: the first 16-bit digit of every row's order key."""
    return {"hist": topk.sparse_histogram(topk.digit_histogram(topk.order_keys(scores), 0))}


# ---------------------------------------------------------------- the driver

class ScoreParts:
    """The last round's scores in pool order, read part by part on slicing (for `write_score_table`)."""

    def __init__(self, parts_dir: Path, t: int, names: list[str], spans: list[tuple[int, int]]):
        self.parts_dir, self.t, self.names, self.spans = parts_dir, t, names, spans
        self.n = spans[-1][1]

    def __len__(self) -> int:
        return self.n

    def _part(self, index: int) -> np.ndarray:
        start, stop = self.spans[index]
        return load_part(score_file(self.parts_dir, self.t, self.names[index]), (stop - start,), np.float32,
                         mmap=True)

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(self.n)
        pieces = [np.array(self._part(i)[max(start, a) - a:min(stop, b) - a])
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


def normsim_2d_rounds(pool: EmbeddingPool, emb_dir, memmap_dir, root: Path, iterations: int,
                      final_fraction: float, *, executor: str = "local", workers: int = 1, tasks: int | None = None,
                      retries: int = 1, ray_address: str | None = None, collect_rows: int | None = None,
                      block_rows: int | None = None) -> tuple[ScoreParts, dict]:
    """Run every round with its files in `root/normsim_2d-<layout hash>`; returns the last round's scores
    (parts there: the caller deletes them, `remove_parts`) and what ran."""
    from curate.stages.normsim import normsim_task_spans

    started = time.perf_counter()
    collect_rows = DEFAULT_COLLECT_ROWS if collect_rows is None else int(collect_rows)
    layout = Normsim2dLayout(pool.fingerprint(), pool.n_rows, pool.dim, int(iterations), float(final_fraction),
                             int(block_rows or READ_BATCH_ROWS), int(tasks or DEFAULT_TASKS), np.__version__)
    spans = normsim_task_spans(pool, layout)
    names = task_names(len(spans))
    parts_dir = Path(root) / f"{STAGE}-{layout_key(layout)}"
    parts_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(parts_dir)  # left by writers killed in an earlier run
    source, threads = pool_source(emb_dir), blas_thread_count() or 0
    fractions = normsim_2d_fractions(int(iterations), float(final_fraction))
    map_rounds = 0

    def task(i: int, kind: str, t: int, **fields) -> Normsim2dTask:
        return Normsim2dTask(names[i], spans[i][0], spans[i][1], source, str(memmap_dir), layout.fingerprint,
                             str(parts_dir), kind, t, layout.block_rows, threads, **fields)

    try:
        with executor_session(executor, workers=int(workers), ray_address=ray_address) as run:

            def submit(round_tasks: list[Normsim2dTask], label: str) -> list[dict]:
                nonlocal map_rounds
                report = run.run(normsim_2d_task, round_tasks, retries=retries)
                if report.failures:  # not raise_if_failed: no finished work is kept here
                    lines = "; ".join(f"{f.task}: {f.error.splitlines()[-1] if f.error else 'error'}"
                                      for f in report.failures)
                    raise CurateError(f"normsim --p 2d {label} (map tasks): {lines}")
                map_rounds += 1
                return report.results

            cut = (0, -1)
            kept = [pool.n_rows]
            for t in range(len(fractions)):
                last = t == len(fractions) - 1
                results = submit([task(i, "moment", t, cut_key=cut[0], cut_row=cut[1]) for i in range(len(spans))],
                                 f"round {t + 1} moment")
                if sum(r["rows"] for r in results) != kept[-1]:  # the cut must select exactly the count
                    raise RuntimeError(f"round {t + 1}: the moment map saw {sum(r['rows'] for r in results)} kept "
                                       f"rows, expected {kept[-1]}")
                moment = np.zeros((pool.dim, pool.dim), dtype=np.float64)
                for name in names:  # span order: one float64 summation order for every executor
                    part = moment_file(parts_dir, t, name)
                    moment += load_part(part, (pool.dim, pool.dim), np.float64)
                    part.unlink()
                _save(moment_file(parts_dir, t), moment)
                for name in names if t else ():  # the previous round's scores were only needed for its cut
                    score_file(parts_dir, t - 1, name).unlink(missing_ok=True)
                results = submit([task(i, "score", t, last=last) for i in range(len(spans))], f"round {t + 1} score")
                moment_file(parts_dir, t).unlink()
                if last:
                    break
                count = keep_count(pool.n_rows, fractions[t + 1])

                def ask(indices: list[int], query: tuple, t=t) -> list[dict]:
                    return submit([task(i, "select", t, query=query) for i in indices], f"round {t + 1} selection")

                cut_key, cut_row = select_cut(results, count, collect_rows, ask)
                cut = (int(cut_key), int(cut_row))
                kept.append(count)
    except BaseException:
        remove_parts(parts_dir, root)  # a rerun starts over: nothing here is reused
        raise
    finally:
        _POOLS.clear()  # in process: drop the pool and C_t after the run
        _FORMS.clear()
    info = {"executor": executor, "workers": int(workers), "tasks": len(spans), "map_rounds": map_rounds,
            "kept_rows": kept, "seconds": round(time.perf_counter() - started, 3)}
    return ScoreParts(parts_dir, len(fractions) - 1, names, spans), info
