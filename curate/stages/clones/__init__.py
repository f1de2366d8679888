"""`curate clones`: AdaCL's clone discovery over seeded pool-wide batches, a pool-wide k-NN extension,
tier-0 uncertainty and near-duplicates for every pool sample.

1. AdaCL (Pan et al., ICLR 2025), Algorithm 1 lines 2-5, as the paper runs it: on batches. The pool is
   partitioned with `seed` into batches of b = min(batch_size, N) samples exactly as negCLIPLoss does
   (curate.metrics.negclip.partition_batches, partition 0: a seeded permutation, the ragged last batch filled
   up with samples that take their own values from their own batch). In each batch and in each direction
   (image->text on S = V Tᵀ, text->image on Sᵀ): salient scores, the labelled GDA (clone class from the
   least salient sample's negatives, non-clone class from the most salient one's), S̄ and the anchor
   (curate.metrics.adacl.discover_clones). Per sample: clone_prob = p(C | s_i,partner), the GDA posterior
   of its hardest negative in its batch, clone_partner (that negative's uid), clone_gap (its salient score
   in the batch); and its batch's anchor: anchor_similarity (s_uu), anchor_gap (the median gap over S̄),
   anchor_p_hat (p̂_u under plain InfoNCE at the teacher's τ). The margins m1, m2 that line 5 would set from
   there (with --eps) are summarised in the metadata. Batches where the GDA is undefined (a labelled set
   without spread, e.g. b = 2) give NaN clone_prob; batches with an empty S̄ give NaN anchor columns.
   Cost: O(N·b·D) for the similarities plus O(N·b) for the posterior, on the CPU.
2. Pool-wide extension (ours): exact (k+1)-NN in both directions (never an N x N matrix) gives the salient
   score against the whole pool, knn_gap_i2t / knn_gap_t2i, knn_partner(_t2i), knn_count(_t2i)
   (#j != i with s_ij >= s_ii - margin, exact: saturated lists are recounted), p_match_softmax(_t2i) and
   entropy (softmax of the positive among itself and its k best negatives), hubness. Its GDA is the labelled
   one: i⁺ / i⁻ are the most / least salient samples of the pool, their classes are fitted to all their N - 1
   pool negatives, and knn_clone_prob(_t2i) = p(C | the sample's hardest pool negative). It has no anchor.
   Cost: O(N² D) per direction (FAISS BLAS on CPU, torch matmul + topk on CUDA).
3. image -> images k-NN: duplicate_of (cosine >= dup_threshold, pointing to the earliest copy).

Memory: the two fp16 matrices are memory-mapped (cached beside the output, as `curate score` does); RAM holds
one batch (b x b float64, 134 MB at b = 4096), one k-NN query block and one database block (float32,
<= 256 MiB), plus ~150 bytes per sample of output columns.

duplicate_of: cosine >= dup_threshold (default 0.999) between image embeddings. Exact copies give identical
fp16 embeddings whose cosine differs from 1 only by fp16 rounding of the stored unit vectors (~1e-4 for
D = 128; measured on the synth corpus with curate-tiny: every exact copy >= 0.9999), so 0.999 keeps exact and
near-exact copies. Merely similar pictures can score high too: with curate-tiny on synth pictures the nearest
other image has median cosine 0.991, so 0.99 would merge them. With a strong teacher and re-encoded or resized
copies of real photos, lower it (0.95-0.99). Chains are followed so that every copy points to the earliest
pool index of its group, whose own value stays null.

Files: this module holds the options and the result (light: the command line imports it); entry.py computes
the table (`run`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from curate.config import at_least, because, open_unit_interval, option, positive

CLONE_TRUTH = ("clone", "duplicate")  # the truth kinds a clone detector should flag


@dataclass(frozen=True)
class ClonesConfig:
    # every query sees 4095 in-batch negatives, about the 4096 negatives of the paper's memory bank
    batch_size: int = option(4096, "AdaCL's discovery batch B (pool partitioned with --seed as negCLIPLoss does; "
                             "every query sees B - 1 negatives).", "--batch-size",
                             check=because(at_least(2), "a contrastive batch needs at least 2 samples"))
    seed: int = option(0, "Seed of the batch partition.")
    eps: float = option(0.1, "AdaCL's ε: the margins put a perfect match at 1 - ε (per-batch margins in the "
                        "metadata).",
                        check=because(open_unit_interval, "AdaCL puts a perfect match at 1 - eps"))
    k: int = option(10, "Pool-wide k-NN extension: neighbours per sample (for knn_count, p_match_softmax).",
                    check=because(positive, "need at least one neighbour"))
    margin: Optional[float] = option(None, "knn_count margin in cosine units (default: the teacher's τ, i.e. one "
                                     "logit).")
    dup_threshold: float = option(0.999, "Image cosine for duplicate_of (0.999: exact and near-exact copies; lower "
                                  "for a strong teacher).", "--dup-threshold")
    dup_k: int = option(8, "Image neighbours searched for duplicate_of.", check=positive, cli=False, recipe=False)
    device: str = option("auto", "auto (cuda when present), cpu or cuda for the exact k-NN.")
    cache_dir: Optional[Path] = option(None, "fp16 memmap caches (default: OUT's directory/.curate-cache).",
                                       "--cache-dir")
    query_block: int = option(8192, "k-NN queries per block.", check=positive, cli=False, recipe=False)
    truth: Optional[str] = option(None, "e.g. json:truth: also report precision/recall/F1 of clone_prob > 0.5 (and "
                                  "knn_clone_prob > 0.5) against injected clone/duplicate samples.")


@dataclass
class ClonesResult:
    """What `curate clones` found; `metadata()` is what the table's `clones` metadata holds."""

    n: int
    batch_size: int  # effective: min(B, N)
    n_batches: int
    seed: int
    eps: float
    tau: float
    k: int
    margin: float
    dup_threshold: float
    dup_k: int
    n_potential_clones: int  # flagged: clone_prob > 0.5 in either direction
    batches: dict  # per direction: medians over the batches of AdaCL's lines 2-5 and why batches had no update
    knn_gda: dict
    n_duplicates: int
    n_recounted: dict
    teacher: dict
    source: str
    index: str
    truth_check: dict | None = None  # with `truth`

    def metadata(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.truth_check is None:
            del meta["truth_check"]
        return meta
