"""`curate embed`: tar shards -> one Parquet embedding table per shard (see curate/io/tables.py).

Decoding, preprocessing and tokenising run in DataLoader workers, each worker owning whole shards, and
yield batches tagged with their shard; the main process runs the teacher and writes a shard as soon as
its last batch is embedded. Per shard, in this order: `_errors/<stem>.parquet` (skips and notes, when
any), `<stem>.parquet`, then the completion marker, which records the embedding parameters (teacher and
its weights' digest, effective precision, image-only mode, json column). A rerun skips marked shards made
with the same parameters and refuses to mix in other ones (unless asked to re-embed them).

`images_only`: image embeddings alone (no caption needed, no text tower), e.g. for a NormSim target; the
input may also be an ImageFolder (`DIR/CLASS/*.jpg`, one table per class folder, with a `label` column).

Bad data never fails a shard (it is skipped and recorded); a shard that cannot be read at all (open or
I/O error) is retried `retries` times, then reported as failed with nothing written for it, while the
other shards go on (`fail_fast` stops the task at the first). The run then ends with an error naming it.

Files: this module holds the options and the result (light: the command line imports it); entry.py plans and
runs the stage (`run`); tasks.py is what a task runs (decoding workers, the teacher, the writes); common.py
what both use.
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.config import non_negative, option, positive

PRECISIONS = ("fp32", "fp16", "bf16")
RUN_OPTIONS = ("executor", "tasks", "retries", "fail_fast", "ray_address", "rank", "world_size")


@dataclass(frozen=True)
class EmbedConfig:
    # the teacher of the negCLIPLoss paper's DataComp runs (DataComp's L/14 scores); offline it stops with a
    # one-line error: pass a local checkpoint, or `--pretrained none` to ask for random weights by name
    model: str = option("ViT-L-14", "open_clip model name (ViT-L-14, ViT-B-32, curate-tiny, ...).",
                        section="teacher")
    pretrained: str = option("openai", "open_clip tag (openai, laion2b_...), a local checkpoint path, or none "
                             "(random weights, asked for by name).", section="teacher")
    precision: str = option("fp32", "fp32, fp16 or bf16 (autocast on CUDA; on CPU the teacher computes in fp32).",
                            choices=PRECISIONS, section="teacher")
    device: str = option("auto", "auto (cuda when present), cpu or cuda.")
    batch_size: int = option(256, "Samples per teacher forward pass.", "--batch-size", check=positive)
    workers: int = option(2, "DataLoader decode workers per task (0: in the main process).", check=non_negative)
    keep_json: bool = option(True, "Keep each sample's .json as a `json` column.", "--keep-json/--no-keep-json")
    images_only: bool = option(False, "Embed images alone (no captions needed; ImageFolder layout accepted), "
                               "e.g. a NormSim target.", "--images-only")
    overwrite: bool = option(False, "Re-embed finished shards of OUT that were made with another teacher, "
                             "precision or mode (default: refuse).", "--overwrite")


@dataclass
class EmbedResult:
    shards_total: int  # this rank's shards
    shards_skipped_done: int  # finished before this run, with the same parameters
    shards: list[dict]  # per shard embedded now (ShardSummary as a dict), failed ones excluded
    embedded: int
    skipped: int
    read: int
    content_uids: int  # uids derived from content (no valid json uid)
    redone: list[str]  # shards embedded again (--overwrite)
    random_init: bool
    out: str
    seconds: float
    failures: list[dict]  # {"task", "error", "attempts"} per shard or task that failed after its retries


