"""`curate filter` as map tasks: the in-memory filter's selection and outputs, without holding the pool.

Runs when --executor ray, --workers > 1 or --tasks is given (curate.stages.filter.entry.run). One driver
process runs rounds; each round submits map tasks (runs of row groups, `--tasks`, default 32) to the
executor and reduces their small results. Memory per process: a histogram, the rows collected at a cut,
and one row group; the driver never holds a score column. (`curate score` and `curate normsim` write one
row group per embedding table, so even their single-file tables split into many tasks.)

Rules and outputs are those of the in-memory filter (curate/stages/filter/__init__.py and local.py), byte
for byte: `uids.npy`, the rows and values of `kept.parquet` in pool order (its row groups may differ), and
`stats.json` (plus a `distributed` entry).

Selection (curate.metrics.topk): each --keep is a radix select over the order-preserving integer key of its
score. A round's map histograms one 16-bit digit of the key over the step's candidate rows whose key has
the prefix chosen so far; the reduce picks the bucket holding the cut. Once the bucket holds at most
`collect_rows` rows (default 2^20), or a single key value, the next map collects those rows' keys and uids
and the reduce finds the exact cut and the uid cut of the tie-break. A finished step is (cut key, uid
cut): any task re-evaluates "kept by step s" from it without state. Sequential mode runs the steps one
after the other (step s+1's candidates are the rows kept by steps 1..s); independent mode runs every
step's rounds together. Typically 2 rounds per step, then a final map.
Float64 scores (and integer metrics, read as float64) use 64-bit keys, float16 ones 32-bit keys of their
exact float32 value: every dtype the in-memory filter ranks is ranked exactly here.

Tables: every table argument must have the same row groups (files, and row groups per file, of the same
sizes), with the same uids in the same order (as `curate score` and `curate normsim` write them from one
embedding directory). The
first round checks it, parsing every table's uids (so a bad uid is the in-memory filter's error too);
otherwise use the in-memory filter, which joins on uid. A table that changes (size or mtime) during the
run is an error.
Duplicate uids: refused, as in memory, when the copies lie in one row group (each group's uids are sorted
in the first round) or are both kept (the reduce sorts every kept uid). Two copies in different row groups
of which at most one is kept are not detected: that would take a global sort of all N uids.
Not supported: --rank/--world-size (the rounds need every task's counts: one driver submits them; a
Slurm array's variables are ignored) and --normsim (in memory: run `curate normsim` first).

Final map: each task writes its kept rows (uid strings and every metric, pool order) as a Parquet part and
its kept uids sorted, with counts per top uid byte, into `<out>.parts/filter-<hash>/` with markers (a
rerun reuses finished parts). The reduce streams the parts into `kept.parquet` and merges the uids one
top byte at a time into `uids.npy` (memory O(kept / 256)), then writes `stats.json` and deletes the parts.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import RunOptions
from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import with_meta
from curate.io.uids import DATACOMP_DTYPE, sorted_uid_pairs, uid_halves, uid_order
from curate.metrics import topk
from curate.run.executors import executor_session
from curate.run.mapreduce import DEFAULT_TASKS, layout_parts_dir, parts_root, remove_parts, start_map
from curate.run.markers import Markers
from curate.stages.filter import FilterResult, StepStats
from curate.stages.filter.common import (Bound, KeepStep, ScoreTable, check_rankable, check_selection, check_unique,
                                         fraction_text, metric_dtype, metric_sources, metric_values, scan_score_table,
                                         passed_drops, table_name, write_stats)
from curate.stages.filter.uid_sets import UidList, combine, list_step_stats, load_uid_lists

STAGE = "filter"
DEFAULT_COLLECT_ROWS = 1 << 20  # rows (key + uid, <= 24 B each) a bucket may hold to be collected whole
UID_BUCKETS = 256  # kept uids are merged one top byte at a time


# ---------------------------------------------------------------- what tasks are given

@dataclass(frozen=True)
class StepCut:
    """A finished --keep: rows with key > cut, or key == cut and uid <= (uid_high, uid_low), are kept."""

    metric: str
    cut: int
    uid_high: int
    uid_low: int


@dataclass(frozen=True)
class Query:
    """One step's request of a round: the digit histogram ("hist") or the rows ("collect") of the
    step's candidates whose key starts with the `bits`-bit `prefix`."""

    step: int
    kind: str
    prefix: int
    bits: int


