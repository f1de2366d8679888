"""`curate eval`: retrieval metrics (R@K, RSUM, R-Precision, mAP@R, PMRP) of an embedding directory.

`--labels` and `--group-by` name per-row fields as `column:NAME` (a column of the embedding tables) or
`json:PATH` (a dotted path inside the `json` column, the sample's raw .json), read by
curate.stages.common.pool_field.

Files: this module holds the options and the result (light: the command line imports it); entry.py computes
them (`run`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from curate.config import option, positive


@dataclass(frozen=True)
class EvalConfig:
    labels: Optional[str] = option(None, "Multi-hot labels for PMRP: json:PATH (e.g. json:labels) or column:NAME.")
    group_by: str = option("auto", "Captions sharing an image: auto (column image_key if present), none, key, "
                           "column:NAME or json:PATH.", "--group-by")
    block: Optional[int] = option(None, "Queries per similarity block (default: about 2^24 similarities per "
                                  "block).", check=positive, cli=False)


@dataclass
class EvalResult:
    """Retrieval numbers in percent (curate.metrics.retrieval.retrieval_metrics) and where they come from."""

    n_images: int
    n_texts: int
    i2t: dict  # R@K, r_precision, map_at_r, median_rank; with labels also pmrp (per ζ and mean), pmrp_queries
    t2i: dict
    rsum: float
    source: str
    teacher: dict
    group_by: str
    labels: str | None
    captions_per_image: float
    pmrp_mean: float | None = None  # with labels
    pmrp_unlabelled: dict | None = None  # with labels: {"images", "texts"} left out of PMRP
    out: str | None = None  # the JSON file written, when asked for

    def document(self) -> dict:
        """The JSON document `curate eval` writes (every number; the PMRP keys only with labels)."""
        doc = {k: v for k, v in vars(self).items() if k != "out"}
        return {k: v for k, v in doc.items() if v is not None or k == "labels"}
