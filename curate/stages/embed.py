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
"""

from __future__ import annotations

import hashlib
import os
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
from curate.io.shards import (SampleError, decode_sample, expand_shards, image_folder_units, iter_image_folder,
                               iter_shard, sample_uid, unique_stems)
from curate.io.tables import ERRORS_DIR, build_embedding_table, errors_path, write_table_atomic
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
    # the teacher of the negCLIPLoss paper's DataComp runs (DataComp's L/14 scores); offline it stops with a
    # one-line error: pass a local checkpoint, or `--pretrained none` to ask for random weights by name
    model: str = "ViT-L-14"
    pretrained: str = "openai"
    device: str = "auto"
    precision: str = "fp32"
    batch_size: int = 256
    workers: int = 2  # DataLoader decode workers per task
    keep_json: bool = True
    images_only: bool = False  # image embeddings only (no caption needed), e.g. a NormSim target


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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


def embed_inputs(shards_spec, images_only: bool = False) -> list[str]:
    """Shard URLs, or with `images_only` the class folders of an ImageFolder directory (`DIR/CLASS/*.jpg`)."""
    specs = [shards_spec] if isinstance(shards_spec, (str, Path)) else list(shards_spec)
    if len(specs) == 1 and Path(str(specs[0])).is_dir():
        folders = image_folder_units(specs[0])
        if folders is not None:
            if not images_only:
                raise CurateError(f"{specs[0]}: holds image folders, not tar shards; an ImageFolder has no "
                                  "captions: embed it with --images-only (e.g. a NormSim target)")
            return folders
    return expand_shards(shards_spec)


def plan_embed(shards_spec, out_dir: str | Path, rank: int | None = None, world_size: int | None = None,
               images_only: bool = False):
    """The shards this rank still has to embed: (all (url, stem) of this rank, the ones not yet done)."""
    urls = embed_inputs(shards_spec, images_only)
    stems = unique_stems(urls)
    rank, world_size = resolve_rank(rank, world_size)
    mine = split_for_rank(list(zip(urls, stems)), rank, world_size)
    done = Markers(out_dir, STAGE).done()
    return mine, [(u, s) for u, s in mine if s not in done]


def check_done_params(out_dir: Path, mine: list[tuple[str, str]], params: dict, overwrite: bool) -> list[str]:
    """Finished shards of this rank made with other embedding parameters: an error naming the difference, or
    with `overwrite` their stems (their markers removed, so that they are embedded again)."""
    markers = Markers(out_dir, STAGE)
    done = markers.done()
    stale = []
    for _, stem in mine:
        if stem in done:
            earlier = markers.info(stem).get("params")
            if earlier != params:
                stale.append((stem, earlier))
    if not stale:
        return []
    if overwrite:
        for stem, _ in stale:
            markers.path(stem).unlink(missing_ok=True)
        return [stem for stem, _ in stale]
    stem, earlier = stale[0]
    if earlier is None:
        what = "by an earlier version of curate that did not record its teacher"
    else:
        diff = [f"{k} {earlier.get(k)!r} (now {params[k]!r})" for k in params if earlier.get(k) != params[k]]
        what = "with " + ", ".join(diff)
    raise CurateError(f"{out_dir}: {len(stale)} finished shard(s) (e.g. {stem}) were embedded {what}; a pool must "
                      "come from one teacher. Use a new --out, or pass --overwrite to embed them again")


def embed(shards_spec, out_dir: str | Path, config: EmbedConfig, rank: int | None = None,
          world_size: int | None = None, executor: str = "local", tasks: int = 1, retries: int = 1,
          fail_fast: bool = False, ray_address: str | None = None, progress=None, overwrite: bool = False) -> dict:
    """Embed every not-yet-done shard of this rank. Returns a summary dict; raises CurateError on failed shards
    and when shards were to be embedded but not one sample could be."""
    if config.batch_size < 1:
        raise CurateError(f"--batch-size {config.batch_size}: must be >= 1")
    if config.precision not in ("fp32", "fp16", "bf16"):
        raise CurateError(f"--precision {config.precision!r}: choose fp32, fp16 or bf16")
    out_dir = Path(out_dir)
    params = embedding_params(config)
    mine, _ = plan_embed(shards_spec, out_dir, rank, world_size, config.images_only)
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(out_dir, Markers(out_dir, STAGE).dir, out_dir / ERRORS_DIR)  # left by writers killed earlier
    redone = check_done_params(out_dir, mine, params, overwrite)
    mine, todo = plan_embed(shards_spec, out_dir, rank, world_size, config.images_only)
    groups = [todo[i::tasks] for i in range(max(1, min(tasks, len(todo))))] if todo else []
    task_list = [EmbedTask(f"embed[{','.join(s for _, s in g[:3])}{',…' if len(g) > 3 else ''}]", g, str(out_dir), config,
                           retries=retries, fail_fast=fail_fast, params=params)
                 for g in groups]
    if hasattr(progress, "set_total"):
        progress.unit = "shards"
        progress.set_total(len(todo))
    start = time.perf_counter()
    wants_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    # a task runs the teacher plus its own decode workers: reserve CPUs for all of them
    run_executor = make_executor(executor, workers=1, ray_address=ray_address, num_gpus=1.0 if wants_gpu else 0.0,
                                 num_cpus=float(config.workers + 1))
    if executor == "local":
        report = run_executor.run(lambda t: embed_task(t, progress), task_list, retries=retries, fail_fast=fail_fast)
    else:
        report = run_executor.run(embed_task, task_list, retries=retries, fail_fast=fail_fast)
    report.raise_user_error()  # e.g. weights that cannot be loaded: one line, not a table of failed tasks
    summaries = sorted((asdict(s) for r in report.results if r for s in r), key=lambda s: s["shard"])
    # a shard that failed after its retries is named in `failures` (as task failures are), not in `shards`
    shard_failures = [{"task": f"shard {s['shard']}", "error": s["error"], "attempts": s["attempts"]}
                      for s in summaries if s["error"]]
    summaries = [s for s in summaries if not s["error"]]
    result = {"shards_total": len(mine), "shards_skipped_done": len(mine) - len(todo), "shards": summaries,
              "embedded": sum(s["embedded"] for s in summaries), "skipped": sum(s["skipped"] for s in summaries),
              "read": sum(s["read"] for s in summaries),
              "content_uids": sum(s["content_uids"] for s in summaries), "redone": redone,
              "random_init": params["pretrained"].lower() == "none", "out": str(out_dir),
              "seconds": time.perf_counter() - start,
              "failures": shard_failures + [asdict(f) for f in report.failures]}
    if summaries and result["embedded"] == 0 and not result["failures"]:
        raise CurateError(nothing_embedded_message(result, config.images_only))
    return result


def nothing_embedded_message(result: dict, images_only: bool) -> str:
    reasons: dict[str, int] = {}
    for s in result["shards"]:
        for reason, count in s["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + count
    top = ", ".join(f"{reason} ×{count:,}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])[:4])
    hint = "" if images_only or "missing caption" not in reasons else \
        "; to embed images without captions (e.g. a NormSim target) use --images-only"
    return (f"embed: nothing was embedded: {result['read']:,} samples read in {len(result['shards'])} shard(s), "
            f"every one skipped ({top or 'no samples in the shards'}); the records are in "
            f"{Path(result['out']) / ERRORS_DIR}{hint}")
