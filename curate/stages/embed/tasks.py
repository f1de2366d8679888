"""What an embed task runs: shards decoded in DataLoader workers, the teacher's forward passes, each shard's
table, skip records and marker written as soon as its last batch is embedded."""

from __future__ import annotations

import os
import re
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate.errors import CurateError
from curate.io.shards import SampleError, decode_sample, iter_image_folder, iter_shard, sample_uid
from curate.io.tables import build_embedding_table, errors_path, write_table_atomic
from curate.run.markers import Markers
from curate.stages.embed import EmbedConfig
from curate.stages.embed.common import ERRORS_SCHEMA, STAGE, EmbedTask, ShardSummary

MAX_CAPTION_CHARS_TOKENIZED = 20_000  # BPE on a megabyte caption is slow; the context window is ~77 tokens anyway
# An image more elongated than this is cut to its central part before the teacher's resize: the resize scales
# the short side to the model's size, so a 4,000,000 x 1 image would become a 256,000,000 x 64 one (out of
# memory); the centre crop that follows only ever sees the central square, which the cut keeps whole.
MAX_ASPECT = 16
SHARD_RETRY_DELAY_S = 0.5  # a shard that failed to read is retried after this many seconds x attempt


class ShardBatches(IterableDataset):
    """Yields {"kind": "batch", ...} per full batch of one shard and {"kind": "end", ...} after each shard.

    A shard that raises while being read (cannot be opened, I/O error) is retried: {"kind": "reset"} tells
    the consumer to drop that shard's batches so far. After its last attempt it yields {"kind": "failed"}
    and the next shard goes on. A "shard" that is a directory is an ImageFolder class folder (images only).
    """

    def __init__(self, shards, preprocess: Callable, tokenizer: Callable | None, batch_size: int,
                 context_length: int, draft_size: int | None, retries: int = 0, crop_aspect: bool = True):
        self.shards, self.preprocess, self.tokenizer = shards, preprocess, tokenizer  # no tokenizer: images only
        self.batch_size, self.context_length, self.draft_size = batch_size, context_length, draft_size
        self.retries, self.crop_aspect = retries, crop_aspect

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for url, stem in mine:
            yield from self._shard(url, stem)

    def _shard(self, url: str, stem: str) -> Iterator[dict]:
        for attempt in range(1, self.retries + 2):
            try:
                yield from self._read_shard(url, stem)
                return
            except Exception:  # noqa: BLE001 - an unreadable shard (or a bug) fails this shard, not the run
                error = traceback.format_exc().strip()
            if attempt <= self.retries:
                yield {"kind": "reset", "stem": stem}
                time.sleep(SHARD_RETRY_DELAY_S * attempt)
        yield {"kind": "failed", "stem": stem, "url": url, "error": error, "attempts": self.retries + 1}

    def _read_shard(self, url: str, stem: str) -> Iterator[dict]:
        problems: list[tuple] = []
        seen: set[str] = set()
        keys_seen: set[str] = set()
        rows: list = []
        read = content_uids = 0
        images_only = self.tokenizer is None
        folder = images_only and os.path.isdir(url)
        label = Path(url).name if folder else None
        on_problem = lambda key, reason: problems.append((key, None, reason, "skipped"))  # noqa: E731
        for raw in (iter_image_folder(url, on_problem) if folder else iter_shard(url, on_problem)):
            read += 1
            try:
                s = decode_sample(raw, self.draft_size, require_caption=not images_only)
            except SampleError as exc:
                problems.append((raw.key, sample_uid(raw), str(exc), "skipped"))
                continue
            if s.uid in seen:
                problems.append((raw.key, s.uid, "duplicate uid within the shard; kept the first", "skipped"))
                continue
            seen.add(s.uid)
            if raw.key in keys_seen:  # webdataset would also yield it: a separate sample with its own uid
                s.notes.append(f"key {raw.key!r} appears again later in the shard; kept as a separate sample")
            keys_seen.add(raw.key)
            try:
                pixels = self.preprocess(crop_extreme_aspect(s.image) if self.crop_aspect else s.image)
            except Exception as exc:  # noqa: BLE001 - a transform failure is a per-sample skip
                problems.append((raw.key, s.uid, f"preprocess failed ({type(exc).__name__}: {exc})", "skipped"))
                continue
            content_uids += s.uid_from_content
            problems += [(raw.key, s.uid, note, "note") for note in s.notes]
            rows.append((s.key, s.uid, s.caption, s.json_text, label, pixels))
            if len(rows) == self.batch_size:
                yield self._batch(stem, rows, problems)
                rows = []
        if rows:
            yield self._batch(stem, rows, problems)
        yield {"kind": "end", "stem": stem, "url": url, "problems": problems, "read": read,
               "content_uids": content_uids}

    def _batch(self, stem: str, rows: list, problems: list) -> dict:
        keys, uids, captions, jsons, labels, pixels = zip(*rows)
        batch = {"kind": "batch", "stem": stem, "keys": list(keys), "uids": list(uids), "captions": list(captions),
                 "jsons": list(jsons), "labels": list(labels), "images": torch.stack(pixels), "tokens": None}
        if self.tokenizer is None:
            return batch
        batch["tokens"] = tokens = self.tokenizer([c[:MAX_CAPTION_CHARS_TOKENIZED] for c in captions])
        for key, uid, caption, tok in zip(keys, uids, captions, tokens):
            if int(tok[-1]) != 0:  # open_clip puts EOT in the last slot when it cuts the text
                problems.append((key, uid, f"caption ({len(caption)} chars) fills the teacher's "
                                 f"{self.context_length}-token context; the rest is truncated", "note"))
        return batch


