"""`curate filter`: join score tables on uid, apply thresholds and top-fraction keeps, write a subset.

Selection rule (README "Filtering"):
1. The pool is the rows of the first table, in its order (the pool order); every other table, and the
   inline NormSim scores, must hold exactly the same uids. A table argument may be a directory: its
   `*.parquet` files, sorted by name, are read as one table. Every numeric column except `uid` is a metric.
2. `--min METRIC:X` keeps rows with score >= X, `--max METRIC:X` rows with score <= X, in the order given,
   before any keep. NaN never passes a threshold.
3. `--keep METRIC:F` keeps exactly ceil(F * N) rows, N = the whole pool (before thresholds), F in (0, 1]
   read as the decimal that was written (0.07 of 100 is 7, where float arithmetic gives 8). Higher scores are better; NaN is
   never kept; ties at the cut are broken by uid ascending (as 32-hex strings, i.e. as 128-bit numbers).
   `--fraction-rule datacomp` instead applies DataComp's rule (baselines/apply_filter.py, get_threshold):
   the threshold is the (int(F * N) + 1)-th largest score, F * N in float arithmetic, and every row scoring
   at least that is kept, ties included: int(F * N) + 1 rows without ties (121 of 400 at F = 0.3, not 120),
   so that a DataComp baseline's uid file is reproduced exactly.
   - sequential (default): each keep ranks what the previous steps left.
   - independent (DataComp style): each keep ranks what the thresholds left; the subset is the intersection.
   A keep that must rank fewer non-NaN rows than it has to keep is an error, not a silent shortfall: in
   sequential mode the fractions are of the whole pool, so they must not grow from step to step.

Scale: uids are parsed from Arrow buffers into two uint64 halves (no Python object per row). The first
table is sorted by uid once (duplicate check, and the sorted uids.npy comes from that order); another
table is aligned by one more sort, unless it lists the uids in the pool order (then it is a comparison).
A keep is a linear-time `np.partition` plus a uid sort of the tied rows only. Memory is O(N): uid halves,
metric columns and index arrays. Measured on 10^7 rows, one table with two float32 metrics,
`--keep 0.3 --keep 0.2`: 12 s on 2 cores, peak RSS 1.26 GiB (~130 bytes per row; 10^8 rows ~13 GiB).
With --executor ray, --workers > 1 or --tasks, curate/stages/filter_distributed.py computes the same
outputs in map tasks over row-aligned tables (radix select), never holding a whole score column.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.atomic import atomic_path, write_text_atomic
from curate.io.tables import EmbeddingPool, read_meta, table_files, write_table_atomic
from curate.io.uids import DATACOMP_DTYPE, uid_halves
from curate.run.mapreduce import check_task_options

MODES = ("sequential", "independent")
FRACTION_RULES = ("exact", "datacomp")
BATCH_ROWS = 1 << 20
# hex digit (ASCII code) -> nibble value; 255 marks a character that is not lowercase hex


# ---------------------------------------------------------------- parameters

@dataclass(frozen=True)
class KeepStep:
    """Keep the top `fraction` of the whole pool by `metric`: exactly ceil(fraction * N) rows (rule `exact`),
    or every row scoring at least the (int(fraction * N) + 1)-th largest score (rule `datacomp`)."""

    metric: str
    fraction: Fraction
    rule: str = "exact"

    def count(self, pool_size: int) -> int:
        """exact: the rows kept; datacomp: the rank of the threshold score (ties at it are kept too)."""
        if self.rule == "datacomp":
            return int(pool_size * float(self.fraction)) + 1  # DataComp: n = int(len(df) * fraction); sorted[n]
        return math.ceil(self.fraction * pool_size)

    @property
    def keeps_ties(self) -> bool:
        return self.rule == "datacomp"

    def count_text(self, pool_size: int) -> str:
        f = _fraction_text(self.fraction)
        if self.rule == "datacomp":
            return f"int({f} x {pool_size}) + 1 = {self.count(pool_size)} (DataComp's rule)"
        return f"ceil({f} x {pool_size}) = {self.count(pool_size)}"


@dataclass(frozen=True)
class Bound:
    """`min`: keep score >= value; `max`: keep score <= value."""

    metric: str
    value: float
    kind: str


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
    metric, sep, value = spec.rpartition(":")
    if not sep or not metric or not value:
        raise CurateError(f"{flag} {spec!r}: expected METRIC:VALUE, e.g. {flag} negclip:0.3")
    return metric, value


def parse_keep(spec: str, rule: str = "exact") -> KeepStep:
    """`negclip:0.3` -> KeepStep; the fraction must be in (0, 1]."""
    if rule not in FRACTION_RULES:
        raise CurateError(f"--fraction-rule {rule!r}: choose exact (ceil(F·N) rows, ties by uid) or datacomp "
                          "(DataComp's apply_filter threshold, ties kept)")
    metric, value = _split_spec(spec, "--keep")
    try:
        fraction = Fraction(Decimal(value.strip()))
    except (InvalidOperation, ValueError, OverflowError):
        raise CurateError(f"--keep {spec!r}: {value!r} is not a number; give a fraction in (0, 1]") from None
    if not 0 < fraction <= 1:
        raise CurateError(f"--keep {spec!r}: the fraction must be in (0, 1] (it is a share of the pool: "
                          "0.3 keeps 30 %); to drop a metric's influence leave the --keep out")
    return KeepStep(metric, fraction, rule)


def parse_bound(spec: str, kind: str) -> Bound:
    metric, value = _split_spec(spec, f"--{kind}")
    try:
        number = float(value)
    except ValueError:
        raise CurateError(f"--{kind} {spec!r}: {value!r} is not a number") from None
    if math.isnan(number):
        raise CurateError(f"--{kind} {spec!r}: the threshold is NaN; give a number")
    return Bound(metric, number, kind)


# ---------------------------------------------------------------- uids as two uint64 halves

def uid_order(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """Indices that sort the uids ascending. Random uids almost never share a high half, so one
    argsort of it usually suffices (about twice as fast as a two-key lexsort)."""
    order = np.argsort(high)
    sorted_high = high[order]
    if len(order) > 1 and (sorted_high[1:] == sorted_high[:-1]).any():
        order = np.lexsort((low, high))
    return order


def sorted_uid_pairs(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """DataComp's subset array: structured `u8,u8` (high, low), sorted."""
    order = uid_order(high, low)
    pairs = np.empty(len(order), dtype=DATACOMP_DTYPE)
    pairs["f0"], pairs["f1"] = high[order], low[order]
    return pairs


