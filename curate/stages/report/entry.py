"""`curate report`'s entry: discover the run directory's files, compute the plots and galleries, render the page
(`run`)."""

from __future__ import annotations

import base64
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import __version__
from curate.config import check_config
from curate.errors import CurateError
from curate.io.atomic import write_text_atomic
from curate.io.tables import read_meta, table_files
from curate.stages.report import ReportConfig, ReportResult

KNOWN_METRICS = ("clipscore", "negclip", "normsim_inf", "normsim_2", "normsim_2d", "clone_prob", "p_match",
                 "uncertainty")
SCATTER_AXES = ("clipscore", "negclip")
CURVE_FILES = ("train.json", "history.json", "curve.json")
SUBSET_FILES = ("stats.json", "uids.npy", "kept.parquet")
TRUTH_COLOURS = {"clean": "#4c78a8", "swapped": "#e45756", "generic": "#f58518", "noise_image": "#b279a2",
                 "partial_mismatch": "#ff9da6", "clone": "#54a24b", "duplicate": "#9d755d", "semantic_twin": "#72b7b2",
                 "planted": "#eeca3b", "unknown": "#bab0ac"}
EXTRA_COLOURS = ("#79706e", "#d67195", "#439894", "#8c6d31", "#393b79", "#637939")
SUBSET_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")
CAPTION_CHARS = 160
MAX_RAW_JSON_CHARS = 20_000
MAX_CURVES = 40
# Only data: images and inline styles may load; anything else the page might reference is blocked.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ---------------------------------------------------------------- discovery

@dataclass
class Sources:
    run_dir: Path
    run_json: Path | None = None
    manifest: Path | None = None
    score_tables: list[Path] = field(default_factory=list)
    emb_dir: Path | None = None
    shard_spec: str | None = None
    subset_dirs: list[Path] = field(default_factory=list)
    compare_dir: Path | None = None
    curve_files: list[Path] = field(default_factory=list)


def _score_table_paths(run_dir: Path) -> list[Path]:
    found = [p for p in table_files(run_dir) if p.is_file()]
    return sorted(found, key=lambda p: (p.name != "scores.parquet", p.name))