def crop_extreme_aspect(image, max_aspect: int = MAX_ASPECT):
    """The central part of an image whose long side exceeds `max_aspect` x its short side (see MAX_ASPECT)."""
    width, height = image.size
    limit = min(width, height) * max_aspect
    if width > limit:
        left = (width - limit) // 2
        return image.crop((left, 0, left + limit, height))
    if height > limit:
        top = (height - limit) // 2
        return image.crop((0, top, width, top + limit))
    return image


def embed_task(task: EmbedTask, progress: Callable[[int], None] | None = None) -> list[ShardSummary]:
    """Embed a group of shards with one teacher load; returns one summary per shard (failed ones with `error`)."""
    from curate.models import load_teacher

    cfg = task.config
    markers = Markers(task.out_dir, STAGE)
    shards = [(url, stem) for url, stem in task.shards if not markers.is_done(stem)]  # a retried task resumes
    if not shards:
        return []
    teacher = load_teacher(cfg.model, cfg.pretrained, device=cfg.device, precision=cfg.precision)
    image_size = _image_size(teacher)
    # the aspect cut is exact only for open_clip's default resize (short side) + centre crop
    crop_aspect = getattr(teacher.model.visual, "preprocess_cfg", {}).get("resize_mode", "shortest") == "shortest"
    dataset = ShardBatches(shards, teacher.preprocess, None if cfg.images_only else teacher.tokenizer,
                           cfg.batch_size, teacher.model.context_length, draft_size=image_size,
                           retries=task.retries, crop_aspect=crop_aspect)
    workers = min(cfg.workers, len(shards))
    loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                        pin_memory=teacher.device.type == "cuda", prefetch_factor=4 if workers else None)
    pending: dict[str, dict] = {}
    summaries: list[ShardSummary] = []
    for item in loader:
        if item["kind"] in ("reset", "failed"):
            pending.pop(item["stem"], None)  # nothing of a failed attempt is written
            if item["kind"] == "failed":
                if task.fail_fast:  # a task failure, so that the executor stops the other tasks too
                    raise CurateError(f"shard {item['stem']} ({item['url']}) failed after {item['attempts']} "
                                      f"attempt(s): {item['error'].splitlines()[-1]}")
                summaries.append(ShardSummary(item["stem"], error=item["error"], attempts=item["attempts"]))
            continue
        acc = pending.setdefault(item["stem"], {"rows": [], "start": time.perf_counter()})
        if item["kind"] == "batch":
            img = teacher.encode_image(item["images"].to(teacher.device, non_blocking=True))
            txt = None if item["tokens"] is None else \
                teacher.encode_text(item["tokens"].to(teacher.device, non_blocking=True)).float().cpu().numpy()
            acc["rows"].append((item, img.float().cpu().numpy(), txt))
            if progress:  # a StageProgress counts shards on its bar and samples for the rate; a plain callable samples
                getattr(progress, "count", progress)(len(item["uids"]))
            continue
        summaries.append(_write_shard(task.out_dir, item, pending.pop(item["stem"]), teacher.info, cfg, markers,
                                      task.params))
        if hasattr(progress, "count"):
            progress(1)
    return summaries


