"""`curate import datacomp`: DataComp's released metadata + embeddings -> our embedding tables.

DataComp ships, per shard, `NNNNNNNN.parquet` (uid, text, url, ... one row per sample) next to
`NNNNNNNN.npz` holding `l14_img`, `l14_txt` (OpenAI ViT-L/14, 768-d) and `b32_img`, `b32_txt`
(OpenAI ViT-B/32, 512-d), rows aligned with the parquet. Each pair becomes `EMB_DIR/NNNNNNNN.parquet`
in the schema of curate/io/tables.py: uid, key (the `key` column when present, else the uid), caption
(`text`), embeddings L2-normalised in float32 and stored as float16, and the teacher of the chosen arch
(logit_scale 100, OpenAI CLIP's), so that `curate score` and `curate normsim` run on it without a GPU.

Rows that cannot be used (uid not 32 lowercase hex, an embedding with NaN/inf or zero norm) are skipped
and recorded in `NNNNNNNN.errors.parquet`, like `curate embed` does. A missing `.npz`, a missing array
or mismatched row counts are errors naming the file. A shard is marked done after its table is written
(`EMB_DIR/_markers/import/`), so a rerun skips finished shards.

Files: this module holds the options and the result (light: the command line imports it); entry.py converts
(`run`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from curate.config import option

ARCH_NAMES = ("l14", "b32")  # DataComp's .npz arrays: l14_img / l14_txt (ViT-L/14), b32_img / b32_txt (ViT-B/32)


@dataclass(frozen=True)
class ImportDatacompConfig:
    arch: str = option("l14", "l14 (ViT-L/14 embeddings, 768-d) or b32 (ViT-B/32, 512-d).", choices=ARCH_NAMES)


@dataclass
class ImportDatacompResult:
    shards: int = 0
    imported: int = 0  # shards converted by this run
    skipped_done: int = 0
    rows: int = 0
    skipped_rows: int = 0
    out_dir: str = ""
    files: list[str] = field(default_factory=list)
