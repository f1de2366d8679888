"""`curate embed`: tar shards -> one Parquet embedding table per shard (see curate/io/tables.py).

Decoding, preprocessing and tokenising run in DataLoader workers, each worker owning whole shards, and
yield batches tagged with their shard; the main process runs the teacher and writes a shard as soon as
its last batch is embedded. Per shard, in this order: `<stem>.errors.parquet` (skips and notes, when
any), `<stem>.parquet`, then the completion marker. A rerun skips marked shards.

Bad data never fails a shard (it is skipped and recorded); a shard that cannot be read at all (open or
I/O error) is retried `retries` times, then reported as failed with nothing written for it, while the
other shards go on (`fail_fast` stops the task at the first). The run then ends with an error naming it.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate.errors import CurateError
from curate.io.atomic import sweep_stale_temps
from curate.io.shards import SampleError, decode_sample, expand_shards, iter_shard, sample_uid, unique_stems
from curate.io.tables import ERRORS_SUFFIX, build_embedding_table, write_table_atomic
from curate.run.executors import make_executor
from curate.run.markers import Markers
from curate.run.ranks import resolve_rank, split_for_rank

STAGE = "embed"
MAX_CAPTION_CHARS_TOKENIZED = 20_000  # BPE on a megabyte caption is slow; the context window is ~77 tokens anyway
# An image more elongated than this is cut to its central part before the teacher's resize: the resize scales
# the short side to the model's size, so a 4,000,000 x 1 image would become a 256,000,000 x 64 one (out of
# memory); the centre crop that follows only ever sees the central square, which the cut keeps whole.
MAX_ASPECT = 16
SHARD_RETRY_DELAY_S = 0.5  # a shard that failed to read is retried after this many seconds x attempt
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("reason", pa.string()), ("kind", pa.string())])


@dataclass
class EmbedConfig:
    model: str = "curate-tiny"
    pretrained: str = "none"
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 256
    workers: int = 2  # DataLoader decode workers per task
    keep_json: bool = True


@dataclass
class EmbedTask:
    name: str
    shards: list[tuple[str, str]]  # (url, output stem)
    out_dir: str
    config: EmbedConfig
    retries: int = 0  # per shard: a shard that cannot be read is tried 1 + retries times
    fail_fast: bool = False  # stop the task at the first shard that still fails


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


class ShardBatches(IterableDataset):
    """Yields {"kind": "batch", ...} per full batch of one shard and {"kind": "end", ...} after each shard.

    A shard that raises while being read (cannot be opened, I/O error) is retried: {"kind": "reset"} tells
    the consumer to drop that shard's batches so far. After its last attempt it yields {"kind": "failed"}
    and the next shard goes on.
    """

    def __init__(self, shards, preprocess: Callable, tokenizer: Callable, batch_size: int,
                 context_length: int, draft_size: int | None, retries: int = 0, crop_aspect: bool = True):
        self.shards, self.preprocess, self.tokenizer = shards, preprocess, tokenizer
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
        read = 0
        for raw in iter_shard(url, lambda key, reason: problems.append((key, None, reason, "skipped"))):
            read += 1
            try:
                s = decode_sample(raw, self.draft_size)
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
            problems += [(raw.key, s.uid, note, "note") for note in s.notes]
            rows.append((s.key, s.uid, s.caption, s.json_text, pixels))
            if len(rows) == self.batch_size:
                yield self._batch(stem, rows, problems)
                rows = []
        if rows:
            yield self._batch(stem, rows, problems)
        yield {"kind": "end", "stem": stem, "url": url, "problems": problems, "read": read}

    def _batch(self, stem: str, rows: list, problems: list) -> dict:
        keys, uids, captions, jsons, pixels = zip(*rows)
        tokens = self.tokenizer([c[:MAX_CAPTION_CHARS_TOKENIZED] for c in captions])
        for key, uid, caption, tok in zip(keys, uids, captions, tokens):
            if int(tok[-1]) != 0:  # open_clip puts EOT in the last slot when it cuts the text
                problems.append((key, uid, f"caption ({len(caption)} chars) fills the teacher's "
                                 f"{self.context_length}-token context; the rest is truncated", "note"))
        return {"kind": "batch", "stem": stem, "keys": list(keys), "uids": list(uids), "captions": list(captions),
                "jsons": list(jsons), "images": torch.stack(pixels), "tokens": tokens}


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
    dataset = ShardBatches(shards, teacher.preprocess, teacher.tokenizer, cfg.batch_size,
                           teacher.model.context_length, draft_size=image_size, retries=task.retries,
                           crop_aspect=crop_aspect)
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
            txt = teacher.encode_text(item["tokens"].to(teacher.device, non_blocking=True))
            acc["rows"].append((item, img.float().cpu().numpy(), txt.float().cpu().numpy()))
            if progress:
                progress(len(item["uids"]))
            continue
        summaries.append(_write_shard(task.out_dir, item, pending.pop(item["stem"]), teacher.info, cfg, markers))
    return summaries


def _write_shard(out_dir: str, end: dict, acc: dict, teacher_info, cfg: EmbedConfig, markers: Markers) -> ShardSummary:
    stem, out = end["stem"], Path(out_dir)
    rows = acc["rows"]
    cat = lambda name: [x for item, _, _ in rows for x in item[name]]  # noqa: E731
    dim = teacher_info.embed_dim
    img = np.concatenate([i for _, i, _ in rows]) if rows else np.zeros((0, dim), np.float32)
    txt = np.concatenate([t for _, _, t in rows]) if rows else np.zeros((0, dim), np.float32)
    problems = end["problems"]
    skipped = sum(1 for p in problems if p[3] == "skipped")
    notes = len(problems) - skipped
    errors_path = out / f"{stem}{ERRORS_SUFFIX}"
    if problems:
        errors = pa.Table.from_pylist([dict(zip(ERRORS_SCHEMA.names, p)) for p in problems], schema=ERRORS_SCHEMA)
        write_table_atomic(errors, errors_path, meta={"shard": end["url"], "stage": STAGE})
    elif errors_path.exists():
        errors_path.unlink()  # stale record from an earlier run of a changed shard
    table = build_embedding_table(cat("uids"), cat("keys"), cat("captions"), img, txt,
                                  json_texts=cat("jsons") if cfg.keep_json else None, dim=dim)
    counts = {"read": end["read"], "embedded": table.num_rows, "skipped": skipped, "notes": notes}
    write_table_atomic(table, out / f"{stem}.parquet",
                       meta={"teacher": teacher_info.to_dict(), "shard": end["url"], "counts": counts,
                             "precision": cfg.precision})
    markers.mark(stem, {"shard": end["url"], **counts})
    reasons: dict[str, int] = {}
    for p in problems:
        if p[3] == "skipped":
            # the kind of problem, without the names and numbers of this instance ("tar member '…' is a symlink")
            reason = re.split(r" \(|:|;", re.sub(r"'[^']*'", "'…'", p[2]))[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return ShardSummary(stem, table.num_rows, skipped, notes, time.perf_counter() - acc["start"], reasons)


def _image_size(teacher) -> int | None:
    size = getattr(teacher.model.visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = max(size)
    return int(size) if size else None


def plan_embed(shards_spec, out_dir: str | Path, rank: int | None = None, world_size: int | None = None):
    """The shards this rank still has to embed: (all (url, stem) of this rank, the ones not yet done)."""
    urls = expand_shards(shards_spec)
    stems = unique_stems(urls)
    rank, world_size = resolve_rank(rank, world_size)
    mine = split_for_rank(list(zip(urls, stems)), rank, world_size)
    done = Markers(out_dir, STAGE).done()
    return mine, [(u, s) for u, s in mine if s not in done]


def embed(shards_spec, out_dir: str | Path, config: EmbedConfig, rank: int | None = None,
          world_size: int | None = None, executor: str = "local", tasks: int = 1, retries: int = 1,
          fail_fast: bool = False, ray_address: str | None = None, progress=None) -> dict:
    """Embed every not-yet-done shard of this rank. Returns a summary dict; raises CurateError on failed shards."""
    if config.batch_size < 1:
        raise CurateError(f"--batch-size {config.batch_size}: must be >= 1")
    if config.precision not in ("fp32", "fp16", "bf16"):
        raise CurateError(f"--precision {config.precision!r}: choose fp32, fp16 or bf16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out_dir, Markers(out_dir, STAGE).dir)  # left by writers killed in an earlier run
    mine, todo = plan_embed(shards_spec, out_dir, rank, world_size)
    groups = [todo[i::tasks] for i in range(max(1, min(tasks, len(todo))))] if todo else []
    task_list = [EmbedTask(f"embed[{','.join(s for _, s in g[:3])}{',…' if len(g) > 3 else ''}]", g, str(out_dir), config,
                           retries=retries, fail_fast=fail_fast)
                 for g in groups]
    start = time.perf_counter()
    wants_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    # a task runs the teacher plus its own decode workers: reserve CPUs for all of them
    run_executor = make_executor(executor, workers=1, ray_address=ray_address, num_gpus=1.0 if wants_gpu else 0.0,
                                 num_cpus=float(config.workers + 1))
    if executor == "local":
        report = run_executor.run(lambda t: embed_task(t, progress), task_list, retries=retries, fail_fast=fail_fast)
    else:
        report = run_executor.run(embed_task, task_list, retries=retries, fail_fast=fail_fast)
    summaries = sorted((asdict(s) for r in report.results if r for s in r), key=lambda s: s["shard"])
    # a shard that failed after its retries is named in `failures` (as task failures are), not in `shards`
    shard_failures = [{"task": f"shard {s['shard']}", "error": s["error"], "attempts": s["attempts"]}
                      for s in summaries if s["error"]]
    summaries = [s for s in summaries if not s["error"]]
    result = {"shards_total": len(mine), "shards_skipped_done": len(mine) - len(todo), "shards": summaries,
              "embedded": sum(s["embedded"] for s in summaries), "skipped": sum(s["skipped"] for s in summaries),
              "seconds": time.perf_counter() - start,
              "failures": shard_failures + [asdict(f) for f in report.failures]}
    return result
