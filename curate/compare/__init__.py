"""`curate compare`: which selection signal picks the subset that trains the better student, against ground truth?

DataComp's closed loop in miniature, offline, on a synth CORPUS (`curate synth`, format curate-synth/2, with a
target set in CORPUS/target):

1. teacher: the cached tiny teacher (`ensure_tiny_teacher`) unless `--teacher CKPT` is given;
2. the curation chain, built as a recipe and run by the recipe planner (curate/recipe.py `plan` / `execute`,
   with its digest-chained run markers in COMPARE_DIR, as `curate run` does): `embed` of CORPUS and of
   CORPUS/target, `score` (clipscore, negclip), `normsim` (p = inf and 2 against the embedded target images;
   p = 2d without a target, final fraction F), `clones` (AdaCL's Algorithm 1 on seeded pool-wide batches) and
   the filters of the score-table methods; then the stages the recipe has no section for, run here with their
   own digest markers (signals.py): `pcme calibrate`, `pcme fit` + `pcme score`, `dedup` (SemDeDup),
   `decontaminate` against the target images, and the filters that read their tables;
3. one subset per method, every one of exactly ceil(F·N) samples (F = --fraction, N = the embedded pool):
     no_filter            the whole pool (trained for the same number of steps: DataComp's "no filtering")
     random               a seeded uniform sample (a new one for every seed)
     oracle               from the ground truth: correct pairs, one per semantic group, target family first
     clipscore, negclip   top F by the score
     negclip_normsim_inf  top min(1, P·F) by negCLIPLoss, then of those the top F of the pool by NormSim_∞
     negclip_normsim_2    the same with NormSim_2
     normsim_2d           top F by NormSim_2-D (`curate normsim --p 2d`, no target)
     clone_flags          faithful AdaCL: the samples it flags dropped, then F of the pool from the rest by uid
                          (a pseudo-random choice: the flag is the only signal)
     pcme_p_match         top F by PCME++'s match probability (heads fitted on the pool)
     pcme_certainty       top F by −uncertainty (the mean σ² of both PCME++ heads)
     semdedup             SemDeDup's duplicates dropped, then F of the pool from the rest by uid (likewise)
     semdedup_negclip     SemDeDup, then the top F of the pool by negCLIPLoss among the kept
   (P = --prefilter, default 1.5: the paper's best recipe keeps 30 % by negCLIPLoss, then 20 % by NormSim_∞);
4. one student per method and seed (`curate train` on tensors decoded once), every one with the same budget of
   steps x batch size samples seen; then (the default preset, or --loss-rows), on the best filtered subset (highest
   mean zero-shot), students trained with --loss adacl and --loss pcme (rows adacl_loss, pcme_loss);
5. evaluation of each student on a held-out split made here with another seed and no corruption: zero-shot top-1
   on the held-out split's own target set (not CORPUS/target, which NormSim selected with) and retrieval R@1
   (mean of image->text and text->image) on its pairs;
6. compare.json: per row summary[row][metric] = {mean, std, ci95, n} for zero_shot, retrieval_r1 and headroom
   ((row − random) / (oracle − random), per seed), and the paired differences to random; signal quality without
   students: signals[score][kind] = ROC-AUC clean vs kind, removal per kind and phenomenon at equal kept
   fraction, clones / pcme / dedup / decontamination against the truth; compare.md renders it.

COMPARE_DIR holds what `curate run` would write for the chain (emb/, target_emb/, scores.parquet, normsim_*.parquet,
clones.parquet, subsets/, run.json, the run markers), the other stages' tables (pcme*.parquet, dedup.parquet,
contamination.parquet, signals.parquet), heldout/, runs/ROW/seedN/ and the results. A rerun skips finished steps,
keeps a held-out split made with the same parameters and reuses every finished run whose inputs (student config,
subset, evaluation, pool) are the same. COMPARE_DIR/inputs.json records the corpus's and the teacher's identity
(contents, not paths): when either changed, the chain's outputs are removed and made again.

Files: this module holds the options, the result and the rows (light: the command line imports it); entry.py runs
the comparison (`run`); signals.py runs the stages outside the recipe and reads the truth; quality.py measures the
signals against the truth; tables.py holds the pure pieces (subset sizes, the oracle, removal rates, summaries,
compare.md); runs.py trains and evaluates the students.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from curate.config import at_least, because, in_unit_interval, non_negative, option, positive
from curate.config import fraction as pool_fraction
from curate.stages.train_student import LOSS_NAMES

FORMAT = "curate-compare/2"
# The rows trained with the main --loss, in table order; then the loss rows on the best filtered subset.
METHODS = ("no_filter", "random", "oracle", "clipscore", "negclip", "negclip_normsim_inf", "negclip_normsim_2",
           "normsim_2d", "clone_flags", "pcme_p_match", "pcme_certainty", "semdedup", "semdedup_negclip")
LOSS_ROWS = {"adacl_loss": "adacl", "pcme_loss": "pcme"}
ROWS = METHODS + tuple(LOSS_ROWS)
# The filtered methods: candidates for "best subset" (the loss rows train on it) and the headroom's subjects.
SELECTION_METHODS = METHODS[3:]
METHOD_LABELS = {
    "no_filter": "no filter (whole pool)",
    "random": "random",
    "oracle": "oracle (ground truth)",
    "clipscore": "CLIPScore top-F",
    "negclip": "negCLIPLoss top-F",
    "negclip_normsim_inf": "negCLIPLoss → NormSim∞",
    "negclip_normsim_2": "negCLIPLoss → NormSim₂",
    "normsim_2d": "NormSim₂-D",
    "clone_flags": "AdaCL clone flags dropped",
    "pcme_p_match": "PCME++ p_match top-F",
    "pcme_certainty": "PCME++ lowest uncertainty",
    "semdedup": "SemDeDup",
    "semdedup_negclip": "SemDeDup → negCLIPLoss",
    "adacl_loss": "best subset, AdaCL loss",
    "pcme_loss": "best subset, PCME++ loss",
}
# Held-out split: generated with seed (corpus seed + HELDOUT_SEED_OFFSET), clean, with its own target set.
HELDOUT_SEED_OFFSET = 7919

PRESETS = {
    "default": {"steps": 600, "batch_size": 64, "heldout_samples": 1000, "heldout_target_samples": 800,
                "loss_rows": True},
    "quick": {"steps": 200, "batch_size": 64, "heldout_samples": 300, "heldout_target_samples": 400,
              "loss_rows": False},
}


def cosine_distance(value) -> str | None:
    return None if 0 < value < 2 else "must be in (0, 2): a cosine distance"


@dataclass(frozen=True)
class CompareConfig:
    # The fields are recorded in compare.json (`config`) under these names.
    fraction: float = option(0.2, "Subset size as a fraction of the pool (every method; 0.2 is the paper's final "
                             "size: negCLIPLoss 30 %, then NormSim 20 %).", check=pool_fraction)
    seeds: int = option(3, "Students per method (seeds 0..N-1).", check=positive)
    quick: bool = option(False, "The small preset for CI (fewer steps, smaller held-out split).", "--quick")
    steps: Optional[int] = option(None, "Override the preset's training steps.", check=positive)
    batch_size: Optional[int] = option(None, "Override the preset's batch size.", "--batch-size", check=positive)
    heldout_samples: Optional[int] = option(None, "Held-out pairs (default: the preset's).", check=positive,
                                            cli=False)
    heldout_target_samples: Optional[int] = option(None, "Held-out target images (default: the preset's).",
                                                   check=positive, cli=False)
    model: str = option("curate-student", "Student architecture.")
    loss: str = option("infonce", "Student loss: infonce, adacl or pcme.", choices=LOSS_NAMES)
    lr: float = option(2e-3, "Students' peak learning rate.", cli=False)
    prefilter: float = option(1.5, "NormSim recipes: negclip first keeps min(1, P x F).",
                              check=because(at_least(1), "negclip keeps prefilter x fraction first"))
    negclip_k: int = option(10, "negclip: number of random partitions K.", check=positive, cli=False)
    negclip_batch: Optional[int] = option(None, "negclip: batch size B (default: the paper's rule, the teacher's own "
                                          "training batch when its checkpoint records it: 128 for the tiny "
                                          "teacher; else OpenAI CLIP's 32768).", check=positive, cli=False)
    teacher: Optional[str] = option(None, "Teacher checkpoint (default: the cached tiny teacher).")
    teacher_model: Optional[str] = option(None, "Architecture of --teacher when it is not a curate checkpoint.",
                                          "--teacher-model")
    device: str = option("auto", "auto (cuda when present), cpu or cuda.")
    threads: Optional[int] = option(1, "torch threads per student (1: small models; see --jobs; 0: torch's default).",
                                    check=non_negative)
    jobs: int = option(2, "Students trained at once (processes).", check=positive)
    loss_rows: Optional[bool] = option(None, "Also train --loss adacl and --loss pcme students on the best filtered "
                                       "subset (default: the preset's; off with --quick).",
                                       "--loss-rows/--no-loss-rows")
    dedup_eps: float = option(0.002, "SemDeDup's ε (a member within cosine 1 − ε of a kept one is dropped; the tiny "
                              "teacher's images are close: 0.002 keeps about 80 % of a synth pool).",
                              "--dedup-eps", check=cosine_distance)
    contamination_threshold: float = option(0.999, "decontaminate: image cosine at which a pool sample counts as a "
                                            "copy of a target image.", "--contamination-threshold",
                                            check=in_unit_interval)
    clones_batch: int = option(4096, "AdaCL's discovery batch (curate clones --batch-size).", check=at_least(2),
                               cli=False)
    pcme_steps: int = option(300, "PCME++ heads: training steps (curate pcme fit --steps).", check=positive,
                             cli=False)

    def resolved(self) -> "CompareConfig":
        """The preset's values where none was given."""
        preset = PRESETS["quick" if self.quick else "default"]
        return replace(self, **{k: v if getattr(self, k) is None else getattr(self, k) for k, v in preset.items()})


@dataclass
class CompareResult:
    """The compare.json document (`document()`, in this order)."""

    format: str
    config: dict  # the CompareConfig, resolved
    corpus: dict  # path, samples, parameters, corruption_kinds, truth_counts
    teacher: dict  # file, model, sha256
    subset_size: int
    prefilter_fraction: str
    budget: dict  # steps, batch_size, samples_seen: the same for every run
    eval: dict  # the held-out split
    methods: dict  # per row: label, subset_size, subsets, removal (per kind and phenomenon), recipe
    best: str | None  # the filtered method with the highest mean zero-shot (the loss rows' subset)
    runs: list[dict]  # per (row, seed): the numbers, budget, curve
    summary: dict  # summary[row][metric] = {mean, std, ci95, n}: zero_shot, retrieval_r1, headroom, ...
    signals: dict  # signals[score][kind] = ROC-AUC clean vs kind
    clones: dict  # precision, recall, f1 of the clone flags against semantic_group (and `injected`)
    pcme: dict  # spearman_uncertainty_specificity, auc_partial_mismatch
    dedup: dict  # precision, recall, f1 of SemDeDup's drops against the semantic groups
    decontamination: dict  # recall (and precision) on the planted target images
    timings: dict
    machine: dict

    def document(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
