"""`curate teacher train`: train curate-tiny contrastively on a synth corpus, on CPU, in minutes; `curate teacher
tiny`: the cached curate-tiny checkpoint.

No pretrained CLIP weights reach our machines, so the project's teacher is trained here, once per machine
(tiny.py caches it). The whole corpus is small (a few thousand 64 px pictures), so every image is decoded and
preprocessed once into one tensor and training runs on that tensor.

Training data choice: when a sample's `.json` has a `truth` field (synth corpora), only `clean` pairs are
used (unless `clean_only` is off). A real teacher (OpenAI CLIP, LAION) is trained on noisy web data, but a
tiny teacher with three minutes of CPU learns the caption-picture correspondence faster and more reliably from
correct pairs, and the acceptance measure (clean vs swapped CLIPScore on a held-out corpus) is about that
correspondence. Samples without `truth` (any other WebDataset corpus) are all used.

Files: this module holds the options, the result and the cached teacher's recipe (light: the command line
imports it); entry.py trains (`run`); tiny.py keeps the cached curate-tiny (`ensure_tiny_teacher`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from curate.config import at_least, non_negative, option, positive


@dataclass(frozen=True)
class TeacherTrainConfig:
    # The field names and values are the cached teacher's recipe (tiny.py hashes them into its file name).
    model: str = option("curate-tiny", "Architecture (an open_clip config name).")
    steps: int = option(350, "Optimiser steps.", check=positive)
    batch_size: int = option(128, "Pairs per step.", "--batch-size", check=at_least(2))
    lr: float = option(2e-3, "Peak learning rate (AdamW, warmup + cosine).")
    seed: int = option(0, "Seed for init, batches and augmentation (CPU: same seed, same weights).")
    augment: bool = option(True, "Random flips and small shifts.", "--augment/--no-augment")
    weight_decay: float = option(0.1, "AdamW weight decay.", cli=False)
    warmup: Optional[int] = option(None, "Warmup steps (default: steps // 10).", cli=False)
    # torch intra-op threads (None or 0: all cores). One thread makes a run reproducible on any machine with the
    # same CPU kind, whatever its core count, and is 3x faster than two when other processes share the cores.
    threads: Optional[int] = option(1, "torch CPU threads; 1 (default) is reproducible across machines and fastest "
                                    "on a busy machine, 0 means all cores.", check=non_negative)
    device: str = option("cpu", "cpu (deterministic), cuda or auto.", choices=("cpu", "cuda", "auto"))
    clean_only: bool = option(True, "Train on the samples whose json `truth` is clean (--all-pairs: on every "
                              "sample).", "--clean-only/--all-pairs")
    log_every: int = option(50, "Steps between two log entries.", check=positive, cli=False)


@dataclass(frozen=True)
class TinyTeacherConfig:
    cache_dir: Optional[Path] = option(None, "Default: $CURATE_CACHE/teacher; else .cache/teacher in a source "
                                       "checkout, ~/.cache/curate/teacher when installed as a package.",
                                       "--cache-dir")


@dataclass
class TeacherTrainResult:
    out: str  # the checkpoint
    samples: int  # pairs trained on
    excluded_by_truth: dict[str, int]  # non-clean pairs left out, per truth kind
    skipped: int  # unusable samples
    steps: int
    final_loss: float
    logit_scale: float
    decode_seconds: float
    train_seconds: float
    seconds: float


# The cached teacher: corpus and training recipe. Changing any value gives a new cache file name.
TINY_TEACHER_CORPUS = {"samples": 6000, "shard_size": 1000, "seed": 12345, "corrupt": 0.0, "target_samples": 0,
                       "image_size": 64}
TINY_TEACHER_TRAIN = TeacherTrainConfig()
