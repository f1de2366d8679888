"""The recipe's [truth] step: ground-truth evaluation of subsets on a corpus whose corruptions are known (the
synth `.json` `truth`).

For each subset: the fraction of each corruption kind that was removed and the fraction of clean samples
kept. Truth is read from the embedding tables' `json` column, so no tar is re-read. `run` writes the table as
truth.json and truth.md; `removal_rates` is the one definition `curate compare` and the report use too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.config import check_config
from curate.io.atomic import write_text_atomic
from curate.io.tables import EmbeddingPool
from curate.io.uids import read_uid_npy


@dataclass(frozen=True)
class TruthConfig:
    """No options: the [truth] section's one key, `subsets`, names its inputs."""


@dataclass
class TruthResult:
    table: dict[str, dict]  # subset name -> {"kept", "pool", "kinds": removal_rates}
    out: str  # truth.json (truth.md beside it)


def pool_truth(pool: EmbeddingPool) -> tuple[np.ndarray, np.ndarray]:
    """(uids, truth kinds) of every pool row; rows without a `truth` field are 'unknown'."""
    uids = pool.column("uid")
    if "json" not in _columns(pool):
        return uids, np.full(len(uids), "unknown", dtype=object)
    truth = [json.loads(j).get("truth", "unknown") if j else "unknown" for j in pool.column("json")]
    return uids, np.asarray(truth, dtype=object)


def _columns(pool: EmbeddingPool) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(pool.files[0]).names


def removal_rates(truth, kept) -> dict[str, dict]:
    """Per truth kind, from the ground truth: {"pool": n, "kept": k, "kept_rate": k/n, "removed_rate": 1 - k/n}.

    `truth`: kind per pool row (None reads as "unknown"); `kept`: boolean mask over the pool. Kinds are
    ordered clean first, then by name. The one definition behind the truth table, `compare` and the report.
    """
    truth = np.asarray([str(t) if t is not None else "unknown" for t in truth], dtype=object)
    kept = np.asarray(kept, dtype=bool)
    out = {}
    for kind in sorted(set(truth.tolist()), key=lambda k: (k != "clean", k)):
        mask = truth == kind
        n, k = int(mask.sum()), int((kept & mask).sum())
        out[kind] = {"pool": n, "kept": k, "kept_rate": k / n, "removed_rate": 1.0 - k / n}
    return out


def headline_rate(kind: str, rates: dict) -> float:
    """The one number a truth table shows per kind: kept rate for clean, removal rate for a corruption."""
    return rates["kept_rate" if kind == "clean" else "removed_rate"]


def truth_table(emb_dir: str | Path, subsets: dict[str, str | Path]) -> dict[str, dict]:
    """{subset name: removal_rates} for subset directories (or `.npy` uid files) over one pool."""
    uids, truth = pool_truth(EmbeddingPool(emb_dir))
    result = {}
    for name, subset in subsets.items():
        path = Path(subset)
        kept_uids = set(read_uid_npy(path / "uids.npy" if path.is_dir() else path))
        kept = np.fromiter((u in kept_uids for u in uids), bool, len(uids))
        result[name] = {"kept": int(kept.sum()), "pool": len(uids), "kinds": removal_rates(truth, kept)}
    return result


def truth_markdown(table: dict[str, dict]) -> str:
    kinds = sorted({k for r in table.values() for k in r["kinds"]}, key=lambda k: (k != "clean", k))
    head = "| subset | kept | " + " | ".join(f"{k} {'kept' if k == 'clean' else 'removed'}" for k in kinds) + " |"
    lines = [head, "|" + "---|" * (len(kinds) + 2)]
    for name, r in table.items():
        cells = []
        for k in kinds:
            d = r["kinds"].get(k)
            cells.append("" if d is None else f"{100 * headline_rate(k, d):.1f} %")
        lines.append(f"| {name} | {r['kept']:,} / {r['pool']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(emb_dir: str | Path, subsets: dict[str, str | Path], out: str | Path, cfg: TruthConfig = TruthConfig()
        ) -> TruthResult:
    """The truth table of `subsets` over the pool of `emb_dir`, written to `out` (JSON) and beside it as Markdown
    (the same name with .md)."""
    check_config(cfg)
    table = truth_table(emb_dir, subsets)
    out = Path(out)
    write_text_atomic(out, json.dumps(table, indent=2, sort_keys=True))
    write_text_atomic(out.with_suffix(".md"), truth_markdown(table) + "\n")
    return TruthResult(table=table, out=str(out))