def discover(run_dir: str | Path, scores: Sequence[str | Path] = (), subsets: Sequence[str | Path] = (),
             shards: str | None = None, emb: str | Path | None = None) -> Sources:
    """Find the inputs of a report in RUN_DIR following the rules of the module docstring."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CurateError(f"{run}: no such run directory; give the directory `curate run` wrote")
    src = Sources(run)
    if (run / "run.json").is_file():
        src.run_json = run / "run.json"
    if (run / "corpus" / "manifest.json").is_file():
        src.manifest = run / "corpus" / "manifest.json"
    for given in scores:
        if not Path(given).exists():
            raise CurateError(f"--scores {given}: no such score table or directory")
    src.score_tables = [Path(s) for s in scores] if scores else _score_table_paths(run)
    emb_dir = Path(emb) if emb is not None else run / "emb"
    if emb is not None and not emb_dir.exists():
        raise CurateError(f"--emb {emb_dir}: no such embedding directory")
    src.emb_dir = emb_dir if emb_dir.exists() else None
    if shards is not None:
        src.shard_spec = shards
    elif any((run / "corpus").glob("*.tar")):
        src.shard_spec = str(run / "corpus")
    if subsets:
        for s in subsets:
            if not Path(s).is_dir():
                raise CurateError(f"--subset {s}: not a directory; give a `curate filter` output directory")
        src.subset_dirs = [Path(s) for s in subsets]
    else:
        src.subset_dirs = sorted(d for d in (run / "subsets").glob("*")
                                 if d.is_dir() and any((d / f).is_file() for f in SUBSET_FILES))
    if (run / "compare").is_dir():
        src.compare_dir = run / "compare"
    curves: list[Path] = []
    for name in CURVE_FILES:
        curves += (run / "students").glob(f"*/{name}")
        curves += (run / "compare").rglob(name)
    src.curve_files = sorted(set(curves))
    return src


# ---------------------------------------------------------------- the joined pool

@dataclass
class Subset:
    name: str
    path: Path
    stats: dict
    kept: np.ndarray  # bool per pool row
    main_metric: str | None
    thresholds: list[tuple[str, float, str]]  # (metric, cut score, step label such as "keep negclip:0.3")
    notes: list[str] = field(default_factory=list)


@dataclass
class Pool:
    uids: np.ndarray  # object array of str
    metrics: dict[str, np.ndarray]  # float64, NaN where missing
    truth: np.ndarray | None  # object array of str, or None when no truth is known
    table_meta: list[tuple[str, dict]]
    other_columns: list[str]


def _read_table(path: Path, columns: list[str] | None = None) -> pa.Table:
    files = table_files(path) if path.is_dir() else [path]
    if not files:
        raise CurateError(f"{path}: directory holds no *.parquet tables")
    try:
        return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
    except (OSError, pa.ArrowInvalid) as exc:
        raise CurateError(f"{path}: not a readable Parquet table ({exc})") from None


def _schema(path: Path) -> pa.Schema:
    first = path if path.is_file() else min((p for p in path.glob("*.parquet") if not p.name.startswith(".")),
                                            default=None)
    if first is None:
        raise CurateError(f"{path}: directory holds no *.parquet tables")
    try:
        return pq.read_schema(first)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CurateError(f"{path}: not a readable Parquet table ({exc})") from None


def _numeric(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if f.name != "uid" and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]


def _check_unique(uids: pa.ChunkedArray, where: Path) -> None:
    distinct = pc.count_distinct(uids).as_py()
    if distinct != len(uids):
        raise CurateError(f"{where}: {len(uids) - distinct} duplicate uids; a uid must name one sample "
                          "(deduplicate the table or the shards it came from)")


def _read_truth(emb_dir: Path) -> tuple[pa.Table | None, str | None]:
    """uid -> truth kind from the embedding tables' `json` column (None and a note when unavailable)."""
    from curate.io.tables import EmbeddingPool
    from curate.stages.truth import pool_truth

    try:
        pool = EmbeddingPool(emb_dir)
    except CurateError as exc:
        return None, f"no truth: {exc}"
    uids, truth = pool_truth(pool)
    if all(t == "unknown" for t in truth):
        return None, f"no truth: the embedding tables in {emb_dir} have no `json` column with a `truth` field"
    _, first = np.unique(uids.astype(str), return_index=True)
    if len(first) < len(uids):  # a uid twice in the shards: its first row's truth is used, as a join needs one
        first.sort()
        uids, truth = uids[first], truth[first]
    table = pa.table({"uid": pa.array(uids.tolist(), pa.string()),
                      "__truth": pa.array(truth.tolist(), pa.string())})
    return table, None


