"""`curate report RUN_DIR --out report.html`: one self-contained HTML page to read instead of tables.

Everything is inlined (plots and thumbnails as base64 data URIs, CSS in the page, no JavaScript), and the
page carries a Content-Security-Policy that forbids any fetch except `data:` images, so it opens from disk
and makes no network request. Captions are untrusted text: Jinja2 autoescapes every value.

Discovery (what is absent is skipped, and its section says what was looked for):
  run parameters   RUN_DIR/run.json (any JSON; shown flattened), the metadata of every score table
                   (stage, teacher, params), each subset's filter arguments, and RUN_DIR/corpus/manifest.json.
  score tables     `--scores PATH` (repeatable; a Parquet file or a directory of them), else every
                   RUN_DIR/*.parquet with a `uid` column (scores.parquet first, then by name). They are
                   joined on uid; the first one sets the pool. Plotted metrics: the numeric columns named in
                   KNOWN_METRICS plus any metric a subset's steps use; other numeric columns are listed only.
  truth            the `truth` field of the `json` column of the embedding tables in RUN_DIR/emb/ (`--emb`),
                   read as curate.stages.truth does; rows without it are "unknown".
  subsets          `--subset DIR` (repeatable), else every RUN_DIR/subsets/*/ holding stats.json, uids.npy
                   or kept.parquet, by name. Kept uids come from kept.parquet (else uids.npy); thresholds
                   from stats.json: a keep step's `threshold` (the lowest kept score), a min/max step's `value`.
  thumbnails       the tar shards `--shards SPEC`, else RUN_DIR/corpus/*.tar (not its target/ set), scanned
                   once for the uids the galleries show, stopping when all are found.
  compare          RUN_DIR/compare/compare.md (its Markdown tables rendered) and compare.json (shown raw).
  training curves  train.json / history.json / curve.json under RUN_DIR/students/*/ and RUN_DIR/compare/
                   (any depth): a list of {step, loss, ...} dicts, or a dict holding one under `history` or
                   `curve` (curate train's train.json). x is `samples_seen` or `step` when every entry has it.

Galleries: per subset, the pool is cut into deciles of its main metric (the metric of its first keep step,
else of its first threshold, else the first metric) and up to `per_decile` kept and as many removed samples
are drawn from each decile with a seeded generator. The same inputs and seed give the same bytes.

Cost: one pass over the score and embedding tables' uid/metric/json columns (O(N) memory for those
columns) and at most one pass over the shards; a 5k-sample run takes about a second or two.

Files: this module holds the options and the result (light: the command line imports it); entry.py discovers,
computes and writes the page (`run`), from the template curate/report_templates/.
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.config import at_least, non_negative, option, positive


@dataclass(frozen=True)
class ReportConfig:
    per_decile: int = option(3, "Gallery: kept and removed samples shown per decile.", "--per-decile",
                             check=non_negative)
    thumb_px: int = option(64, "Gallery thumbnail size in pixels.", "--thumb-px", check=at_least(8))
    max_points: int = option(20_000, "Scatter: at most this many points (seeded sample).", "--max-points",
                             check=positive)
    seed: int = option(0, "Seed of the gallery and scatter samples.")


@dataclass
class ReportResult:
    out: str  # the HTML file
    bytes: int
    seconds: float
    sections: list[str]  # the sections with content (parameters, histograms, scatter, removal, ...)
    notes: list[str]  # what was looked for and not found, or left out
