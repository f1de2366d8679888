"""`curate compare`: do curated subsets train better students than a random subset of the same size?

DataComp's closed loop in miniature, offline, with ground truth. On a synth CORPUS (`curate synth`, with a
target set in CORPUS/target):

1. teacher: the cached tiny teacher (`ensure_tiny_teacher`) unless `--teacher CKPT` is given;
2. the curation chain, built as a recipe and run by the recipe planner (curate/recipe.py `plan` / `execute`,
   with its digest-chained run markers in COMPARE_DIR, as `curate run` does): `embed` of CORPUS and of
   CORPUS/target with the teacher, `score` (clipscore, negclip), `normsim` (p = inf and p = 2, target = the
   embedded CORPUS/target images) and one `filter` per curation method;
3. one subset per method, all of exactly ceil(F·N) samples (F = --fraction, N = the embedded pool), written
   by the chain's filters (or, for no_filter and random, in the same uid file format):
     no_filter            the whole pool (trained for the same number of steps: DataComp's "no filtering")
     random               a seeded uniform sample (a new one for every seed)
     clipscore            top F by CLIPScore
     negclip              top F by negCLIPLoss
     negclip_normsim_inf  top min(1, P·F) by negCLIPLoss, then of those the top F of the pool by NormSim_∞
     negclip_normsim_2    the same with NormSim_2
   (P = --prefilter, default 1.5: the paper's best recipe keeps 30 % by negCLIPLoss, then 20 % by NormSim_∞);
4. one student per method and seed (`curate train` on tensors decoded once), every one with the same
   budget of steps x batch size samples seen; the budgets are read back from the runs' training JSON and
   must all be equal;
5. evaluation of each student on a held-out synth split made here with another seed and no corruption:
   zero-shot top-1 on the held-out split's own target set (not CORPUS/target, which NormSim selected with)
   and retrieval R@1 (mean of image->text and text->image) on its pairs;
6. compare.json (every run's numbers and budget, each method's removal rate per injected corruption kind,
   from the `truth` in the samples' json) and compare.md (mean ± sample std over seeds; removal table).

COMPARE_DIR holds what `curate run` would write for the chain (emb/, target_emb/, scores.parquet,
normsim_inf.parquet, normsim_2.parquet, subsets/, run.json, the run markers), heldout/, runs/METHOD/seedN/ and
the results. A rerun skips the chain's finished steps (their markers), keeps a held-out split made with the
same parameters and reuses every finished run whose inputs (student config, subset, evaluation, pool) are the
same. COMPARE_DIR/inputs.json records the corpus's and the teacher's identity (contents, not paths): when
either changed, the chain's outputs are removed and made again.

Files: this module holds the options, the result and the methods (light: the command line imports it);
entry.py runs the comparison (`run`); tables.py holds the pure pieces (subset sizes, removal rates, means,
compare.md); runs.py trains and evaluates the students.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

from curate.config import at_least, because, non_negative, option, positive
from curate.config import fraction as pool_fraction
from curate.stages.train_student import LOSS_NAMES

FORMAT = "curate-compare/1"
METHODS = ("no_filter", "random", "clipscore", "negclip", "negclip_normsim_inf", "negclip_normsim_2")
METHOD_LABELS = {
    "no_filter": "no filter (whole pool)",
    "random": "random",
    "clipscore": "CLIPScore top-F",
    "negclip": "negCLIPLoss top-F",
    "negclip_normsim_inf": "negCLIPLoss → NormSim∞",
    "negclip_normsim_2": "negCLIPLoss → NormSim₂",
}
# Corruptions whose caption does not describe the image; clones and duplicates are correct, redundant pairs.
MISMATCHED_KINDS = ("swapped", "generic", "noise_image")
# Held-out split: generated with seed (corpus seed + HELDOUT_SEED_OFFSET), clean, with its own target set.
HELDOUT_SEED_OFFSET = 7919

PRESETS = {
    "default": {"steps": 400, "batch_size": 128, "heldout_samples": 1000, "heldout_target_samples": 600},
    "quick": {"steps": 120, "batch_size": 64, "heldout_samples": 300, "heldout_target_samples": 300},
}


@dataclass(frozen=True)
class CompareConfig:
    # The fields are recorded in compare.json (`config`) under these names.
    fraction: float = option(0.3, "Subset size as a fraction of the pool (every method).", check=pool_fraction)
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
    negclip_batch: int = option(32768, "negclip: batch size B.", check=positive, cli=False)
    teacher: Optional[str] = option(None, "Teacher checkpoint (default: the cached tiny teacher).")
    teacher_model: Optional[str] = option(None, "Architecture of --teacher when it is not a curate checkpoint.",
                                          "--teacher-model")
    device: str = option("auto", "auto (cuda when present), cpu or cuda.")
    threads: Optional[int] = option(1, "torch threads per student (1: small models; see --jobs; 0: torch's default).",
                                    check=non_negative)
    jobs: int = option(2, "Students trained at once (processes).", check=positive)

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
    methods: dict  # per method: label, subset_size, subsets, removal, recipe
    runs: list[dict]  # per (method, seed): the numbers, budget, curve
    summary: dict  # per method: mean ± std over seeds
    timings: dict
    machine: dict

    def document(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
