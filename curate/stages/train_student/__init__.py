"""`curate train`: train a small student CLIP from scratch on a subset, with a fixed budget; and student eval.

The closed loop of DataComp in miniature: a subset is judged by the model it trains. Every student of a
comparison sees the same number of samples (steps x batch size), whatever the subset size, so a smaller or
cleaner subset is not given more or less compute. The budget is written into the training JSON and the
checkpoint, and `curate compare` refuses to tabulate runs whose budgets differ.

Inputs: a `curate filter` output directory (or a DataComp `uids.npy`) plus the shards it was selected from
(`--corpus`), or shards that hold only the kept samples (`curate export` output). The kept samples are
decoded once into one image tensor and one token tensor (students are trained on small synth corpora; this
stage is the miniature experiment, not a web-scale trainer).

Losses (`--loss`):
  infonce  CLIP's symmetric InfoNCE (curate.models.train.infonce_loss);
  adacl    AdaCL's Algorithm 1 (curate.metrics.adacl.adacl_loss): per step and direction, clone discovery on
           the batch (salient scores, labelled GDA, anchor) and the margins m1, m2 tuned from the previous
           step's (1/τ, 0 at the start); in-batch negatives only (the paper adds a momentum memory bank);
  pcme     PCME++ probabilistic heads (curate.metrics.pcme.PCMEHeads) on the student's normalised embeddings,
           trained jointly with the towers by the closed-form (CSD) match loss; the heads are saved in the
           checkpoint, and evaluation uses their normalised means μ.

Evaluation (`evaluate_student`): zero-shot top-1 accuracy on a synth target set (class prompts from its
classes.json through the student's text tower, averaged over templates) and retrieval R@1 (both directions,
curate.metrics.retrieval) on a held-out synth split.

Files: this module holds the options, the result and the file names (light: the command line imports it);
entry.py runs `curate train` (`run`); data.py decodes pairs; training.py trains and saves a student;
evaluation.py evaluates one (imports go entry -> training / evaluation -> data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from curate.config import at_least, because, non_negative, option, positive

LOSS_NAMES = ("infonce", "adacl", "pcme")
CHECKPOINT_NAME = "student.pt"
TRAIN_JSON = "train.json"
CURVE_PNG = "curve.png"
EVAL_JSON = "eval.json"
EVAL_BATCH = 256


def greater_than_zero(value) -> str | None:
    return None if value > 0 else "must be > 0"


@dataclass(frozen=True)
class StudentConfig:
    # The fields are recorded (train.json, the checkpoint, `curate compare`'s run keys) under these names.
    model: str = option("curate-student", "Student architecture (an open_clip config).")
    loss: str = option("infonce", "infonce, adacl (AdaCL's Algorithm 1: in-batch clone discovery and margins) or "
                       "pcme (PCME++ probabilistic heads).", choices=LOSS_NAMES)
    steps: int = option(300, "Training steps; the budget is steps x batch size samples seen.", check=positive)
    batch_size: int = option(128, "Pairs per step.", "--batch-size",
                             check=because(at_least(2), "contrastive batches"))
    lr: float = option(2e-3, "Peak learning rate (warmup, then cosine decay).", check=greater_than_zero)
    weight_decay: float = option(0.1, "AdamW weight decay.", cli=False)
    warmup: Optional[int] = option(None, "Warmup steps (default: steps // 10, curate.models.train).", cli=False)
    augment: bool = option(True, "Random flips and small shifts.", cli=False)
    seed: int = option(0, "Seed of initialisation, batches and augmentation.")
    threads: Optional[int] = option(None, "torch threads (default and 0: torch's).", check=non_negative)
    device: str = option("auto", "auto (cuda when present), cpu or cuda. Deterministic on CPU.")
    log_every: int = option(10, "Steps between two log entries.", check=positive, cli=False)
    adacl_eps: float = option(0.1, "AdaCL: a perfect match (s = 1) gets probability 1 - eps.", cli=False)
    pcme_vib: float = option(1e-4, "PCME: weight of the KL(N(μ, σ²) ‖ N(0, I)) regulariser.", cli=False)
    pcme_hidden: int = option(64, "PCME: hidden width of the variance heads.", check=positive, cli=False)


@dataclass
class TrainStudentResult:
    """What `curate train` recorded (train.json), and the evaluation when asked for (eval.json)."""

    checkpoint: str
    config: dict  # the StudentConfig, device resolved
    budget: dict  # steps, batch_size, samples_seen, train_pairs, epochs
    data: dict  # where the pairs came from, their count, truth counts and skips
    history: list[dict]  # log entries: step, loss, lr, logit_scale, ...
    train_seconds: float
    final_loss: float | None
    torch_threads: int
    eval: dict | None = None  # zero_shot and/or retrieval, with --heldout / --target
