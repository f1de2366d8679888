"""What the in-memory filter (local.py) and the map-task filter (tasks.py) both use: the keeps and bounds parsed
from their specs, the score tables read (files, metric columns, uid halves), the checks that make both paths
give the same errors, and the `stats.json` writer."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.atomic import write_text_atomic
from curate.io.tables import table_files
from curate.io.uids import uid_halves
from curate.stages.filter import FRACTION_RULES, MODES, FilterResult, StepStats

BATCH_ROWS = 1 << 20


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
        f = fraction_text(self.fraction)
        if self.rule == "datacomp":
            return f"int({f} x {pool_size}) + 1 = {self.count(pool_size)} (DataComp's rule)"
        return f"ceil({f} x {pool_size}) = {self.count(pool_size)}"


@dataclass(frozen=True)
class Bound:
    """`min`: keep score >= value; `max`: keep score <= value. `step` names it in stats.json (a drop step is a
    bound on its table's column)."""

    metric: str
    value: float
    kind: str
    step: str | None = None

    @property
    def label(self) -> str:
        return self.step or self.kind

    def passes(self, values: np.ndarray) -> np.ndarray:
        """Which scores pass (NaN compares False: never passes)."""
        return values >= self.value if self.kind == "min" else values <= self.value


def passed_drops(bounds: Sequence[Bound], values_of: Callable[[str], np.ndarray], rows: int) -> np.ndarray:
    """Rows passing the drop steps among `bounds` (--drop-duplicates, --drop-contaminated): what a union may add.
    `values_of(metric)` gives a metric's column."""
    passed = np.ones(rows, dtype=bool)
    for b in bounds:
        if b.step is not None:
            passed &= b.passes(values_of(b.metric))
    return passed


@dataclass(frozen=True)
class DropTable:
    """--drop-duplicates / --drop-contaminated: a table read for one column, as a bound on it."""

    path: Path
    column: str
    bound: Bound
    made_by: str  # the command that writes such a table

    @property
    def flag(self) -> str:
        return "--" + self.bound.label.replace("_", "-")


DROP_STEPS = {  # option -> (column, bound kind, value, made by)
    "drop_duplicates": ("semdedup_keep", "min", 1.0, "curate dedup"),
    "drop_contaminated": ("contaminated", "max", 0.0, "curate decontaminate"),
}


def drop_tables(values: dict[str, str | None]) -> list[DropTable]:
    """The drop steps given (option -> table path or None), in DROP_STEPS order."""
    tables = []
    for option_name, (column, kind, value, made_by) in DROP_STEPS.items():
        if values.get(option_name):
            tables.append(DropTable(Path(values[option_name]), column, Bound(column, value, kind, option_name),
                                    made_by))
    return tables


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
    if isinstance(table, DropTable):
        return str(table.path)
    if isinstance(table, list):
        return f"{table[0]} (+{len(table) - 1} more files with the same columns)"
    return str(table)


def score_table_files(path) -> list[Path]:
    """The Parquet files of a table argument (a file, a directory of them, or a list of files)."""
    if isinstance(path, DropTable):
        return score_table_files(path.path)
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


def scan_score_table(path) -> tuple[list[Path], list[int], list[str]]:
    """A table argument's files, rows per file and metric names, from the Parquet footers alone (a drop
    step's table: its one column)."""
    drop = path if isinstance(path, DropTable) else None
    path = path if isinstance(path, (list, DropTable)) else Path(path)
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
        if drop is not None:
            if drop.column not in names:
                raise CurateError(f"{f}: no numeric `{drop.column}` column (columns: {', '.join(schema.names)}); "
                                  f"{drop.flag} takes the table `{drop.made_by}` writes")
            names = [drop.column]
        if metric_names is None:
            metric_names = names
        elif names != metric_names:
            raise CurateError(f"{f}: numeric columns {names} differ from {files[0]}'s {metric_names}; "
                              "the tables of one directory must have the same columns")
        rows.append(pf.metadata.num_rows)
    assert metric_names is not None
    return files, rows, metric_names


def read_score_table(path) -> ScoreTable:
    """Read `uid` and every numeric column of a table (or of a directory or list of same-schema tables; a drop
    step's table: its one column)."""
    path = path if isinstance(path, (list, DropTable)) else Path(path)
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
                values = metric_values(batch.column(name))
                if name not in metrics:
                    metrics[name] = np.empty(total, values.dtype)
                metrics[name][row:row + n] = values
            row += n
    for name in metric_names:
        metrics.setdefault(name, np.empty(0, np.float32))
    return ScoreTable(table_name(path), files, rows, high, low, metrics)


def metric_values(column: pa.Array) -> np.ndarray:
    """A metric column as floats; a null becomes NaN (never kept). Integers become float64 (exact to 2^53)."""
    if pa.types.is_integer(column.type):
        column = column.cast(pa.float64())
    return column.to_numpy(zero_copy_only=False)


def metric_dtype(arrow_type: pa.DataType) -> np.dtype:
    """The dtype `metric_values` gives a column of this type (integers become float64)."""
    return np.dtype(np.float64) if pa.types.is_integer(arrow_type) else np.dtype(arrow_type.to_pandas_dtype())


# ---------------------------------------------------------------- uids and metrics across tables

def check_unique(table: ScoreTable, order: np.ndarray) -> None:
    """No uid twice among the table's rows (`order`: the rows in uid order); else an error naming an example."""
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


# ---------------------------------------------------------------- checks both paths make

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
            f"--keep {k.metric}:{fraction_text(k.fraction)} (step {number}) must rank {k.count_text(pool_size)} "
            f"rows of the pool, but only {ranked - nan} rows with a score "
            f"are left after {before} ({nan} NaN scores are never kept); fractions are of the whole pool, "
            "so lower this fraction (in sequential mode each --keep must not exceed the one before)")


def fraction_text(fraction: Fraction) -> str:
    """The fraction as the decimal the user wrote (Fractions from decimals terminate)."""
    text = format(Decimal(fraction.numerator) / Decimal(fraction.denominator), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# ---------------------------------------------------------------- stats.json

def write_stats(out: Path, pool_size: int, kept: int, mode: str, sources: dict[str, str],
                nan_counts: dict[str, int], steps: list[StepStats], args: dict,
                extra: dict | None = None) -> FilterResult:
    """Write `stats.json` (last: its presence means the subset is complete) and return the result."""
    stats = {"pool": pool_size, "kept": kept, "removed": pool_size - kept, "mode": mode,
             "order": "drops (--drop-duplicates, --drop-contaminated), thresholds (--min/--max, in order), keeps; "
                      "NaN never kept; ties by uid ascending; then the uid lists: ∩ --include-uids, ∪ --union "
                      "(never a dropped row), − --exclude-uids",
             "metrics": {name: {"table": sources[name], "nan": nan_counts.get(name, 0)} for name in sources},
             "steps": [{k: v for k, v in asdict(s).items() if v is not None} for s in steps],
             "args": args, **(extra or {})}
    write_text_atomic(out / "stats.json", json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return FilterResult(pool_size, kept, mode, steps, str(out),
                        {"uids": str(out / "uids.npy"), "kept": str(out / "kept.parquet"),
                         "stats": str(out / "stats.json")})