@dataclass
class SpanTask:
    """A run of row groups: unit i is row group groups[i] of file files[i][t] of table t (row-aligned), whose
    (size, mtime_ns) is stamps[i][t]."""

    name: str
    files: list[list[str]]
    groups: list[int]
    stamps: list[list[tuple[int, int]]]
    rows: list[int]
    metric_table: dict[str, int]
    bounds: list[Bound]

    def check_stamps(self) -> None:
        for paths, stamps in zip(self.files, self.stamps):
            for path, stamp in zip(paths, stamps):
                try:
                    st = os.stat(path)
                except OSError as exc:
                    raise CurateError(f"{path}: cannot read it any more ({exc}); rerun `curate filter`") from None
                if (st.st_size, st.st_mtime_ns) != tuple(stamp):
                    raise CurateError(f"{path}: the score table changed since this filter run started (size or "
                                      "mtime differ); rerun `curate filter` on the final tables")


@dataclass
class RoundTask(SpanTask):
    mode: str
    keep_metrics: list[str]
    cuts: list[StepCut | None]  # finished steps (sequential: every step before the current one)
    queries: list[Query]
    validate: bool  # first round: parse every table's uids, check alignment and per-file uniqueness


@dataclass
class FinalTask(SpanTask):
    cuts: list[StepCut]
    columns: list[tuple[str, str]]  # kept.parquet's metric columns: (name, numpy dtype)
    parts_dir: str
    validate: bool
    lists: list[UidList] = field(default_factory=list)  # the uid lists, in the order they apply


# ---------------------------------------------------------------- one row group of a task

class GroupView:
    """Unit `index` (one row group) of a task's span, with its columns read on first use (one unit in memory
    at a time)."""

    def __init__(self, task: SpanTask, index: int):
        self.task, self.paths, self.n = task, task.files[index], task.rows[index]
        self.group = task.groups[index]
        self._values: dict[str, np.ndarray] = {}
        self._keys: dict[str, np.ndarray] = {}
        self._uid: pa.Array | None = None
        self._halves: tuple[np.ndarray, np.ndarray] | None = None

    def _column(self, table: int, name: str) -> pa.Array:
        path = self.paths[table]
        try:
            column = (pq.ParquetFile(path).read_row_group(self.group, columns=[name], use_threads=False)
                      .column(name).combine_chunks())
        except (OSError, pa.ArrowInvalid, KeyError) as exc:
            raise CurateError(f"{path}: cannot read column `{name}` ({exc})") from None
        if len(column) != self.n:
            raise CurateError(f"{path}: holds {len(column)} rows, expected {self.n}; rerun `curate filter`")
        return column

    def values(self, name: str) -> np.ndarray:
        if name not in self._values:
            self._values[name] = metric_values(self._column(self.task.metric_table[name], name))
        return self._values[name]

    def keys(self, name: str) -> np.ndarray:
        if name not in self._keys:
            values = self.values(name)
            if values.dtype == np.float16:  # float16 -> float32 is exact and keeps the order
                values = values.astype(np.float32)
            self._keys[name] = topk.order_keys(values)
        return self._keys[name]

    def nan(self, name: str) -> np.ndarray:
        return np.isnan(self.values(name))

    def uid_column(self) -> pa.Array:
        if self._uid is None:
            self._uid = self._column(0, "uid")
        return self._uid

    def uids(self) -> tuple[np.ndarray, np.ndarray]:
        if self._halves is None:
            self._halves = uid_halves(self.uid_column(), self.paths[0])
        return self._halves

    def passed_bounds(self, stats: list[list[int]] | None = None) -> np.ndarray:
        """Rows passing every drop step and --min/--max in order; `stats` gets [ranked, passed, nan] per bound
        added."""
        rows = np.ones(self.n, dtype=bool)
        for number, b in enumerate(self.task.bounds):
            values = self.values(b.metric)
            passed = b.passes(values)
            if stats is not None:
                stats[number][0] += int(rows.sum())
                stats[number][2] += int((rows & np.isnan(values)).sum())
            rows &= passed
            if stats is not None:
                stats[number][1] += int(rows.sum())
        return rows

    def kept_by(self, cut: StepCut, candidates: np.ndarray) -> np.ndarray:
        """The candidates a finished step keeps; uids are parsed only when a candidate sits at the cut."""
        keys = self.keys(cut.metric)
        valid = candidates & ~self.nan(cut.metric)
        key = keys.dtype.type(cut.cut)
        kept = valid & (keys > key)
        tied = np.flatnonzero(valid & (keys == key))
        if len(tied):
            high, low = self.uids()
            kept[tied] = topk.uid_at_most(high[tied], low[tied], cut.uid_high, cut.uid_low)
        return kept

    def validate(self) -> None:
        """Every table's uids parse and equal the pool table's, row by row; no uid twice in the row group."""
        high, low = self.uids()
        path = self.paths[0]
        check_unique(ScoreTable(path, [Path(path)], [self.n], high, low, {}), uid_order(high, low))
        for table, other in enumerate(self.paths[1:], 1):
            other_high, other_low = uid_halves(self._column(table, "uid"), other)
            differ = (other_high != high) | (other_low != low)
            if differ.any():
                row = int(np.argmax(differ))
                raise CurateError(
                    f"{other}: row {row} of row group {self.group} has uid {other_high[row]:016x}{other_low[row]:016x} "
                    f"where {path} has "
                    f"{high[row]:016x}{low[row]:016x} ({int(differ.sum())} rows differ); the distributed filter "
                    "(--executor ray, --workers, --tasks) needs tables row-aligned file by file, as `curate score` "
                    "and `curate normsim` write them from the same embedding tables; run the in-memory filter "
                    "(without those options), which joins the tables on uid")


