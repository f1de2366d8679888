"""`curate teacher train`: train curate-tiny contrastively on a synth corpus, on CPU, in minutes.

No pretrained CLIP weights reach our machines, so the project's teacher is trained here, once per machine
(`ensure_tiny_teacher` caches it). The whole corpus is small (a few thousand 64 px pictures), so every image
is decoded and preprocessed once into one tensor and training runs on that tensor.

Training data choice: when a sample's `.json` has a `truth` field (synth corpora), only `clean` pairs are
used. A real teacher (OpenAI CLIP, LAION) is trained on noisy web data, but a tiny teacher with three minutes
of CPU learns the caption-picture correspondence faster and more reliably from correct pairs, and the
acceptance measure (clean vs swapped CLIPScore on a held-out corpus) is about that correspondence.
Samples without `truth` (any other WebDataset corpus) are all used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from curate.errors import CurateError
from curate.io.shards import SampleError, decode_sample, expand_shards, iter_shard


@dataclass
class TeacherTrainConfig:
    model: str = "curate-tiny"
    steps: int = 350
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    augment: bool = True
    weight_decay: float = 0.1
    warmup: int | None = None
    # torch intra-op threads (None: all cores). One thread makes a run reproducible on any machine with the same
    # CPU kind, whatever its core count, and is 3x faster than two when other processes share the cores.
    threads: int | None = 1
    device: str = "cpu"
    clean_only: bool = True
    log_every: int = 50


# The cached teacher: corpus and training recipe. Changing any value gives a new cache file name.
TINY_TEACHER_CORPUS = {"samples": 6000, "shard_size": 1000, "seed": 12345, "corrupt": 0.0, "target_samples": 0,
                       "image_size": 64}
TINY_TEACHER_TRAIN = TeacherTrainConfig()


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


def _corpus_manifest(corpus: str) -> dict | None:
    path = Path(corpus) / "manifest.json"
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(path.read_text())
        return {"format": manifest.get("format"), "seed": manifest.get("seed"),
                "parameters": manifest.get("parameters")}
    return None


def train_teacher(corpus: str, out: str | Path, config: TeacherTrainConfig | None = None,
                  on_log: Callable[[dict], None] | None = None) -> dict:
    """Train `config.model` from scratch on `corpus` and save a checkpoint at `out`; return a summary."""
    from curate.models.teacher import create_model, eval_transform, model_config, save_checkpoint
    from curate.models.train import train_clip
    from curate.run.threads import torch_threads

    import open_clip

    cfg = config or TeacherTrainConfig()
    if cfg.steps < 1 or cfg.batch_size < 2:
        raise CurateError(f"--steps must be >= 1 and --batch-size >= 2 (got {cfg.steps}, {cfg.batch_size})")
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
        "corpus_manifest": _corpus_manifest(corpus),
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
    return {"out": str(path), "samples": pairs.used, "excluded_by_truth": pairs.excluded_by_truth,
            "skipped": sum(pairs.skipped.values()), "steps": cfg.steps, "final_loss": history[-1]["loss"],
            "logit_scale": history[-1]["logit_scale"], "decode_seconds": pairs.seconds,
            "train_seconds": train_seconds, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- the cached tiny teacher

def tiny_teacher_cache_dir() -> Path:
    """$CURATE_CACHE/teacher, else <repo>/.cache/teacher for a source checkout, else ~/.cache/curate/teacher."""
    env = os.environ.get("CURATE_CACHE")
    if env:
        return Path(env).expanduser() / "teacher"
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "teacher"
    return Path.home() / ".cache" / "curate" / "teacher"


def tiny_teacher_recipe() -> dict:
    from curate.models.teacher import model_config

    train = asdict(TINY_TEACHER_TRAIN)
    train.pop("log_every")
    return {"corpus": TINY_TEACHER_CORPUS, "train": train, "config": model_config(TINY_TEACHER_TRAIN.model)}


def tiny_teacher_path(cache_dir: Path | None = None) -> Path:
    """Where the cached teacher for the current recipe lives (the name changes with the recipe)."""
    digest = hashlib.sha256(json.dumps(tiny_teacher_recipe(), sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir or tiny_teacher_cache_dir()) / f"curate-tiny-{digest}.pt"


def ensure_tiny_teacher(cache_dir: Path | None = None, on_log: Callable[[dict], None] | None = None) -> Path:
    """The cached curate-tiny checkpoint; made (synth corpus + training, ~3 min on 2 cores) when missing.

    A file lock serialises concurrent callers: the second waits and then finds the checkpoint.
    """
    path = tiny_teacher_path(cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return path
        from curate.stages.synth import SynthConfig
        from curate.stages.synth import entry as synth

        corpus = path.parent / f"corpus-seed{TINY_TEACHER_CORPUS['seed']}-n{TINY_TEACHER_CORPUS['samples']}"
        synth.run(corpus, SynthConfig(**TINY_TEACHER_CORPUS))
        train_teacher(str(corpus), path, TINY_TEACHER_TRAIN, on_log=on_log)
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
