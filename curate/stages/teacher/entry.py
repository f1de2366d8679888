"""`curate teacher train`'s entry: decode the corpus once, train from scratch, save the checkpoint (`run`)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from curate.config import check_config
from curate.errors import CurateError
from curate.io.shards import SampleError, decode_sample, expand_shards, iter_shard
from curate.stages.teacher import TeacherTrainConfig, TeacherTrainResult


@dataclass
class TrainingPairs:
    images: torch.Tensor            # [N,3,H,W] preprocessed
    tokens: torch.Tensor            # [N,L]
    used: int = 0
    excluded_by_truth: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # reason -> count
    shards: int = 0
    seconds: float = 0.0


def load_training_pairs(corpus: str, preprocess: Callable, tokenizer: Callable, clean_only: bool = True,
                        on_problem: Callable[[str, str], None] | None = None) -> TrainingPairs:
    """Decode every usable sample of `corpus` (dir, glob, brace pattern) into one image and one token tensor."""
    started = time.perf_counter()
    urls = expand_shards(corpus)
    images, captions = [], []
    skipped: dict[str, int] = {}
    excluded: dict[str, int] = {}

    def problem(key: str, reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1
        if on_problem is not None:
            on_problem(key, reason)

    for url in urls:
        for raw in iter_shard(url, problem):
            try:
                sample = decode_sample(raw)
            except SampleError as exc:
                problem(raw.key, str(exc))
                continue
            truth = sample.meta.get("truth")
            if clean_only and truth is not None and truth != "clean":
                excluded[str(truth)] = excluded.get(str(truth), 0) + 1
                continue
            images.append(preprocess(sample.image))
            captions.append(sample.caption)
    if len(images) < 2:
        raise CurateError(f"{corpus}: only {len(images)} usable {'clean ' if clean_only else ''}image-caption pairs; "
                          "contrastive training needs at least 2 (make one with `curate synth`)")
    return TrainingPairs(images=torch.stack(images), tokens=tokenizer(captions), used=len(images),
                         excluded_by_truth=excluded, skipped=skipped, shards=len(urls),
                         seconds=time.perf_counter() - started)


def corpus_manifest(corpus: str) -> dict | None:
    """The synth manifest's identity (format, seed, parameters) of a corpus directory, or None."""
    path = Path(corpus) / "manifest.json"
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(path.read_text())
        return {"format": manifest.get("format"), "seed": manifest.get("seed"),
                "parameters": manifest.get("parameters")}
    return None


def run(corpus: str, out: str | Path, cfg: TeacherTrainConfig = TeacherTrainConfig(),
        on_log: Callable[[dict], None] | None = None) -> TeacherTrainResult:
    """Train `cfg.model` from scratch on `corpus` and save a checkpoint at `out`. `on_log(entry)`: every
    `cfg.log_every` steps, {step, loss, lr, logit_scale}."""
    from curate.models.teacher import create_model, eval_transform, model_config, resolve_device, save_checkpoint
    from curate.models.train import train_clip
    from curate.run.threads import torch_threads

    import open_clip

    check_config(cfg)
    # recorded in the checkpoint as run: 0 threads as None (all cores), the device resolved
    cfg = replace(cfg, threads=cfg.threads or None, device=str(resolve_device(cfg.device)))
    started = time.perf_counter()
    arch = model_config(cfg.model)
    torch.manual_seed(cfg.seed)  # parameter init is part of the seeded run
    model = create_model(cfg.model, arch)
    tokenizer = open_clip.get_tokenizer(cfg.model, context_length=int(model.context_length))
    with torch_threads(cfg.threads):
        pairs = load_training_pairs(corpus, eval_transform(model), tokenizer, cfg.clean_only)
    history = train_clip(model, pairs.images, pairs.tokens, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                         seed=cfg.seed, loss="infonce", log_every=cfg.log_every, augment=cfg.augment,
                         weight_decay=cfg.weight_decay, warmup=cfg.warmup, num_threads=cfg.threads,
                         device=cfg.device, on_log=on_log)
    train_seconds = time.perf_counter() - started - pairs.seconds
    training = {
        "corpus": str(Path(corpus).resolve()) if "://" not in str(corpus) else str(corpus),
        "corpus_manifest": corpus_manifest(corpus),
        "samples": pairs.used,
        "clean_only": cfg.clean_only,
        "excluded_by_truth": pairs.excluded_by_truth,
        "skipped": pairs.skipped,
        "shards": pairs.shards,
    }
    # No timings in the checkpoint: the same corpus, config and seed give a byte-identical file.
    extra = {"training": training, "train_config": asdict(cfg), "steps": cfg.steps, "seed": cfg.seed,
             "history": history, "torch_threads": cfg.threads or torch.get_num_threads()}
    model.to("cpu")
    path = save_checkpoint(model, out, cfg.model, arch, extra)
    return TeacherTrainResult(out=str(path), samples=pairs.used, excluded_by_truth=pairs.excluded_by_truth,
                              skipped=sum(pairs.skipped.values()), steps=cfg.steps, final_loss=history[-1]["loss"],
                              logit_scale=history[-1]["logit_scale"], decode_seconds=pairs.seconds,
                              train_seconds=train_seconds, seconds=time.perf_counter() - started)