def _write_shard(out_dir: str, end: dict, acc: dict, teacher_info, cfg: EmbedConfig, markers: Markers,
                 params: dict) -> ShardSummary:
    stem, out = end["stem"], Path(out_dir)
    rows = acc["rows"]
    cat = lambda name: [x for item, _, _ in rows for x in item[name]]  # noqa: E731
    dim = teacher_info.embed_dim
    img = np.concatenate([i for _, i, _ in rows]) if rows else np.zeros((0, dim), np.float32)
    txt = None
    if not cfg.images_only:
        txt = np.concatenate([t for _, _, t in rows]) if rows else np.zeros((0, dim), np.float32)
    problems = end["problems"]
    skipped = sum(1 for p in problems if p[3] == "skipped")
    notes = len(problems) - skipped
    record = errors_path(out, stem)
    if problems:
        errors = pa.Table.from_pylist([dict(zip(ERRORS_SCHEMA.names, p)) for p in problems], schema=ERRORS_SCHEMA)
        write_table_atomic(errors, record, meta={"shard": end["url"], "stage": STAGE})
    elif record.exists():
        record.unlink()  # stale record from an earlier run of a changed shard
    folder = os.path.isdir(end["url"])
    table = build_embedding_table(cat("uids"), cat("keys"), None if cfg.images_only else cat("captions"), img, txt,
                                  json_texts=cat("jsons") if cfg.keep_json and not folder else None, dim=dim,
                                  labels=cat("labels") if folder else None)
    counts = {"read": end["read"], "embedded": table.num_rows, "skipped": skipped, "notes": notes,
              "content_uids": end["content_uids"]}
    meta = {"teacher": teacher_info.to_dict(), "shard": end["url"], "counts": counts, "precision": params["precision"],
            "embedding_params": params, "images_only": bool(cfg.images_only)}
    if teacher_info.pretrained == "none":
        meta["random_init"] = True  # asked for by name (`--pretrained none`): the vectors carry no meaning
    write_table_atomic(table, out / f"{stem}.parquet", meta=meta)
    markers.mark(stem, {"shard": end["url"], **counts, "params": params})
    reasons: dict[str, int] = {}
    for p in problems:
        if p[3] == "skipped":
            reason = skip_reason_kind(p[2])
            reasons[reason] = reasons.get(reason, 0) + 1
    return ShardSummary(stem, table.num_rows, skipped, notes, time.perf_counter() - acc["start"], reasons,
                        read=end["read"], content_uids=end["content_uids"])


def skip_reason_kind(reason: str) -> str:
    """The kind of a skip, without the names and numbers of this instance ("tar member '…' is a symlink")."""
    return re.split(r" \(|:|;", re.sub(r"'[^']*'", "'…'", reason))[0]


def _image_size(teacher) -> int | None:
    size = getattr(teacher.model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = max(size)
    return int(size) if size else None


