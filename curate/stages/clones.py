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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.errors import CurateError
from curate.io.tables import EmbeddingPool, write_table_atomic
from curate.metrics import adacl
from curate.metrics import clones as cm
from curate.metrics.negclip import batches_per_partition, effective_batch_size, partition_batches
from curate.models.teacher import resolve_device
from curate.stages.common import clipscore_blocks, pool_cache_dir

CLONE_TRUTH = ("clone", "duplicate")
# Default batch: every query sees 4095 in-batch negatives, about the 4096 negatives of the paper's memory bank.
DEFAULT_BATCH_SIZE = 4096
DEFAULT_EPS = 0.1
DEFAULT_K = 10


def knn_direction_pass(queries, database, positive, k, margin, tau, device, query_block):
    """Exact (k+1)-NN of every query: gap, partner, best negative, exact counts, softmax, nearest."""
    n = len(queries)
    out = {"gap": np.empty(n, np.float32), "best": np.empty(n, np.float32), "partner": np.empty(n, np.int64),
           "count": np.empty(n, np.int64), "p_match": np.empty(n, np.float64), "entropy": np.empty(n, np.float64),
           "nearest": np.empty(n, np.int64)}
    saturated = np.zeros(n, bool)
    for q0, sims, ids in cm.knn_search(queries, database, k + 1, query_block=query_block, device=device):
        sl = slice(q0, q0 + len(sims))
        st = cm.neighbour_stats(positive[sl], sims, ids, np.arange(q0, q0 + len(sims)), k, margin, tau)
        out["gap"][sl], out["best"][sl], out["partner"][sl], out["count"][sl] = st.gap, st.best, st.partner, st.count
        out["p_match"][sl], out["entropy"][sl], out["nearest"][sl] = st.p_match, st.entropy, st.nearest
        saturated[sl] = st.saturated
    sat = np.nonzero(saturated)[0]
    for s in range(0, len(sat), query_block):  # exact count beyond the saturated k-NN lists, in blocks
        rows = sat[s:s + query_block]
        out["count"][rows] = cm.count_at_least(np.asarray(queries[rows]), positive[rows] - np.float32(margin),
                                               database, rows)
    out["n_recounted"] = int(len(sat))
    return out


def pool_labelled_gda(queries, database, gap: np.ndarray) -> tuple[adacl.LabelledGDA | None, dict]:
    """The labelled GDA over the whole pool: classes fitted to all pool negatives of the least (clone) and the
    most (non-clone) salient sample. None where undefined (a class without spread)."""
    i_plus, i_minus = int(np.argmax(gap)), int(np.argmin(gap))
    info = {"i_plus": i_plus, "i_minus": i_minus}
    try:
        gda = adacl.fit_labelled_gda(cm.row_similarities(queries[i_minus], database, i_minus),
                                     cm.row_similarities(queries[i_plus], database, i_plus))
    except ValueError as exc:
        info["reason"] = str(exc)
        return None, info
    info["gda"] = gda.to_dict()
    return gda, info


def batch_discovery(img, txt, n: int, batch_size: int, seed: int, tau: float, eps: float) -> tuple[dict, dict]:
    """AdaCL Alg. 1 lines 2-5 on every batch of a seeded partition of the pool, both directions.

    Returns per-sample arrays (pool order) and a summary of the batches (anchors, margins, degenerate cases).
    """
    scale = 1.0 / tau
    columns = {"batch": np.full(n, -1, np.int32)}
    for suffix in ("", "_t2i"):
        columns.update({f"prob{suffix}": np.full(n, np.nan), f"partner{suffix}": np.full(n, -1, np.int64),
                        f"gap{suffix}": np.full(n, np.nan), f"anchor{suffix}": np.full(n, np.nan),
                        f"anchor_gap{suffix}": np.full(n, np.nan), f"anchor_p_hat{suffix}": np.full(n, np.nan)})
    records = {d: [] for d in adacl.DIRECTIONS}
    for index, batch in enumerate(partition_batches(n, batch_size, seed, 0)):
        rows = batch.members
        v = np.asarray(img[rows], dtype=np.float64)
        t = np.asarray(txt[rows], dtype=np.float64)
        S = v @ t.T
        own = batch.own
        mine = rows[own]
        columns["batch"][mine] = index
        for direction, matrix in zip(adacl.DIRECTIONS, (S, S.T)):
            suffix = "" if direction == "i2t" else "_t2i"
            found = adacl.discover_clones(matrix)
            step = adacl.tune_margins(matrix, scale, (scale, 0.0), eps, found=found)
            columns[f"prob{suffix}"][mine] = found.partner_prob[own]
            columns[f"partner{suffix}"][mine] = rows[found.partner[own]]
            columns[f"gap{suffix}"][mine] = found.salient[own]
            if found.anchor is not None:
                columns[f"anchor{suffix}"][mine] = found.anchor
                columns[f"anchor_gap{suffix}"][mine] = found.anchor_gap
                columns[f"anchor_p_hat{suffix}"][mine] = step.p_hat_u
            records[direction].append(step)
    return columns, {d: summarise_batches(steps) for d, steps in records.items()}