# ---------------------------------------------------------------- reading score tables

@dataclass
class ScoreTable:
    """One table argument read into memory: uid halves and numeric columns, in its row order."""

    name: str
    files: list[Path]
    file_rows: list[int]
    high: np.ndarray
    low: np.ndarray
    metrics: dict[str, np.ndarray]

    def file_of_row(self, row: int) -> Path:
        return self.files[int(np.searchsorted(np.cumsum(self.file_rows), row, side="right"))]


TableArgument = "str | Path | list[Path]"  # a file, a directory of same-schema files, or such files listed


def group_table_arguments(tables: Sequence[str | Path]) -> list:
    """Table arguments as tables: a directory is one table; files given one after the other that have the same
    numeric columns (a shell glob over one table's parts, e.g. `dcmeta/*.parquet` of DataComp's metadata) are
    one table too, in the order given. Anything else stays as it is (a missing file gets its error later)."""
    groups: list = []
    previous = None
    for table in tables:
        path = Path(table)
        columns = None
        if path.is_file():
            try:
                columns = _numeric_columns(pq.read_schema(path))
            except (OSError, pa.ArrowInvalid):
                columns = None
        if columns is not None and previous is not None and columns == previous and isinstance(groups[-1], list):
            groups[-1].append(path)
        else:
            groups.append([path] if columns is not None else table)
        previous = columns
    return [g[0] if isinstance(g, list) and len(g) == 1 else g for g in groups]


