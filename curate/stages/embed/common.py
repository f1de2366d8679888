"""What embed's entry and its tasks share: the task description, per-shard summary and embedding parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate.io.atomic import file_sha256
from curate.stages.embed import EmbedConfig

STAGE = "embed"
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("reason", pa.string()), ("kind", pa.string())])


def embedding_params(cfg: EmbedConfig) -> dict:
    """What the embeddings of a shard depend on, recorded in its marker: a rerun with other values must not
    reuse it. The weights are named by their content for a local file (a retrained checkpoint at the same
    path is another teacher), by tag otherwise; preprocessing follows from model and weights. Precision is
    the effective one (fp16/bf16 autocast runs on CUDA only; on CPU every request computes in fp32)."""
    from curate.models.teacher import resolve_device

    pretrained, digest = str(cfg.pretrained), None
    path = Path(pretrained).expanduser()
    if pretrained.lower() != "none" and path.is_file():
        pretrained, digest = str(path.resolve()), file_sha256(path)
    precision = cfg.precision if resolve_device(cfg.device).type == "cuda" else "fp32"
    return {"model": cfg.model, "pretrained": pretrained, "weights_sha256": digest, "precision": precision,
            "images_only": bool(cfg.images_only), "keep_json": bool(cfg.keep_json)}


@dataclass
class EmbedTask:
    name: str
    shards: list[tuple[str, str]]  # (url, output stem)
    out_dir: str
    config: EmbedConfig
    retries: int = 0  # per shard: a shard that cannot be read is tried 1 + retries times
    fail_fast: bool = False  # stop the task at the first shard that still fails
    params: dict = field(default_factory=dict)  # embedding_params(config), recorded in each shard's marker


@dataclass
class ShardSummary:
    shard: str
    embedded: int = 0
    skipped: int = 0
    notes: int = 0
    seconds: float = 0.0
    reasons: dict = field(default_factory=dict)
    error: str = ""  # set when the shard failed after its retries (nothing was written for it)
    attempts: int = 1
    read: int = 0
    content_uids: int = 0  # uids derived from content (no valid `uid` in the sample's .json)