def build_pool(src: Sources, subset_metrics: set[str], notes: list[str]) -> Pool | None:
    """Join the score tables (and the truth) on uid in the first table's row order."""
    tables: list[tuple[Path, list[str], pa.Schema]] = []
    for path in src.score_tables:
        schema = _schema(path)
        if "uid" not in schema.names:
            notes.append(f"{path.name}: skipped, it has no `uid` column")
            continue
        tables.append((path, _numeric(schema), schema))
    truth_table, truth_note = _read_truth(src.emb_dir) if src.emb_dir is not None else (None, None)
    if truth_note:
        notes.append(truth_note)
    if not tables and truth_table is None:
        return None

    metrics_order: list[str] = []
    other: list[str] = []
    wanted_by_table: list[list[str]] = []
    for path, numeric, _ in tables:
        wanted = []
        for name in numeric:
            if name in metrics_order or name in wanted:
                notes.append(f"{path.name}: column `{name}` is also in an earlier table; the first one is used")
            elif name in KNOWN_METRICS or name in subset_metrics:
                wanted.append(name)
            else:
                other.append(name)
        metrics_order += wanted
        wanted_by_table.append(wanted)

    if tables:
        first = _read_table(tables[0][0], ["uid"])
        pool_uids = first.column("uid")
        _check_unique(pool_uids, tables[0][0])
    else:
        pool_uids = truth_table.column("uid")
    n = len(pool_uids)
    joined = pa.table({"uid": pool_uids.cast(pa.string()), "__row": pa.array(np.arange(n, dtype=np.int64))})
    table_meta = []
    for (path, _, _), wanted in zip(tables, wanted_by_table):
        meta = read_meta(path if path.is_file() else _first_parquet(path))
        table_meta.append((str(path), meta))
        if not wanted:
            continue
        t = _read_table(path, ["uid", *wanted])
        _check_unique(t.column("uid"), path)
        t = t.set_column(0, "uid", t.column("uid").cast(pa.string()))
        joined = joined.join(t, "uid", join_type="left outer")
        missing = int(joined.column(wanted[0]).null_count)
        if missing:
            notes.append(f"{path.name}: {missing} of the pool's {n} uids have no row in it (shown as missing)")
    if truth_table is not None:
        joined = joined.join(truth_table, "uid", join_type="left outer")
    joined = joined.sort_by("__row")
    metrics = {}
    for name in metrics_order:
        col = joined.column(name)
        metrics[name] = col.cast(pa.float64()).to_numpy(zero_copy_only=False)  # null -> NaN
    truth = None
    if truth_table is not None:
        truth = np.asarray(joined.column("__truth").fill_null("unknown").to_pylist(), dtype=object)
    uids = np.asarray(joined.column("uid").to_pylist(), dtype=object)
    if other:
        notes.append("numeric columns not plotted (not a known metric, not used by a subset): " + ", ".join(other))
    return Pool(uids, metrics, truth, table_meta, other)


def _first_parquet(path: Path) -> Path:
    return min(p for p in path.glob("*.parquet") if not p.name.startswith("."))


def _load_json(path: Path, notes: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path}: unreadable JSON ({exc}); ignored")
        return None


def _step_label(step: dict) -> str:
    if step.get("step") == "keep":
        return f"keep {step.get('metric')}:{step.get('fraction')}"
    return f"{step.get('step')} {step.get('metric')}:{step.get('value')}"


def read_subset(path: Path, pool_uids: np.ndarray, notes: list[str]) -> Subset:
    """A filter output directory: its stats, its kept flags over the pool, main metric and thresholds."""
    from curate.io.uids import read_uid_npy

    stats = {}
    if (path / "stats.json").is_file():
        loaded = _load_json(path / "stats.json", notes)
        stats = loaded if isinstance(loaded, dict) else {}
    if (path / "kept.parquet").is_file():
        kept_uids = pq.read_table(path / "kept.parquet", columns=["uid"]).column("uid").to_pylist()
    elif (path / "uids.npy").is_file():
        kept_uids = read_uid_npy(path / "uids.npy")
    else:
        kept_uids = []
        notes.append(f"subset {path.name}: no kept.parquet or uids.npy; nothing is marked kept")
    kept = np.isin(pool_uids, np.asarray(kept_uids, dtype=object)) if len(pool_uids) else np.zeros(0, bool)
    sub_notes = []
    outside = len(set(kept_uids)) - int(kept.sum())
    if outside:
        sub_notes.append(f"{outside} kept uids are not in the pool of the score tables")
    steps = [s for s in stats.get("steps", []) if isinstance(s, dict)]
    thresholds = []
    for s in steps:
        score = s.get("threshold") if s.get("step") == "keep" else s.get("value")
        if isinstance(s.get("metric"), str) and isinstance(score, (int, float)) and math.isfinite(score):
            thresholds.append((s["metric"], float(score), _step_label(s)))
    keep_metrics = [s["metric"] for s in steps if s.get("step") == "keep" and isinstance(s.get("metric"), str)]
    any_metrics = [s["metric"] for s in steps if isinstance(s.get("metric"), str)]
    main = (keep_metrics or any_metrics or [None])[0]
    return Subset(path.name, path, stats, kept, main, thresholds, sub_notes)


# ---------------------------------------------------------------- plots