def _candidates(view: GroupView, task: RoundTask, step: int, passed: np.ndarray) -> np.ndarray:
    if task.mode == "independent":
        return passed
    rows = passed
    for cut in task.cuts[:step]:
        rows = view.kept_by(cut, rows)
    return rows


def filter_round_task(task: RoundTask) -> dict:
    """One round's map over a span: per query, the candidates and NaN counts (first round of a step) and
    the sparse digit histogram or the collected (key, uid high, uid low) rows."""
    task.check_stamps()
    answers = [{"ranked": 0, "nan": 0, "hist": None, "keys": [], "high": [], "low": []} for _ in task.queries]
    for index in range(len(task.files)):
        view = GroupView(task, index)
        if task.validate:
            view.validate()
        passed = view.passed_bounds()
        candidates: dict[int, np.ndarray] = {}
        for query, answer in zip(task.queries, answers):
            if query.step not in candidates:
                candidates[query.step] = _candidates(view, task, query.step, passed)
            cand = candidates[query.step]
            metric = task.keep_metrics[query.step]
            nan = view.nan(metric)
            keys = view.keys(metric)
            if query.bits == 0:
                answer["ranked"] += int(cand.sum())
                answer["nan"] += int((cand & nan).sum())
            rows = np.flatnonzero(cand & ~nan & topk.in_prefix(keys, query.prefix, query.bits))
            if query.kind == "hist":
                hist = topk.digit_histogram(keys[rows], query.bits)
                answer["hist"] = hist if answer["hist"] is None else answer["hist"] + hist
            else:
                high, low = view.uids()
                answer["keys"].append(keys[rows])
                answer["high"].append(high[rows])
                answer["low"].append(low[rows])
    for answer in answers:  # small to send back: nonzero digits only, arrays joined
        if answer["hist"] is not None:
            answer["hist"] = topk.sparse_histogram(answer["hist"])
        for part in ("keys", "high", "low"):
            answer[part] = np.concatenate(answer[part]) if answer[part] else None
    return {"task": task.name, "answers": answers}


# ---------------------------------------------------------------- the final map

def part_file(parts_dir: str | Path, name: str) -> Path:
    return Path(parts_dir) / f"{name}.parquet"


def uids_file(parts_dir: str | Path, name: str) -> Path:
    return Path(parts_dir) / f"{name}.uids.npy"


def kept_schema(columns: Sequence[tuple[str, str]]) -> pa.Schema:
    return pa.schema([("uid", pa.string()), *((name, pa.from_numpy_dtype(np.dtype(dt))) for name, dt in columns)])


