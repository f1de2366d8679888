"""`curate pcme calibrate | fit | score`: match probability and uncertainty per pool sample.

Tier 1, calibrate: logistic p(match) = σ(-a·(2 - 2s) + b) fitted on sampled positives (s_ii) and random
negatives (s_ij, j != i uniform), one negative per positive, so p_match is the match posterior at even odds.
Tier 2, fit + score: PCME / PCME++ heads on the frozen teacher embeddings (curate.metrics.pcme), trained on a
seeded sample of the pool, then applied to every row in streamed chunks.
Checkpoints hold tensors and plain types only and are read with torch.load(weights_only=True).

Files: this module holds the options and the results (light: the command line imports it); entry.py computes
them (`calibrate_p_match`, `fit_heads`, `p_match_and_uncertainty`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from curate.config import at_least, option, positive

HEADS_FORMAT = "curate-pcme-heads/1"
ESTIMATORS = ("csd", "mc")  # PCME++'s closed-form distance, PCME's Monte Carlo match probability
# J samples per side: PCME's configs (num_samples and n_samples_inference are 7); curate.metrics.pcme's default
SAMPLES = 7
TRUTH_HELP = "e.g. json:truth: report ROC-AUCs clean vs corrupted."
CACHE_HELP = "fp16 memmap caches (default: OUT's directory/.curate-cache)."


@dataclass(frozen=True)
class PcmeCalibrateConfig:
    pairs: int = option(200_000, "Positives sampled for the fit (plus as many negatives).", check=positive)
    seed: int = option(0, "Seed of the sampled pairs.")
    cache_dir: Optional[Path] = option(None, CACHE_HELP, "--cache-dir")
    truth: Optional[str] = option(None, TRUTH_HELP)


@dataclass(frozen=True)
class PcmeFitConfig:
    loss: str = option("csd", "csd (PCME++ closed form) or mc (PCME Monte Carlo).", choices=ESTIMATORS)
    steps: int = option(300, "Optimiser steps.", check=positive)
    batch_size: int = option(256, "Rows per step (in-batch negatives).", "--batch-size", check=at_least(2))
    lr: float = option(2e-3, "Adam learning rate.")
    n_samples: int = option(SAMPLES, "mc: samples J per side ((B·J)² pairs per step; 7 as in PCME).", "--samples",
                            check=positive)
    vib_weight: float = option(1e-4, "Weight of KL(N(μ,σ²) ‖ N(0,I)).", "--vib")
    hidden: int = option(128, "Hidden width of the variance heads.", check=positive)
    max_samples: int = option(200_000, "Rows sampled for training.", "--max-samples", check=positive)
    seed: int = option(0, "Seed of the sampled rows, the batches and the heads' initialisation.")
    device: str = option("auto", "auto, cpu or cuda.")
    cache_dir: Optional[Path] = option(None, CACHE_HELP, "--cache-dir")


@dataclass(frozen=True)
class PcmeScoreConfig:
    estimator: str = option("csd", "csd (closed form) or mc (Monte Carlo).", choices=ESTIMATORS)
    n_samples: int = option(SAMPLES, "mc: samples J per side (7 as in PCME).", "--samples", check=positive)
    seed: int = option(0, "mc: noise seed.")
    device: str = option("auto", "auto, cpu or cuda.")
    truth: Optional[str] = option(None, TRUTH_HELP)


class PcmeTableRecord:
    """A result written into its table's `pcme` metadata."""

    def metadata(self) -> dict:
        """The fields (truth_check only when computed)."""
        meta = {f.name: getattr(self, f.name) for f in fields(self)}
        if meta.get("truth_check", {}) is None:
            del meta["truth_check"]
        return meta


@dataclass
class PcmeCalibration(PcmeTableRecord):
    """Tier 1: the fitted a, b (curate.metrics.pcme.fit_match_logistic) and where they come from."""

    tier: int
    model: str
    a: float
    b: float
    n_iter: int
    converged: bool
    log_loss: float
    n_pairs: int
    seed: int
    teacher: dict
    source: str
    truth_check: dict | None = None  # with `truth`: ROC-AUCs of p_match clean vs corrupted


@dataclass
class PcmeHeadsFit:
    """Tier 2 heads as saved: their config, the teacher of the embeddings, the training record."""

    config: dict  # dim, hidden, loss, n_samples, vib_weight
    teacher: dict
    train: dict  # steps, batch_size, lr, seed, n_train, final_loss, loss_curve, a, b


@dataclass
class PcmeScores(PcmeTableRecord):
    """Tier 2 scores: p_match, csd and the uncertainties of every row, from fitted heads."""

    tier: int
    estimator: str
    n_samples: int | None  # mc only
    heads: str
    a: float
    b: float
    heads_loss: str
    teacher: dict
    source: str
    truth_check: dict | None = None  # with `truth`: ROC-AUCs of p_match and the uncertainties