def _truth_kinds(truth: np.ndarray) -> list[str]:
    from curate.stages.synth import TRUTH_KINDS

    present = set(truth.tolist())
    return [k for k in TRUTH_KINDS if k in present] + sorted(present - set(TRUTH_KINDS))


def _truth_colour(kind: str, extra: dict[str, str]) -> str:
    if kind in TRUTH_COLOURS:
        return TRUTH_COLOURS[kind]
    return extra.setdefault(kind, EXTRA_COLOURS[len(extra) % len(EXTRA_COLOURS)])


def _figure(width: float, height: float, right: float = 0.97):
    """A figure with fixed margins (automatic layout costs more than drawing); `right` < 1 leaves room
    for a legend outside the axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.6 / width, right=right, bottom=0.45 / height, top=1 - 0.15 / height)
    return fig


def _png_uri(fig) -> str:
    buf = io.BytesIO()
    # No Software/date metadata: the bytes depend only on the data (and no URL hides in the PNG).
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _style():
    import matplotlib

    return matplotlib.rc_context({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
                                  "axes.titlesize": 10, "legend.fontsize": 7, "legend.frameon": False})


def histogram_png(name: str, values: np.ndarray, truth: np.ndarray | None, thresholds, extra_colours) -> str:
    finite = np.isfinite(values)
    v = values[finite]
    with _style():
        fig = _figure(7.0, 3.0, right=0.62)
        ax = fig.add_subplot()
        lo, hi = (float(v.min()), float(v.max())) if len(v) else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, 51)
        if truth is not None and len(v):
            t = truth[finite]
            kinds = _truth_kinds(t)
            # stepfilled: one polygon per kind instead of one patch per bar (ten times faster to draw)
            ax.hist([v[t == k] for k in kinds], bins=edges, stacked=True, histtype="stepfilled", label=kinds,
                    color=[_truth_colour(k, extra_colours) for k in kinds])
        elif len(v):
            ax.hist(v, bins=edges, histtype="stepfilled", color=TRUTH_COLOURS["clean"], label="all rows")
        for i, (label, score) in enumerate(thresholds):
            ax.axvline(score, color=SUBSET_COLOURS[i % len(SUBSET_COLOURS)], linestyle="--", linewidth=1.4,
                       label=f"{label} ({score:.4g})")
        ax.set_xlabel(name)
        ax.set_ylabel("samples")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        return _png_uri(fig)


def scatter_png(x_name: str, y_name: str, x: np.ndarray, y: np.ndarray, truth: np.ndarray | None,
                max_points: int, seed: int, extra_colours) -> tuple[str, int]:
    rows = np.flatnonzero(np.isfinite(x) & np.isfinite(y))
    if len(rows) > max_points:
        rows = np.sort(np.random.default_rng([seed, 1]).choice(rows, max_points, replace=False))
    with _style():
        fig = _figure(6.0, 4.4)
        ax = fig.add_subplot()
        if truth is None:
            ax.scatter(x[rows], y[rows], s=4, alpha=0.5, color=TRUTH_COLOURS["clean"], linewidths=0,
                       label="all rows (no truth)")
        else:
            t = truth[rows]
            for kind in _truth_kinds(t):  # clean first, corruptions drawn on top
                sel = rows[t == kind]
                ax.scatter(x[sel], y[sel], s=5 if kind == "clean" else 7, alpha=0.45 if kind == "clean" else 0.8,
                           color=_truth_colour(kind, extra_colours), linewidths=0, label=f"{kind} ({len(sel)})")
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name)
        ax.legend(loc="lower right", markerscale=2)
        return _png_uri(fig), len(rows)


def removal_png(kinds: list[str], subsets: list[Subset], rates: dict[str, dict]) -> str:
    with _style():
        fig = _figure(7.0, 3.2, right=0.72)
        ax = fig.add_subplot()
        width = 0.8 / max(len(subsets), 1)
        x = np.arange(len(kinds))
        for i, s in enumerate(subsets):
            heights = [100 * rates[s.name][k]["removed_rate"] for k in kinds]
            ax.bar(x + (i - (len(subsets) - 1) / 2) * width, heights, width, label=s.name,
                   color=SUBSET_COLOURS[i % len(SUBSET_COLOURS)])
        ax.set_xticks(x, kinds, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("% of the kind removed")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
        return _png_uri(fig)


def curves_png(curves: list[tuple[str, list[float], list[float], str]]) -> str:
    with _style():
        fig = _figure(7.0, 3.4, right=0.68)
        ax = fig.add_subplot()
        for i, (label, xs, ys, _) in enumerate(curves):
            ax.plot(xs, ys, linewidth=1.2, label=label, color=f"C{i % 10}",
                    linestyle=("-", "--", ":", "-.")[(i // 10) % 4])
        ax.set_xlabel(curves[0][3])
        ax.set_ylabel("training loss")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), ncols=1 if len(curves) <= 16 else 2)
        return _png_uri(fig)


# ---------------------------------------------------------------- galleries

def gallery_rows(pool: Pool, subset: Subset, per_decile: int, seed: int, index: int) -> list[dict]:
    """Deciles of the main metric (top first), each with up to `per_decile` kept and removed pool rows."""
    scores = pool.metrics[subset.main_metric]
    rows = np.flatnonzero(np.isfinite(scores))
    if not len(rows):
        return []
    # stable order by score then row: decile d holds ranks [d*n/10, (d+1)*n/10)
    ranked = rows[np.argsort(scores[rows], kind="stable")]
    deciles = []
    for d in range(9, -1, -1):
        part = ranked[d * len(ranked) // 10:(d + 1) * len(ranked) // 10]
        rng = np.random.default_rng([seed, index, d])
        cell = {"decile": d + 1, "n": len(part),
                "lo": float(scores[part[0]]) if len(part) else math.nan,
                "hi": float(scores[part[-1]]) if len(part) else math.nan}
        for side, mask in (("kept", subset.kept[part]), ("removed", ~subset.kept[part])):
            members = part[mask]
            chosen = rng.choice(members, min(per_decile, len(members)), replace=False) if len(members) else members
            cell[side] = sorted(chosen.tolist(), key=lambda r: -scores[r])
            cell[f"n_{side}"] = int(len(members))
        deciles.append(cell)
    return deciles


def _thumbnail_uri(image, size: int) -> str:
    image = image.copy()
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_thumbnails(shard_spec: str, wanted: set[str], size: int, notes: list[str]) -> dict[str, dict]:
    """uid -> {image (data URI) or problem, caption} for the wanted uids, in one pass over the shards."""
    from curate.io.shards import (SampleError, expand_shards, iter_shard, load_rgb, raw_caption, raw_image_bytes,
                                  sample_uid)

    found: dict[str, dict] = {}
    problems: list[str] = []
    for url in expand_shards(shard_spec):
        for raw in iter_shard(url, lambda key, reason: problems.append(f"{key}: {reason}")):
            uid = sample_uid(raw)
            if uid not in wanted or uid in found:
                continue
            caption, _ = raw_caption(raw)
            entry = {"caption": caption if caption is not None else "", "image": None, "problem": None}
            data = raw_image_bytes(raw)
            try:
                if data is None:
                    raise SampleError("no image member")
                entry["image"] = _thumbnail_uri(load_rgb(data, draft_size=size), size)
            except SampleError as exc:
                entry["problem"] = str(exc)
            found[uid] = entry
            if len(found) == len(wanted):
                break
        if len(found) == len(wanted):
            break
    if problems:
        notes.append(f"{len(problems)} problems while reading the shards for thumbnails (first: {problems[0]})")
    if len(found) < len(wanted):
        notes.append(f"{len(wanted) - len(found)} gallery samples were not found in the shards {shard_spec}")
    return found


# ---------------------------------------------------------------- compare, curves, parameters

def markdown_blocks(text: str) -> list[dict]:
    """Markdown -> blocks {kind: table|heading|text, ...}: pipe tables become {head, rows}, `#` lines headings,
    other lines paragraphs (as plain text: no other Markdown is interpreted)."""
    blocks: list[dict] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        rule = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.startswith("|") and "-" in rule and set(rule) <= set("|-: "):
            head = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i].strip()))
                i += 1
            blocks.append({"kind": "table", "head": head, "rows": rows})
            continue
        if line:
            text_line = line.lstrip("#").strip() if line.startswith("#") else line
            kind = "heading" if line.startswith("#") else "text"
            if blocks and kind == "text" and blocks[-1].get("kind") == "text":
                blocks[-1]["text"] += " " + text_line
            else:
                blocks.append({"kind": kind, "text": text_line})
        i += 1
    return blocks


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def read_curve(path: Path, notes: list[str]) -> tuple[list[float], list[float], str] | None:
    data = _load_json(path, notes)
    if isinstance(data, dict):
        data = data.get("history", data.get("curve"))
    if not isinstance(data, list) or not data or not all(isinstance(e, dict) for e in data):
        notes.append(f"{path}: not a list of {{step, loss}} entries; not plotted")
        return None
    points = [e for e in data if isinstance(e.get("loss"), (int, float)) and math.isfinite(e["loss"])]
    if not points:
        notes.append(f"{path}: no finite `loss` values; not plotted")
        return None
    x_key = next((k for k in ("samples_seen", "step") if all(isinstance(e.get(k), (int, float)) for e in points)), None)
    xs = [float(e[x_key]) for e in points] if x_key else list(range(len(points)))
    return xs, [float(e["loss"]) for e in points], x_key or "entry"


def flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    """Nested JSON -> (dotted key, short text) rows."""
    if isinstance(value, dict):
        rows = []
        for k, v in value.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows or [(prefix, "{}")]
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        rows = []
        for i, v in enumerate(value):
            rows += flatten(v, f"{prefix}[{i}]")
        return rows
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return [(prefix, text if len(text) <= 300 else text[:300] + " …")]


def _merged_thresholds(metric: str, subsets: Sequence[Subset]) -> list[tuple[str, float]]:
    """(label, score) cut lines of `metric`; subsets sharing a step and its cut score share one line."""
    merged: dict[tuple[str, float], list[str]] = {}
    for s in subsets:
        for m, score, label in s.thresholds:
            if m == metric:
                merged.setdefault((label, score), []).append(s.name)
    return [(f"{', '.join(names)}: {step}", score) for (step, score), names in merged.items()]


def _teacher_text(teacher: dict) -> str:
    scale = teacher.get("logit_scale")
    scale = f"{scale:.4g}" if isinstance(scale, (int, float)) else scale
    return f"{teacher.get('model')} / {teacher.get('pretrained')} (dim {teacher.get('embed_dim')}, logit scale {scale})"


def _short_path(path: str | Path, run_dir: Path) -> str:
    path = Path(path)
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def _fmt(value: float) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4g}"


# ---------------------------------------------------------------- the report

def run(run_dir: str | Path, out: str | Path | None = None, cfg: ReportConfig = ReportConfig(),
        scores: Sequence[str | Path] = (), subsets: Sequence[str | Path] = (), shards: str | None = None,
        emb: str | Path | None = None) -> ReportResult:
    """Discover, compute and write the report (default `out`: RUN_DIR/report.html)."""
    started = time.perf_counter()
    check_config(cfg)
    per_decile, thumb_px, max_points, seed = cfg.per_decile, cfg.thumb_px, cfg.max_points, cfg.seed
    src = discover(run_dir, scores, subsets, shards, emb)
    out_path = Path(out) if out is not None else src.run_dir / "report.html"
    notes: list[str] = []
    sections: dict[str, dict] = {}
    extra_colours: dict[str, str] = {}

    subset_stats = {}
    for d in src.subset_dirs:
        loaded = _load_json(d / "stats.json", notes) if (d / "stats.json").is_file() else None
        subset_stats[d] = loaded if isinstance(loaded, dict) else {}
    subset_metrics = {s.get("metric") for st in subset_stats.values() for s in st.get("steps", [])
                      if isinstance(s, dict) and isinstance(s.get("metric"), str)}
    pool = build_pool(src, subset_metrics, notes)
    if (pool is None and not src.subset_dirs and src.run_json is None and src.compare_dir is None
            and not src.curve_files):
        raise CurateError(f"{src.run_dir}: nothing to report: no score tables (*.parquet), emb/, subsets/, "
                          "compare/, students/ or run.json; give the directory `curate run` wrote")
    subsets_read = [read_subset(d, pool.uids if pool else np.empty(0, object), notes) for d in src.subset_dirs]

    # overview
    manifest = _load_json(src.manifest, notes) if src.manifest else None
    overview = {"pool": len(pool.uids) if pool else None, "metrics": list(pool.metrics) if pool else [],
                "subsets": [{"name": s.name, "kept": int(s.kept.sum()),
                             "steps": ", then ".join(_step_label(x) for x in s.stats.get("steps", [])
                                                     if isinstance(x, dict)),
                             "mode": s.stats.get("mode", "")} for s in subsets_read],
                "truth_counts": {}}
    if pool is not None and pool.truth is not None:
        overview["truth_counts"] = {k: int((pool.truth == k).sum()) for k in _truth_kinds(pool.truth)}
    teachers = {_teacher_text(m["teacher"]) for _, m in (pool.table_meta if pool else [])
                if isinstance(m.get("teacher"), dict)}
    overview["teacher"] = "; ".join(sorted(teachers))

    # parameters
    params: dict = {"run": None, "tables": [], "subsets": [], "corpus": None}
    if src.run_json is not None:
        loaded = _load_json(src.run_json, notes)
        params["run"] = flatten(loaded) if loaded is not None else None
    for path, meta in (pool.table_meta if pool else []):
        shown = ("stage", "source", "teacher", "params", "n_rows", "clones")
        rows = flatten({k: v for k, v in meta.items() if k in shown})
        params["tables"].append({"name": _short_path(path, src.run_dir), "rows": rows})
    for s in subsets_read:
        if s.stats.get("args"):
            params["subsets"].append({"name": s.name, "rows": flatten(s.stats["args"])})
    if isinstance(manifest, dict):
        params["corpus"] = flatten({k: manifest[k] for k in ("parameters", "truth_counts", "format") if k in manifest})
    sections["parameters"] = params

    # histograms
    hist = []
    if pool is not None:
        for name, values in pool.metrics.items():
            lines = _merged_thresholds(name, subsets_read)
            hist.append({"metric": name, "png": histogram_png(name, values, pool.truth, lines, extra_colours),
                         "n": int(np.isfinite(values).sum()), "nan": int((~np.isfinite(values)).sum()),
                         "thresholds": [{"label": label, "score": _fmt(score)} for label, score in lines]})
    sections["histograms"] = hist

    # scatter
    scatter = None
    if pool is not None:
        axes = [m for m in SCATTER_AXES if m in pool.metrics]
        if len(axes) < 2:
            axes = list(pool.metrics)[:2]
        if len(axes) == 2:
            png, shown = scatter_png(axes[0], axes[1], pool.metrics[axes[0]], pool.metrics[axes[1]], pool.truth,
                                     max_points, seed, extra_colours)
            scatter = {"x": axes[0], "y": axes[1], "png": png, "shown": shown, "n": len(pool.uids),
                       "truth": pool.truth is not None}
    sections["scatter"] = scatter

    # removal by corruption kind
    removal = None
    if pool is not None and pool.truth is not None and subsets_read:
        from curate.stages.truth import removal_rates

        kinds = _truth_kinds(pool.truth)
        rates = {s.name: removal_rates(pool.truth, s.kept) for s in subsets_read}
        removal = {"kinds": kinds, "png": removal_png(kinds, subsets_read, rates),
                   "rows": [{"name": s.name, "kept": int(s.kept.sum()), "pool": len(pool.uids),
                             "cells": [{"kept": rates[s.name][k]["kept"], "count": rates[s.name][k]["pool"],
                                        "removed_pct": 100 * rates[s.name][k]["removed_rate"]}
                                       for k in kinds]} for s in subsets_read]}
    sections["removal"] = removal

    # galleries
    galleries = []
    if pool is not None and src.shard_spec is not None and per_decile > 0:
        plans = []
        for i, s in enumerate(subsets_read):
            main = s.main_metric if s.main_metric in pool.metrics else next(iter(pool.metrics), None)
            if main is None:
                continue
            s.main_metric = main
            plans.append((s, gallery_rows(pool, s, per_decile, seed, i)))
        wanted = {pool.uids[r] for _, deciles in plans for cell in deciles for side in ("kept", "removed")
                  for r in cell[side]}
        thumbs = read_thumbnails(src.shard_spec, wanted, thumb_px, notes) if wanted else {}
        for s, deciles in plans:
            for cell in deciles:
                for side in ("kept", "removed"):
                    cell[side] = [_card(pool, r, s.main_metric, thumbs.get(pool.uids[r])) for r in cell[side]]
                cell["lo"], cell["hi"] = _fmt(cell["lo"]), _fmt(cell["hi"])
            galleries.append({"name": s.name, "metric": s.main_metric, "deciles": deciles, "notes": s.notes})
    sections["galleries"] = galleries

    # compare
    compare = None
    if src.compare_dir is not None:
        compare = {"dir": str(src.compare_dir), "blocks": [], "json": None}
        md = src.compare_dir / "compare.md"
        if md.is_file():
            compare["blocks"] = markdown_blocks(md.read_text(encoding="utf-8", errors="replace"))
        cj = src.compare_dir / "compare.json"
        if cj.is_file():
            loaded = _load_json(cj, notes)
            if loaded is not None:
                text = json.dumps(loaded, indent=2, ensure_ascii=False)
                compare["json"] = text if len(text) <= MAX_RAW_JSON_CHARS else text[:MAX_RAW_JSON_CHARS] + "\n…"
        if not compare["blocks"] and compare["json"] is None:
            compare = None
    sections["compare"] = compare

    # training curves
    curves = []
    for path in src.curve_files:
        parsed = read_curve(path, notes)
        if parsed is not None:
            curves.append((_short_path(path.parent, src.run_dir), *parsed))
    if len(curves) > MAX_CURVES:
        notes.append(f"{len(curves)} training curves found; the first {MAX_CURVES} by path are plotted")
        curves = curves[:MAX_CURVES]
    sections["curves"] = ({"png": curves_png(curves), "files": [c[0] for c in curves],
                           "final": [{"name": c[0], "loss": _fmt(c[2][-1]), "x": _fmt(c[1][-1])} for c in curves]}
                          if curves else None)

    html = render(src, overview, sections, notes, max_points)
    write_text_atomic(out_path, html)
    present = [k for k, v in sections.items() if v]
    return ReportResult(out=str(out_path), bytes=len(html.encode("utf-8")), seconds=time.perf_counter() - started,
                        sections=present, notes=notes)


def _card(pool: Pool, row: int, main: str, thumb: dict | None) -> dict:
    caption = thumb["caption"] if thumb else ""
    return {"uid": pool.uids[row], "image": thumb["image"] if thumb else None,
            "problem": (thumb or {}).get("problem") or (None if thumb else "not found in the shards"),
            "caption": caption if len(caption) <= CAPTION_CHARS else caption[:CAPTION_CHARS] + "…",
            "full_caption": caption,
            "truth": pool.truth[row] if pool.truth is not None else None,
            "truth_colour": TRUTH_COLOURS.get(pool.truth[row], "#888") if pool.truth is not None else None,
            "main": _fmt(pool.metrics[main][row]),
            "scores": [(name, _fmt(values[row])) for name, values in pool.metrics.items() if name != main]}


def render(src: Sources, overview: dict, sections: dict, notes: list[str], max_points: int) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("curate", "report_templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    template = env.get_template("report.html.j2")
    return template.render(version=__version__, run_dir=str(src.run_dir), src=src, overview=overview,
                           s=sections, notes=notes, csp=CONTENT_SECURITY_POLICY, max_points=max_points,
                           truth_colours=TRUTH_COLOURS)