def filter_final_task(task: FinalTask) -> dict:
    """Write the span's kept rows (pool order) as a Parquet part and its kept uids sorted, then mark it."""
    markers = Markers(task.parts_dir, STAGE)
    if markers.is_done(task.name):
        return {"task": task.name, "ran": False}
    task.check_stamps()
    started = time.perf_counter()
    bound_stats = [[0, 0, 0] for _ in task.bounds]
    list_counts = [[0, 0, 0, 0] for _ in task.lists]
    nan = {name: 0 for name, _ in task.columns}
    highs, lows = [], []
    schema = kept_schema(task.columns)
    with atomic_path(part_file(task.parts_dir, task.name)) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False) as writer:
            for index in range(len(task.files)):
                view = GroupView(task, index)
                if task.validate:
                    view.validate()
                kept = view.passed_bounds(bound_stats)
                for cut in task.cuts:  # a row is in the subset when it passes the bounds and every keep
                    kept = view.kept_by(cut, kept)
                if task.lists:  # then the uid lists (uid_sets.py)
                    kept, counts = combine(kept, passed_drops(task.bounds, view.values, view.n), task.lists,
                                           *view.uids())
                    list_counts = [[a + b for a, b in zip(total, c)] for total, c in zip(list_counts, counts)]
                rows = np.flatnonzero(kept)
                for name, _ in task.columns:
                    nan[name] += int(view.nan(name).sum())
                if not len(rows):
                    continue
                uid = pc.take(view.uid_column(), pa.array(rows)).cast(pa.string())
                writer.write_table(pa.Table.from_arrays(
                    [uid, *(pa.array(view.values(name)[rows]) for name, _ in task.columns)], schema=schema))
                high, low = view.uids()
                highs.append(high[rows])
                lows.append(low[rows])
    high = np.concatenate(highs) if highs else np.empty(0, np.uint64)
    low = np.concatenate(lows) if lows else np.empty(0, np.uint64)
    pairs = sorted_uid_pairs(high, low)
    with atomic_path(uids_file(task.parts_dir, task.name)) as tmp, open(tmp, "wb") as f:
        np.save(f, pairs)
    info = {"kept": len(pairs), "bounds": bound_stats, "lists": list_counts, "nan": nan,
            "buckets": np.bincount((pairs["f0"] >> np.uint64(56)).astype(np.intp),
                                   minlength=UID_BUCKETS).tolist(),
            "seconds": round(time.perf_counter() - started, 3)}
    markers.mark(task.name, info)
    return {"task": task.name, "ran": True}


# ---------------------------------------------------------------- the driver

@dataclass
class TableInfo:
    """A table argument's row groups (the units tasks are made of), from the Parquet footers."""

    name: str
    files: list[str]
    rows: list[int]  # per file
    metrics: list[str]
    types: list[pa.DataType] = field(repr=False)
    stamps: list[tuple[int, int]]  # per file
    unit_file: list[int]  # per row group: its file's index
    unit_group: list[int]  # per row group: its index in the file
    unit_rows: list[int]