def table_name(table) -> str:
    """How messages and stats.json name a table argument (a group of files: the first and the count)."""
    if isinstance(table, list):
        return f"{table[0]} (+{len(table) - 1} more files with the same columns)"
    return str(table)


def score_table_files(path) -> list[Path]:
    if isinstance(path, list):
        return [Path(p) for p in path]
    if path.is_dir():
        files = table_files(path)
        if not files:
            raise CurateError(f"{path}: directory holds no *.parquet score tables")
        return files
    if not path.is_file():
        raise CurateError(f"{path}: no such score table")
    return [path]


def _numeric_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema
            if f.name != "uid" and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]


def scan_score_table(path: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """A table argument's files, rows per file and metric names, from the Parquet footers alone."""
    path = path if isinstance(path, list) else Path(path)
    files = score_table_files(path)
    metric_names: list[str] | None = None
    rows = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (OSError, pa.ArrowInvalid) as exc:
            raise CurateError(f"{f}: not a readable Parquet table ({exc})") from None
        schema = pf.schema_arrow
        if "uid" not in schema.names:
            raise CurateError(f"{f}: no `uid` column (columns: {', '.join(schema.names)}); "
                              "a score table needs `uid` plus one numeric column per metric")
        names = _numeric_columns(schema)
        if metric_names is None:
            metric_names = names
        elif names != metric_names:
            raise CurateError(f"{f}: numeric columns {names} differ from {files[0]}'s {metric_names}; "
                              "the tables of one directory must have the same columns")
        rows.append(pf.metadata.num_rows)
    assert metric_names is not None
    return files, rows, metric_names


def read_score_table(path: str | Path) -> ScoreTable:
    """Read `uid` and every numeric column of a table (or of a directory or list of same-schema tables)."""
    path = path if isinstance(path, list) else Path(path)
    files, rows, metric_names = scan_score_table(path)
    total = sum(rows)
    high, low = np.empty(total, np.uint64), np.empty(total, np.uint64)
    metrics: dict[str, np.ndarray] = {}
    row = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=["uid", *metric_names]):
            n = batch.num_rows
            high[row:row + n], low[row:row + n] = uid_halves(batch.column("uid"), str(f))
            for name in metric_names:
                values = _to_numpy(batch.column(name))
                if name not in metrics:
                    metrics[name] = np.empty(total, values.dtype)
                metrics[name][row:row + n] = values
            row += n
    for name in metric_names:
        metrics.setdefault(name, np.empty(0, np.float32))
    return ScoreTable(table_name(path), files, rows, high, low, metrics)


def _to_numpy(column: pa.Array) -> np.ndarray:
    """A metric column as floats; a null becomes NaN (never kept). Integers become float64 (exact to 2^53)."""
    if pa.types.is_integer(column.type):
        column = column.cast(pa.float64())
    return column.to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- the join

def check_unique(table: ScoreTable, order: np.ndarray) -> None:
    h, lo = table.high[order], table.low[order]
    same = (h[1:] == h[:-1]) & (lo[1:] == lo[:-1])
    if same.any():
        row = int(order[int(np.argmax(same)) + 1])
        hint = "deduplicate the table (or the shards it was scored from)"
        if len(table.files) > 1 and not Path(table.name).is_dir():
            hint = ("its files were read as the parts of one table, having the same columns; if they are score "
                    "tables of one pool, give each metric once (rename or drop one of the columns)")
        raise CurateError(
            f"{table.file_of_row(row)}: uid {table.high[row]:016x}{table.low[row]:016x} appears more than once "
            f"({int(same.sum())} duplicate rows in {table.name}); a uid must name one sample: {hint}")