def summarise_batches(steps: list[adacl.MarginStep]) -> dict:
    """Medians over the batches of what lines 2-5 found, and why batches had no update."""
    def median(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    updated = [s for s in steps if s.updated]
    reasons: dict[str, int] = {}
    for s in steps:
        if not s.updated:
            key = adacl.reason_category(s.reason)
            reasons[key] = reasons.get(key, 0) + 1
    return {"batches": len(steps), "with_anchor": sum(s.anchor is not None for s in steps),
            "margins_updated": len(updated), "no_update": reasons,
            "potential_clones": int(sum(s.n_potential for s in steps)),
            "median_anchor_similarity": median([s.anchor for s in steps]),
            "median_anchor_gap": median([s.anchor_gap for s in steps]),
            "median_anchor_p_hat": median([s.p_hat_u for s in steps]),
            "median_m1": median([s.m1 for s in updated]), "median_m2": median([s.m2 for s in updated])}


def _take_uids(uids: pa.Array, idx: np.ndarray) -> pa.Array:
    idx = np.asarray(idx, dtype=np.int64)
    return uids.take(pa.array(idx, mask=idx < 0))


def run_clones(emb: str | Path, out: str | Path, *, batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
               eps: float = DEFAULT_EPS, k: int = DEFAULT_K, margin: float | None = None,
               dup_threshold: float = 0.999, dup_k: int = 8, device: str = "auto",
               cache_dir: str | Path | None = None, query_block: int = 8192, truth: str | None = None) -> dict:
    """Compute the clone table of an embedding directory and write it to `out` (Parquet). Returns a summary."""
    out = Path(out)
    if batch_size < 2:
        raise CurateError(f"--batch-size {batch_size}: a contrastive batch needs at least 2 samples")
    if k < 1:
        raise CurateError(f"--k {k}: need at least one neighbour")
    if not 0.0 < eps < 1.0:
        raise CurateError(f"--eps {eps}: AdaCL puts a perfect match at 1 - eps, which needs 0 < eps < 1")
    pool = EmbeddingPool(emb)
    n = pool.n_rows
    if n < 2:
        raise CurateError(f"{emb}: clone negatives need at least 2 samples, found {n}")
    k = min(k, n - 1)
    tau = pool.teacher.tau
    margin = tau if margin is None else float(margin)
    device = str(resolve_device(device))
    cache = pool_cache_dir(out, cache_dir)
    img = pool.matrix("image_embedding", cache)
    txt = pool.matrix("text_embedding", cache)
    positive = clipscore_blocks(img, txt)

    found, batches = batch_discovery(img, txt, n, batch_size, seed, tau, eps)

    i2t = knn_direction_pass(img, txt, positive, k, margin, tau, device, query_block)
    t2i = knn_direction_pass(txt, img, positive, k, margin, tau, device, query_block)
    knn_prob = {}
    knn_gda = {}
    for direction, (queries, database, stats) in zip(adacl.DIRECTIONS, ((img, txt, i2t), (txt, img, t2i))):
        gda, knn_gda[direction] = pool_labelled_gda(queries, database, stats["gap"])
        knn_prob[direction] = gda.posterior(stats["best"]) if gda is not None else np.full(n, np.nan)

    dup = np.full(n, -1, np.int64)
    for q0, sims, ids in cm.knn_search(img, img, min(dup_k, n), query_block=query_block, device=device):
        dup[q0:q0 + len(sims)] = cm.first_duplicate(sims, ids, np.arange(q0, q0 + len(sims)), dup_threshold)
    dup = cm.resolve_duplicate_roots(dup)

    uids = pool.uid_array()
    f64 = pa.float64()
    table = pa.table({
        "uid": uids,
        "similarity": pa.array(positive, pa.float32()),
        "clone_prob": pa.array(found["prob"], f64),
        "clone_partner": _take_uids(uids, found["partner"]),
        "clone_gap": pa.array(found["gap"], f64),
        "anchor_similarity": pa.array(found["anchor"], f64),
        "anchor_gap": pa.array(found["anchor_gap"], f64),
        "anchor_p_hat": pa.array(found["anchor_p_hat"], f64),
        "clone_prob_t2i": pa.array(found["prob_t2i"], f64),
        "clone_partner_t2i": _take_uids(uids, found["partner_t2i"]),
        "clone_gap_t2i": pa.array(found["gap_t2i"], f64),
        "anchor_similarity_t2i": pa.array(found["anchor_t2i"], f64),
        "anchor_gap_t2i": pa.array(found["anchor_gap_t2i"], f64),
        "anchor_p_hat_t2i": pa.array(found["anchor_p_hat_t2i"], f64),
        "clone_batch": pa.array(found["batch"], pa.int32()),
        "knn_clone_prob": pa.array(knn_prob["i2t"], f64),
        "knn_clone_prob_t2i": pa.array(knn_prob["t2i"], f64),
        "knn_gap_i2t": pa.array(i2t["gap"], pa.float32()),
        "knn_gap_t2i": pa.array(t2i["gap"], pa.float32()),
        "knn_partner": _take_uids(uids, i2t["partner"]),
        "knn_partner_t2i": _take_uids(uids, t2i["partner"]),
        "knn_count": pa.array(i2t["count"], pa.int64()),
        "knn_count_t2i": pa.array(t2i["count"], pa.int64()),
        "p_match_softmax": pa.array(i2t["p_match"], f64),
        "p_match_softmax_t2i": pa.array(t2i["p_match"], f64),
        "entropy_i2t": pa.array(i2t["entropy"], f64),
        "entropy_t2i": pa.array(t2i["entropy"], f64),
        "hubness_text": pa.array(cm.hubness(i2t["nearest"], n), pa.int64()),
        "hubness_image": pa.array(cm.hubness(t2i["nearest"], n), pa.int64()),
        "duplicate_of": _take_uids(uids, dup),
    })
    flagged = flag_clones(found["prob"], found["prob_t2i"])
    summary = {
        "n": n, "batch_size": effective_batch_size(n, batch_size), "n_batches": batches_per_partition(n, batch_size),
        "seed": seed, "eps": eps, "tau": tau, "k": k, "margin": margin, "dup_threshold": dup_threshold,
        "dup_k": dup_k, "n_potential_clones": int(flagged.sum()), "batches": batches,
        "knn_gda": knn_gda, "n_duplicates": int((dup >= 0).sum()),
        "n_recounted": {"i2t": i2t["n_recounted"], "t2i": t2i["n_recounted"]},
        "teacher": pool.teacher.to_dict(), "source": str(emb),
        "index": "batches: seeded partition (negCLIPLoss's scheme, partition 0); knn: exact inner product (blocked)",
    }
    if truth:
        summary["truth_check"] = truth_report(pool, truth, {
            "clone_prob>0.5": flagged, "knn_clone_prob>0.5": flag_clones(knn_prob["i2t"], knn_prob["t2i"])}, dup)
    write_table_atomic(table, out, meta={"clones": summary}, row_group_size=1 << 20)
    return summary


def flag_clones(prob_i2t: np.ndarray, prob_t2i: np.ndarray) -> np.ndarray:
    """A sample is flagged when its hardest negative in either direction is more likely a clone (NaN: not)."""
    return (np.nan_to_num(prob_i2t, nan=0.0) > 0.5) | (np.nan_to_num(prob_t2i, nan=0.0) > 0.5)


def truth_report(pool: EmbeddingPool, spec: str, predicted: dict[str, np.ndarray], dup: np.ndarray) -> dict:
    """Detection quality against injected truth (synth corpus). For each named prediction (e.g.
    "clone_prob>0.5": flagged in either direction): precision / recall / F1 against the samples whose truth is
    `clone` or `duplicate`, its rate by kind, and, because a clone pair has two members of which only the
    injected one carries the label, also against the injected samples together with their originals (json
    fields `clone_of` / `duplicate_of`, when `spec` is json:PATH). duplicate_of is read as "belongs to a
    duplicate group" (it points to a sample, or a sample points to it)."""
    from curate.stages.common import pool_field

    truth = np.asarray([str(v) for v in pool_field(pool, spec)], dtype=object)
    kinds = np.unique(truth)
    injected = np.isin(truth, CLONE_TRUTH)
    report: dict = {"truth_counts": {str(k): int((truth == k).sum()) for k in kinds}}
    for name, flags in predicted.items():
        report[f"{name} vs injected clone|duplicate"] = cm.precision_recall_f1(flags, injected)
        report[f"{name} rate by kind"] = {str(k): float(flags[truth == k].mean()) for k in kinds}
    report["duplicate_of vs injected duplicate"] = cm.precision_recall_f1(dup >= 0, truth == "duplicate")
    if spec.startswith("json:"):
        index = {u: i for i, u in enumerate(pool.column("uid"))}
        partners = {f: pool_field(pool, f"json:{f}") for f in ("clone_of", "duplicate_of")}

        def with_originals(kinds: tuple[str, ...], fields: tuple[str, ...]) -> np.ndarray:
            member = np.isin(truth, kinds)
            for f in fields:
                for p in partners[f]:
                    if p in index:
                        member[index[p]] = True
            return member

        pairs = with_originals(CLONE_TRUTH, ("clone_of", "duplicate_of"))
        for name, flags in predicted.items():
            report[f"{name} vs clone|duplicate pairs (injected + originals)"] = cm.precision_recall_f1(flags, pairs)
        in_group = dup >= 0
        in_group[dup[dup >= 0]] = True
        report["duplicate_of groups vs duplicate pairs (injected + originals)"] = cm.precision_recall_f1(
            in_group, with_originals(("duplicate",), ("duplicate_of",)))
    return report