def _scan(path) -> TableInfo:
    files, rows, metrics = scan_score_table(path)
    schema = pq.ParquetFile(files[0]).schema_arrow
    stamps = [(os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    unit_file, unit_group, unit_rows = [], [], []
    for index, f in enumerate(files):
        meta = pq.ParquetFile(f).metadata
        for group in range(meta.num_row_groups):
            unit_file.append(index)
            unit_group.append(group)
            unit_rows.append(meta.row_group(group).num_rows)
    return TableInfo(table_name(path), [str(f) for f in files], rows, metrics, [schema.field(m).type for m in metrics],
                     stamps, unit_file, unit_group, unit_rows)


def _stamp(source: str) -> list[int]:
    """(size, mtime_ns) of a uid list (of its uids.npy, or of each Parquet file in a directory, summed)."""
    path = Path(source)
    files = [path / "uids.npy"] if (path / "uids.npy").is_file() else sorted(path.glob("*.parquet")) \
        if path.is_dir() else [path]
    stats = [os.stat(f) for f in files if f.exists()]
    return [sum(st.st_size for st in stats), max((st.st_mtime_ns for st in stats), default=0)]


def _check_aligned(tables: list[TableInfo]) -> None:
    """The cheap part of the alignment check (files, row groups and their sizes), before any task runs."""
    pool = tables[0]
    for table in tables[1:]:
        if (len(table.files) != len(pool.files) or table.unit_file != pool.unit_file
                or table.unit_rows != pool.unit_rows):
            raise CurateError(
                f"{table.name}: {len(table.files)} files with row groups of {table.unit_rows[:5]}"
                f"{'...' if len(table.unit_rows) > 5 else ''} rows, where {pool.name} has {len(pool.files)} files "
                f"with row groups of {pool.unit_rows[:5]}{'...' if len(pool.unit_rows) > 5 else ''} rows; "
                "the distributed filter (--executor ray, --workers, "
                "--tasks) needs tables row-aligned file by file, as `curate score` and `curate normsim` write them "
                "from the same embedding tables; run the in-memory filter (without those options), which joins "
                "the tables on uid")


@dataclass
class Selection:
    """The driver's state of one --keep: the key prefix found so far and what ranks above it."""

    number: int  # 1-based, as in error messages
    step: KeepStep
    count: int
    bits_total: int
    key_dtype: np.dtype
    kind: str
    prefix: int = 0
    bits: int = 0
    above: int = 0
    ranked: int | None = None
    nan: int = 0
    cut: StepCut | None = None
    stats: StepStats | None = None

    def query(self, index: int) -> Query:
        return Query(index, self.kind, self.prefix, self.bits)


def filter_in_tasks(tables: Sequence, out_dir: str | Path, keeps: Sequence[KeepStep], bounds: Sequence[Bound],
                    mode: str, args: dict, opts: RunOptions = RunOptions(),
                    collect_rows: int | None = None, lists: Sequence[tuple[str, str]] = ()) -> FilterResult:
    """The in-memory filter's selection (local.filter_in_memory) as rounds of map tasks on `opts`' executor;
    writes the same three files into `out_dir`. `tables`: table arguments, grouped (drop steps' tables
    among them); `lists`: the uid lists as (operation, source), applied by the final map."""
    executor, workers, tasks, retries, ray_address = (opts.executor, int(opts.workers), opts.tasks,
                                                      int(opts.retries), opts.ray_address)
    started = time.perf_counter()
    collect_rows = DEFAULT_COLLECT_ROWS if collect_rows is None else int(collect_rows)
    infos = [_scan(t) for t in tables]
    sources = metric_sources([(t.name, t.metrics) for t in infos])
    check_selection(sources, keeps, bounds, mode)
    pool_size = sum(infos[0].rows)
    if pool_size == 0:
        raise CurateError(f"{infos[0].name}: the score table has no rows; nothing to filter")
    _check_aligned(infos)
    metric_table = {m: t for t, info in enumerate(infos) for m in info.metrics}
    dtypes = {m: metric_dtype(ty) for info in infos for m, ty in zip(info.metrics, info.types)}
    pool = infos[0]
    list_stamps = [[op, source, _stamp(source)] for op, source in lists]
    n_units = len(pool.unit_rows)
    count = max(1, min(int(tasks or DEFAULT_TASKS), n_units))
    cuts = [(i * n_units) // count for i in range(count + 1)]
    spans = list(zip(cuts[:-1], cuts[1:]))

    def span_fields(first: int, stop: int) -> dict:
        units = range(first, stop)
        return {"files": [[t.files[pool.unit_file[u]] for t in infos] for u in units],
                "groups": pool.unit_group[first:stop],
                "stamps": [[t.stamps[pool.unit_file[u]] for t in infos] for u in units],
                "rows": pool.unit_rows[first:stop], "metric_table": metric_table, "bounds": list(bounds)}

    selections = []
    for number, k in enumerate(keeps, 1):
        bits = 64 if dtypes[k.metric] == np.float64 else 32
        selections.append(Selection(number, k, k.count(pool_size), bits,
                                    np.dtype(np.float64 if bits == 64 else np.float32),
                                    "collect" if pool_size <= collect_rows else "hist"))
    rounds = 0
    with executor_session(executor, workers=workers, ray_address=ray_address) as run:
        while True:
            active = [s for s in selections if s.cut is None]
            if mode == "sequential":
                active = active[:1]
            if not active:
                break
            done_cuts = [s.cut for s in selections]
            round_tasks = [RoundTask(f"round{rounds:02d}-t{i:05d}", **span_fields(a, b), mode=mode,
                                     keep_metrics=[k.metric for k in keeps], cuts=done_cuts,
                                     queries=[s.query(s.number - 1) for s in active], validate=rounds == 0)
                           for i, (a, b) in enumerate(spans)]
            report = run.run(filter_round_task, round_tasks, retries=retries)
            report.raise_if_failed(f"filter round {rounds + 1} (map tasks)")
            rounds += 1
            for position, selection in enumerate(active):
                _reduce(selection, [r["answers"][position] for r in report.results], pool_size, mode, collect_rows)

        columns = [(m, dtypes[m].str) for m in sources]
        final_cuts = [s.cut for s in selections]
        layout = FilterLayout([[t.name, t.files, t.stamps] for t in infos], [asdict(b) for b in bounds],
                              [asdict(c) for c in final_cuts], columns, len(spans), list_stamps)
        parts_dir = layout_parts_dir(out_dir, STAGE, layout)
        job = start_map(parts_dir, layout, STAGE, len(spans), executor, workers, rank=0, world_size=1)
        uid_lists = load_uid_lists(lists, parts_dir / "lists")  # the run's own sorted copies, memory-mapped
        final_tasks = [FinalTask(job.names[i], **span_fields(*spans[i]), cuts=final_cuts, columns=columns,
                                 parts_dir=str(parts_dir), validate=rounds == 0, lists=uid_lists)
                       for i in job.todo]
        report = job.run(final_tasks, filter_final_task, ray_address=ray_address, retries=retries,
                         label="filter (final map tasks)")
    markers = job.markers
    task_infos = [markers.info(name) for name in job.names]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept = _write_kept(out, parts_dir, job.names, columns, args)
    _write_uids(out, parts_dir, job.names, task_infos, kept, infos[0].name)

    steps = []
    for number, b in enumerate(bounds):
        ranked, passed, nan = (sum(i["bounds"][number][j] for i in task_infos) for j in range(3))
        steps.append(StepStats(b.label, b.metric, ranked, passed, ranked - passed, value=b.value, nan=nan))
    steps += [s.stats for s in selections]
    steps += list_step_stats(uid_lists, [[sum(i["lists"][n][j] for i in task_infos) for j in range(4)]
                                         for n in range(len(uid_lists))])
    nan_counts = {m: sum(i["nan"][m] for i in task_infos) for m in sources}
    distributed = {"executor": executor, "workers": workers, "tasks": len(spans), "rounds": rounds,
                   "ran": sum(1 for r in report.results if r and r["ran"]),
                   "seconds": round(time.perf_counter() - started, 3)}
    result = write_stats(out, pool_size, kept, mode, sources, nan_counts, steps, args, {"distributed": distributed})
    remove_parts(parts_dir, parts_root(out_dir))  # the parts are a second copy of the subset
    return result


@dataclass
class FilterLayout:
    """What fixes the final map's outputs; its hash names `<out>.parts/filter-<hash>`."""

    tables: list  # [name, files, (size, mtime_ns) per file]
    bounds: list
    cuts: list
    columns: list
    tasks: int
    lists: list  # [operation, source, (size, mtime_ns)] per uid list


def _reduce(selection: Selection, answers: list[dict], pool_size: int, mode: str, collect_rows: int) -> None:
    """Fold one round's answers for a step into its state: a narrower prefix, or the exact cut."""
    if selection.ranked is None:  # its first round: the counts, and the in-memory filter's shortfall error
        selection.ranked = sum(a["ranked"] for a in answers)
        selection.nan = sum(a["nan"] for a in answers)
        check_rankable(selection.step, selection.number, pool_size, selection.ranked, selection.nan, mode)
    need = selection.count - selection.above
    if selection.kind == "hist":
        hist = topk.sum_histograms(a["hist"] for a in answers)
        digit, above = topk.bucket_of_rank(hist, need)
        selection.above += above
        selection.prefix = (selection.prefix << topk.DIGIT_BITS) | digit
        selection.bits += topk.DIGIT_BITS
        if selection.bits == selection.bits_total or hist[digit] <= collect_rows:
            selection.kind = "collect"
        return
    parts = [a for a in answers if a["keys"] is not None]
    keys = np.concatenate([a["keys"] for a in parts])
    high = np.concatenate([a["high"] for a in parts])
    low = np.concatenate([a["low"] for a in parts])
    cut, uid_high, uid_low, dropped = topk.exact_cut(keys, high, low, need)
    k = selection.step
    kept = selection.count
    if k.keeps_ties:  # DataComp's rule: every row at the cut score is kept (the largest uid cut admits all)
        uid_high = uid_low = (1 << 64) - 1
        kept, dropped = kept + dropped, 0
    selection.cut = StepCut(k.metric, cut, uid_high, uid_low)
    selection.stats = StepStats("keep", k.metric, selection.ranked, kept, selection.ranked - kept,
                                fraction=fraction_text(k.fraction), nan=selection.nan,
                                threshold=topk.key_value(cut, selection.key_dtype), ties_dropped_by_uid=dropped,
                                rule=k.rule)


def _write_kept(out: Path, parts_dir: Path, names: list[str], columns, args: dict) -> int:
    """Stream the parts, in task order (= pool order), into kept.parquet; returns the rows written."""
    schema = with_meta(kept_schema(columns).empty_table(), {"filter": args}).schema
    rows = 0
    with atomic_path(out / "kept.parquet") as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd", write_statistics=False) as writer:
            for name in names:
                part = _open_part(parts_dir, name, part_file)
                for group in range(part.num_row_groups):
                    table = part.read_row_group(group)
                    rows += table.num_rows
                    writer.write_table(table.replace_schema_metadata(schema.metadata))
    return rows


def _open_part(parts_dir: Path, name: str, which) -> pq.ParquetFile:
    path = which(parts_dir, name)
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CurateError(f"{path}: output of a task marked done is missing or unreadable ({exc}); delete "
                          f"{Markers(parts_dir, STAGE).path(name)} and rerun") from None


def _write_uids(out: Path, parts_dir: Path, names: list[str], task_infos: list[dict], kept: int,
                pool_name: str) -> None:
    """uids.npy: every task's sorted kept uids merged one top byte at a time (DataComp's sorted `u8,u8`)."""
    parts = []
    for name, info in zip(names, task_infos):
        path = uids_file(parts_dir, name)
        try:
            pairs = np.load(path, mmap_mode="r") if info["kept"] else np.empty(0, DATACOMP_DTYPE)
        except (OSError, ValueError) as exc:
            raise CurateError(f"{path}: output of a task marked done is missing or unreadable ({exc}); delete "
                              f"{Markers(parts_dir, STAGE).path(name)} and rerun") from None
        if pairs.dtype != DATACOMP_DTYPE or len(pairs) != info["kept"]:
            raise CurateError(f"{path}: holds {len(pairs)} {pairs.dtype} uids, expected {info['kept']}; delete it "
                              f"and {Markers(parts_dir, STAGE).path(name)}, then rerun")
        parts.append((pairs, np.concatenate([[0], np.cumsum(info["buckets"])])))
    if sum(len(p) for p, _ in parts) != kept:
        raise CurateError(f"{parts_dir}: the parts hold {sum(len(p) for p, _ in parts)} uids for {kept} kept rows; "
                          "delete the directory and rerun")
    with atomic_path(out / "uids.npy") as tmp:
        if kept == 0:  # a memory map of 0 bytes cannot be made
            with open(tmp, "wb") as f:
                np.save(f, np.empty(0, DATACOMP_DTYPE))
            return
        target = np.lib.format.open_memmap(tmp, mode="w+", dtype=DATACOMP_DTYPE, shape=(kept,))
        row = 0
        for bucket in range(UID_BUCKETS):
            pieces = [pairs[offsets[bucket]:offsets[bucket + 1]] for pairs, offsets in parts]
            pieces = [p for p in pieces if len(p)]
            if not pieces:
                continue
            merged = np.concatenate(pieces)
            merged = sorted_uid_pairs(merged["f0"], merged["f1"])
            same = (merged["f0"][1:] == merged["f0"][:-1]) & (merged["f1"][1:] == merged["f1"][:-1])
            if same.any():
                first = merged[int(np.argmax(same))]
                raise CurateError(
                    f"{pool_name}: uid {int(first['f0']):016x}{int(first['f1']):016x} appears more than once "
                    f"({int(same.sum())} duplicate kept rows); a uid must name one sample: deduplicate the table "
                    "(or the shards it was scored from)")
            target[row:row + len(merged)] = merged
            row += len(merged)
        target.flush()
        del target