def align_to_pool(pool: ScoreTable, pool_order: np.ndarray, other: ScoreTable) -> np.ndarray | None:
    """Row indices of `other` in pool order (None when it already is in pool order)."""
    if np.array_equal(other.high, pool.high) and np.array_equal(other.low, pool.low):
        return None
    order = uid_order(other.high, other.low)
    check_unique(other, order)
    if len(order) != len(pool_order) or not (np.array_equal(other.high[order], pool.high[pool_order])
                                             and np.array_equal(other.low[order], pool.low[pool_order])):
        pool_keys = _uid_keys(pool.high, pool.low)
        other_keys = _uid_keys(other.high, other.low)
        missing = int((~np.isin(pool_keys, other_keys)).sum())
        extra = int((~np.isin(other_keys, pool_keys)).sum())
        raise CurateError(
            f"{other.name}: its uids differ from the pool's ({pool.name}, {len(pool.high)} rows): "
            f"{missing} pool uids are missing from it and {extra} of its {len(other.high)} uids are not in the "
            "pool; join only tables scored from the same embedding tables")
    rows = np.empty(len(order), dtype=np.int64)
    rows[pool_order] = order
    return rows


def _uid_keys(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """(high, low) -> sortable 16-byte keys; only used to count mismatches for an error message."""
    return np.stack([high, low], axis=1).astype(">u8").view("S16").ravel()


@dataclass
class JoinedPool:
    high: np.ndarray
    low: np.ndarray
    metrics: dict[str, np.ndarray]
    sources: dict[str, str]  # metric -> table it came from
    reference: ScoreTable  # the first table: pool order and uid strings come from it
    uid_sorted: np.ndarray  # row indices in ascending uid order

    def uid_pairs(self, mask: np.ndarray) -> np.ndarray:
        """DataComp's sorted `u8,u8` array of the rows in `mask`, without sorting again."""
        rows = self.uid_sorted[mask[self.uid_sorted]]
        pairs = np.empty(len(rows), dtype=DATACOMP_DTYPE)
        pairs["f0"], pairs["f1"] = self.high[rows], self.low[rows]
        return pairs

    @property
    def size(self) -> int:
        return len(self.high)


def join_tables(tables: Sequence[ScoreTable]) -> JoinedPool:
    """Join tables on uid into the first table's row order; duplicate, missing or extra uids are errors."""
    if not tables:
        raise CurateError("give at least one score table")
    pool = tables[0]
    if len(pool.high) == 0:
        raise CurateError(f"{pool.name}: the score table has no rows; nothing to filter")
    pool_order = uid_order(pool.high, pool.low)
    check_unique(pool, pool_order)
    sources = metric_sources([(table.name, list(table.metrics)) for table in tables])
    metrics: dict[str, np.ndarray] = {}
    for table in tables:
        rows = None if table is pool else align_to_pool(pool, pool_order, table)
        for name, values in table.metrics.items():
            metrics[name] = values if rows is None else values[rows]
    return JoinedPool(pool.high, pool.low, metrics, sources, pool, pool_order)


def metric_sources(tables: Sequence[tuple[str, Sequence[str]]]) -> dict[str, str]:
    """metric -> the table (name) it comes from, in table then column order; a metric twice is an error."""
    sources: dict[str, str] = {}
    for table, names in tables:
        for name in names:
            if name in sources:
                raise CurateError(f"metric `{name}` is in both {sources[name]} and {table}; "
                                  "give each metric once (rename or drop one of the columns)")
            sources[name] = table
    return sources


# ---------------------------------------------------------------- selection (pure, on arrays)

@dataclass
class StepStats:
    step: str  # "min", "max" or "keep"
    metric: str
    ranked: int  # rows the step looked at
    kept: int
    removed: int
    value: float | None = None  # the --min/--max threshold
    fraction: str | None = None  # the --keep fraction as written
    nan: int = 0  # rows among `ranked` whose score is NaN (never kept)
    threshold: float | None = None  # keep: the lowest kept score (the score at the cut)
    ties_dropped_by_uid: int = 0  # keep: rows scoring exactly `threshold` left out by the uid tie-break
    rule: str | None = None  # keep: the fraction rule (exact, datacomp)


def top_rows(scores: np.ndarray, high: np.ndarray, low: np.ndarray, candidates: np.ndarray,
             count: int, keep_ties: bool = False) -> tuple[np.ndarray, float, int]:
    """The `count` candidates with the highest scores (ties: smaller uid first), as sorted row indices;
    `keep_ties`: also every other candidate scoring the cut score (DataComp's rule).

    Returns (rows, score at the cut, tied rows left out). Linear time except for the sort of tied rows.
    """
    values = scores[candidates]
    finite = ~np.isnan(values)
    rows, values = candidates[finite], values[finite]
    if count > len(rows):
        raise ValueError("count exceeds the rankable rows")
    if count == len(rows):
        cut = values.min() if count else math.nan
        return np.sort(rows), float(cut) + 0.0, 0  # + 0.0: either zero at the cut reads +0.0
    cut = np.partition(values, len(values) - count)[len(values) - count]  # the count-th largest score
    if keep_ties:
        return np.sort(rows[values >= cut]), float(cut) + 0.0, 0
    above = rows[values > cut]
    tied = rows[values == cut]
    need = count - len(above)
    tied = tied[np.lexsort((low[tied], high[tied]))]
    chosen = np.concatenate([above, tied[:need]])
    return np.sort(chosen), float(cut) + 0.0, len(tied) - need


def select(metrics: dict[str, np.ndarray], high: np.ndarray, low: np.ndarray, keeps: Sequence[KeepStep],
           bounds: Sequence[Bound] = (), mode: str = "sequential") -> tuple[np.ndarray, list[StepStats]]:
    """Apply thresholds then keeps (see the module docstring); returns (kept row indices ascending, stats)."""
    check_selection(metrics, keeps, bounds, mode)
    pool_size = len(high)
    rows = np.arange(pool_size)
    stats: list[StepStats] = []
    for b in bounds:
        values = metrics[b.metric][rows]
        passed = values >= b.value if b.kind == "min" else values <= b.value  # NaN compares False: removed
        stats.append(StepStats(b.kind, b.metric, len(rows), int(passed.sum()), int((~passed).sum()),
                               value=b.value, nan=int(np.isnan(values).sum()) if values.dtype.kind == "f" else 0))
        rows = rows[passed]
    after_bounds = rows
    kept_sets = []
    for number, k in enumerate(keeps, 1):
        candidates = rows if mode == "sequential" else after_bounds
        scores = metrics[k.metric]
        if scores.dtype.kind != "f":
            scores = scores.astype(np.float64)
        count = k.count(pool_size)
        nan = int(np.isnan(scores[candidates]).sum())
        check_rankable(k, number, pool_size, len(candidates), nan, mode)
        chosen, cut, ties = top_rows(scores, high, low, candidates, count, k.keeps_ties)
        stats.append(StepStats("keep", k.metric, len(candidates), len(chosen), len(candidates) - len(chosen),
                               fraction=_fraction_text(k.fraction), nan=nan, threshold=cut,
                               ties_dropped_by_uid=ties, rule=k.rule))
        if mode == "sequential":
            rows = chosen
        else:
            kept_sets.append(chosen)
    if mode == "independent" and kept_sets:
        rows = kept_sets[0]
        for other in kept_sets[1:]:
            rows = np.intersect1d(rows, other, assume_unique=True)
    return rows, stats


def check_selection(metrics, keeps: Sequence[KeepStep], bounds: Sequence[Bound], mode: str) -> None:
    """A known mode, and every metric the steps name among `metrics` (any container of names)."""
    if mode not in MODES:
        raise CurateError(f"--mode {mode!r}: choose sequential or independent")
    for name in [b.metric for b in bounds] + [k.metric for k in keeps]:
        if name not in metrics:
            raise CurateError(f"unknown metric {name!r}; the tables have: {', '.join(sorted(metrics)) or 'none'}")


def check_rankable(k: KeepStep, number: int, pool_size: int, ranked: int, nan: int, mode: str) -> None:
    """Keep step `number` must find its count among the `ranked - nan` rows with a score."""
    count = k.count(pool_size)
    if count > ranked - nan:
        before = "the thresholds and earlier keeps" if mode == "sequential" else "the thresholds"
        raise CurateError(
            f"--keep {k.metric}:{_fraction_text(k.fraction)} (step {number}) must rank {k.count_text(pool_size)} "
            f"rows of the pool, but only {ranked - nan} rows with a score "
            f"are left after {before} ({nan} NaN scores are never kept); fractions are of the whole pool, "
            "so lower this fraction (in sequential mode each --keep must not exceed the one before)")


def _fraction_text(fraction: Fraction) -> str:
    """The fraction as the decimal the user wrote (Fractions from decimals terminate)."""
    text = format(Decimal(fraction.numerator) / Decimal(fraction.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# ---------------------------------------------------------------- the stage

@dataclass
class FilterResult:
    pool: int
    kept: int
    mode: str
    steps: list[StepStats]
    out_dir: str
    files: dict[str, str] = field(default_factory=dict)


def inline_normsim(tables: Sequence[ScoreTable], p: str, target: str, emb: str | Path | None,
                   normsim_fn: Callable | None = None, info: dict | None = None) -> ScoreTable:
    """Compute NormSim_p over the embedding tables as one more score table (column `normsim_<p>`).

    `emb` defaults to the embedding directory the score tables record (`curate score` writes it as `source`).
    `info`, when given, receives what `normsim_scores` used (the target's kind, source, rows and digest).
    """
    from curate.stages.normsim import NormsimConfig, column_name
    from curate.stages.normsim.local import normsim_scores

    name = column_name(p)
    if emb is None:
        recorded = [_recorded_embeddings(f) for t in tables for f in t.files]
        recorded = [r for r in recorded if r]
        if not recorded:
            raise CurateError("--normsim needs the embedding tables: give --emb EMB_DIR (the score tables do not "
                              "record an embedding directory that exists)")
        emb = recorded[0]
    pool = EmbeddingPool(emb)
    scores = np.asarray(normsim_fn(pool, target, p) if normsim_fn
                        else normsim_scores(pool, NormsimConfig(target=target, p=p), info=info))
    files = pool.files
    high_parts, low_parts = [], []
    for f in files:
        h, lo = uid_halves(pq.read_table(f, columns=["uid"]).column("uid"), str(f))
        high_parts.append(h)
        low_parts.append(lo)
    high, low = np.concatenate(high_parts), np.concatenate(low_parts)
    if len(scores) != len(high):
        raise CurateError(f"{emb}: NormSim returned {len(scores)} scores for {len(high)} rows")
    return ScoreTable(f"{emb} (inline {name})", list(files), list(pool.file_rows), high, low, {name: scores})


def _recorded_embeddings(path: Path) -> str | None:
    """The embedding directory a score table says it was computed from, when it still exists."""
    source = read_meta(path).get("source")
    return source if isinstance(source, str) and Path(source).is_dir() else None


def filter_pool(tables: Sequence[str | Path], out_dir: str | Path, keeps: Sequence[str] = (),
                mins: Sequence[str] = (), maxs: Sequence[str] = (), mode: str = "sequential",
                normsim: str | None = None, target: str | None = None, emb: str | Path | None = None,
                normsim_fn: Callable | None = None, *, executor: str = "local", workers: int = 1,
                tasks: int | None = None, retries: int = 1, ray_address: str | None = None,
                rank: int | None = None, world_size: int | None = None,
                fraction_rule: str = "exact") -> FilterResult:
    """Read, join, select and write `uids.npy`, `kept.parquet` and `stats.json` (last) into `out_dir`.

    With --executor ray, --workers > 1 or --tasks the same selection runs as map tasks over row-aligned
    tables (curate.stages.filter_distributed), with the same outputs.
    """
    keep_steps = [parse_keep(s, fraction_rule) for s in keeps]
    bounds = [parse_bound(s, "min") for s in mins] + [parse_bound(s, "max") for s in maxs]
    if mode not in MODES:
        raise CurateError(f"--mode {mode!r}: choose sequential or independent")
    if not keep_steps and not bounds:
        raise CurateError("nothing to select: give at least one --keep METRIC:FRACTION, --min or --max")
    if normsim is not None and target is None:
        raise CurateError("--normsim needs --target (image embeddings: an embedding dir or a .npy/.pt/.parquet "
                          "matrix; imagenet-text; or none with 2d)")
    if not tables:
        raise CurateError("give at least one score table")
    if rank is not None or world_size is not None:
        raise CurateError("curate filter: --rank/--world-size cannot split the filter, whose rounds (one per "
                          "radix digit of each --keep) each need every task's counts; run one driver with "
                          "--executor ray (or --workers N, --tasks T): it submits each round's map tasks itself")
    args = {"tables": [str(t) for t in tables], "keep": list(keeps), "min": list(mins), "max": list(maxs),
            "mode": mode, "normsim": normsim, "target": target, "emb": str(emb) if emb is not None else None,
            "fraction_rule": fraction_rule}
    tables = group_table_arguments(tables)
    check_task_options(workers, tasks, retries)
    if executor not in ("local", "ray"):
        raise CurateError(f"--executor {executor!r}: choose local or ray")
    # mapreduce.wants_tasks without ranks: a Slurm array's variables do not switch the filter over
    if executor != "local" or int(workers) > 1 or tasks is not None:
        if normsim is not None:
            raise CurateError("--normsim computes NormSim in memory, which the distributed filter (--executor ray, "
                              "--workers, --tasks) avoids: run `curate normsim` first and pass its table")
        from curate.stages.filter_distributed import filter_distributed

        return filter_distributed(tables, out_dir, keep_steps, bounds, mode, args, executor=executor,
                                  workers=int(workers), tasks=tasks, retries=int(retries), ray_address=ray_address)

    score_tables = [read_score_table(t) for t in tables]
    normsim_info: dict = {}
    if normsim is not None:
        score_tables.append(inline_normsim(score_tables, normsim, target, emb, normsim_fn, normsim_info))
    inline = {"normsim": {"p": normsim, **normsim_info}} if normsim_info else {}
    pool = join_tables(score_tables)
    rows, steps = select(pool.metrics, pool.high, pool.low, keep_steps, bounds, mode)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(pool.size, dtype=bool)
    mask[rows] = True
    kept = pa.table({"uid": _kept_uids(pool.reference, mask),
                     **{name: values[rows] for name, values in pool.metrics.items()}})
    write_table_atomic(kept, out / "kept.parquet", meta={"filter": args, **inline})
    with atomic_path(out / "uids.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, pool.uid_pairs(mask))
    nan_counts = {name: int(np.isnan(v).sum()) for name, v in pool.metrics.items() if v.dtype.kind == "f"}
    return write_stats(out, pool.size, len(rows), mode, pool.sources, nan_counts, steps, args, inline)


def write_stats(out: Path, pool_size: int, kept: int, mode: str, sources: dict[str, str],
                nan_counts: dict[str, int], steps: list[StepStats], args: dict,
                extra: dict | None = None) -> FilterResult:
    """Write `stats.json` (last: its presence means the subset is complete) and return the result."""
    stats = {"pool": pool_size, "kept": kept, "removed": pool_size - kept, "mode": mode,
             "order": "thresholds (--min/--max, in order) then keeps; NaN never kept; ties by uid ascending",
             "metrics": {name: {"table": sources[name], "nan": nan_counts.get(name, 0)} for name in sources},
             "steps": [{k: v for k, v in asdict(s).items() if v is not None} for s in steps],
             "args": args, **(extra or {})}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return FilterResult(pool_size, kept, mode, steps, str(out),
                        {"uids": str(out / "uids.npy"), "kept": str(out / "kept.parquet"),
                         "stats": str(out / "stats.json")})


def _kept_uids(table: ScoreTable, mask: np.ndarray) -> pa.Array:
    """The uid strings of the kept rows, re-read from the first table in batches (pool order)."""
    parts = []
    row = 0
    for f in table.files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=["uid"]):
            n = batch.num_rows
            parts.append(pc.filter(batch.column("uid"), pa.array(mask[row:row + n])).cast(pa.string()))
            row += n
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())
