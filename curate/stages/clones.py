"""`curate clones`: clone negatives (AdaCL), tier-0 uncertainty and near-duplicates for every pool sample.

Passes over the pool (embeddings memory-mapped from an fp16 cache, never an N x N matrix):
  1. image -> texts exact (k+1)-NN: gap_i2t, clone_partner, clone_count, p_match_softmax, entropy_i2t,
     and every image's nearest text (hubness_text);
  2. text -> images (k+1)-NN: the same in the other direction;
  3. exact recount of clone counts whose k-NN list was saturated (all k neighbours within the margin);
  4. image -> images k-NN: duplicate_of (cosine >= dup_threshold, pointing to the earliest copy);
  5. GDA on clone_gap = min(gap_i2t, gap_t2i) -> clone_prob, the anchor (median gap of potential clones).

Match gate (our addition to AdaCL, which works on clean training batches). In a noisy pool the mismatched
pairs (swapped or generic captions, noise images) have gaps near -1 and would form the GDA's low group by
themselves, so clone_prob would flag noise rather than clone negatives. So first a two-Gaussian GDA on the
positive similarity s_ii separates mismatched from matched pairs; when the two groups are clearly apart
(Ashman's D > 2, and at least 200 samples) and the low group looks like random pairs (its mean is below
the 95th percentile of s_ij over 20,000 random pairs i != j; a clean pool's low tail is not), the clone GDA
is fitted on matched samples only and
mismatched samples get clone_prob 0 (their posterior is the `mismatch_prob` column). `gate=False` (CLI
--no-match-gate) fits the clone GDA on every gap, as the paper does on clean batches.
Memory: the two fp16 matrices are memory-mapped (cached beside the output, as `curate score` does); RAM holds
one query block and one database block (float32, <= 256 MiB) plus ~100 bytes per sample of output columns.
Time: exact search is O(N² D) per pass (FAISS BLAS on CPU, torch matmul + topk on CUDA).

Output columns (one row per pool sample, pool order):
  uid, similarity (s_ii), clone_gap_i2t, clone_gap_t2i, clone_gap (their min), clone_partner (uid of
  argmax_{j!=i} s_ij), clone_partner_t2i, clone_count (#j != i with s_ij >= s_ii - margin, exact),
  clone_count_t2i, clone_prob, mismatch_prob, p_match_softmax (i2t), p_match_softmax_t2i, entropy_i2t, entropy_t2i,
  hubness_text (how many images have this sample's text as their nearest text), hubness_image, duplicate_of.

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
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.tables import EmbeddingPool, write_table_atomic
from curate.metrics import clones as cm
from curate.metrics.adacl import adacl_margins

CLONE_TRUTH = ("clone", "duplicate")
MATCH_GATE_MIN_SAMPLES = 200  # fewer positives are too few to tell a second mode from a tail


def resolve_device(device: str) -> str:
    """The teachers' device rule (curate.models.teacher.resolve_device), as a string."""
    from curate.models.teacher import resolve_device as teacher_device

    return str(teacher_device(device))


def cache_dir_for(cache_dir: str | Path | None, out: Path) -> Path:
    """Where the fp16 memmap caches go: --cache-dir, else beside the output (shared with `curate score`)."""
    from curate.stages.score import default_cache_dir

    return Path(cache_dir) if cache_dir is not None else default_cache_dir(out)


def pool_uids(pool: EmbeddingPool) -> pa.Array:
    """The uid column as one Arrow string array (no Python objects per row)."""
    parts = [pq.read_table(f, columns=["uid"]).column("uid") for f in pool.files]
    return pa.chunked_array([c for p in parts for c in p.chunks], type=pa.string()).combine_chunks()


def positive_similarities(img: np.ndarray, txt: np.ndarray, block: int = 65536) -> np.ndarray:
    out = np.empty(len(img), dtype=np.float32)
    for s in range(0, len(img), block):
        a = np.asarray(img[s:s + block], dtype=np.float32)
        b = np.asarray(txt[s:s + block], dtype=np.float32)
        out[s:s + block] = np.einsum("ij,ij->i", a, b)
    return out


def _direction_pass(queries, database, positive, k, margin, tau, device, query_block):
    n = len(queries)
    gap = np.empty(n, np.float32)
    partner = np.empty(n, np.int64)
    count = np.empty(n, np.int64)
    saturated = np.zeros(n, bool)
    p_match = np.empty(n, np.float64)
    entropy = np.empty(n, np.float64)
    nearest = np.empty(n, np.int64)
    for q0, sims, ids in cm.knn_search(queries, database, k + 1, query_block=query_block, device=device):
        sl = slice(q0, q0 + len(sims))
        self_ids = np.arange(q0, q0 + len(sims))
        st = cm.neighbour_stats(positive[sl], sims, ids, self_ids, k, margin, tau)
        gap[sl], partner[sl], count[sl], saturated[sl] = st.gap, st.partner, st.count, st.saturated
        p_match[sl], entropy[sl], nearest[sl] = st.p_match, st.entropy, st.nearest
    sat = np.nonzero(saturated)[0]
    for s in range(0, len(sat), query_block):  # exact count beyond the saturated k-NN lists, in blocks
        rows = sat[s:s + query_block]
        count[rows] = cm.count_at_least(np.asarray(queries[rows]), positive[rows] - np.float32(margin), database, rows)
    return {"gap": gap, "partner": partner, "count": count, "p_match": p_match, "entropy": entropy,
            "nearest": nearest, "n_recounted": int(len(sat))}


def random_pair_quantile(img: np.ndarray, txt: np.ndarray, q: float, rng: np.random.Generator,
                         pairs: int = 20_000) -> float:
    """The q-quantile of s_ij = <v_i, t_j> over random pairs i != j (seeded; rows read in sorted order)."""
    n = len(img)
    rows = np.sort(rng.integers(0, n, size=pairs))
    partners = (rows + rng.integers(1, n, size=pairs)) % n
    order = np.argsort(partners, kind="stable")
    t = np.empty((pairs, txt.shape[1]), np.float32)
    t[order] = txt[partners[order]]
    sims = np.einsum("ij,ij->i", np.asarray(img[rows], np.float32), t)
    return float(np.quantile(sims, q))


def _take_uids(uids: pa.Array, idx: np.ndarray) -> pa.Array:
    idx = np.asarray(idx, dtype=np.int64)
    return uids.take(pa.array(idx, mask=idx < 0))


def run_clones(emb: str | Path, out: str | Path, *, k: int = 10, eps: float = 0.1, margin: float | None = None,
               dup_threshold: float = 0.999, dup_k: int = 8, device: str = "auto",
               cache_dir: str | Path | None = None, query_block: int = 8192, truth: str | None = None,
               gda_max_samples: int = 1_000_000, seed: int = 0, gate: bool = True) -> dict:
    """Compute the clone table of an embedding directory and write it to `out` (Parquet). Returns a summary."""
    out = Path(out)
    if k < 1:
        raise CurateError(f"--k {k}: need at least one neighbour")
    if not 0.0 < eps < 1.0:
        raise CurateError(f"--eps {eps}: the AdaCL target 1 - eps needs 0 < eps < 1")
    pool = EmbeddingPool(emb)
    n = pool.n_rows
    if n < 2:
        raise CurateError(f"{emb}: clone negatives need at least 2 samples, found {n}")
    k = min(k, n - 1)
    tau = pool.teacher.tau
    margin = tau if margin is None else float(margin)
    device = resolve_device(device)
    cache = cache_dir_for(cache_dir, out)
    img = pool.matrix("image_embedding", cache)
    txt = pool.matrix("text_embedding", cache)
    positive = positive_similarities(img, txt)

    i2t = _direction_pass(img, txt, positive, k, margin, tau, device, query_block)
    t2i = _direction_pass(txt, img, positive, k, margin, tau, device, query_block)

    dup = np.full(n, -1, np.int64)
    for q0, sims, ids in cm.knn_search(img, img, min(dup_k, n), query_block=query_block, device=device):
        dup[q0:q0 + len(sims)] = cm.first_duplicate(sims, ids, np.arange(q0, q0 + len(sims)), dup_threshold)
    dup = cm.resolve_duplicate_roots(dup)

    clone_gap = np.minimum(i2t["gap"], t2i["gap"])
    rng = np.random.default_rng(seed)
    fit_rows = np.arange(n) if n <= gda_max_samples else np.sort(rng.choice(n, gda_max_samples, replace=False))
    match_gda = cm.fit_gda(positive[fit_rows])
    separation = cm.ashman_d(match_gda)
    random_q95 = random_pair_quantile(img, txt, 0.95, rng)
    gated = bool(gate and n >= MATCH_GATE_MIN_SAMPLES and separation > 2.0 and match_gda.mean_clone < random_q95)
    # the low-similarity component of the s_ii mixture is the mismatched group
    mismatch_prob = match_gda.posterior_clone(positive) if gated else np.zeros(n)
    matched = mismatch_prob <= 0.5
    fit_on = clone_gap[fit_rows[matched[fit_rows]]]
    if len(fit_on) == 0:
        raise CurateError(f"{emb}: no sample looks like a matched pair; nothing to find clones among "
                          "(rerun with --no-match-gate to fit on every gap)")
    gda = cm.fit_gda(fit_on)
    clone_prob = np.where(matched, gda.posterior_clone(clone_gap), 0.0)
    potential = np.nonzero(clone_prob > 0.5)[0]
    anchor = cm.clone_anchor(clone_gap, clone_prob)

    uids = pool_uids(pool)
    meta_anchor: dict = {"gap": anchor, "n_potential_clones": int(len(potential))}
    if len(potential):
        u = int(potential[cm.median_index(clone_gap[potential])])
        from_i2t = i2t["gap"][u] <= t2i["gap"][u]
        q, db = (img, txt) if from_i2t else (txt, img)
        _, sims, ids = next(cm.knn_search(np.asarray(q[u:u + 1]), db, k + 1, device="cpu"))
        neg, _ = cm.drop_self(sims, ids, np.array([u]), k)
        neg_lse = float(np.logaddexp.reduce(neg[0].astype(np.float64) / tau))
        m1, m2, clamped = adacl_margins(float(positive[u]), neg_lse, 1.0 / tau, eps)
        meta_anchor.update(uid=uids[u].as_py(), similarity=float(positive[u]), direction="i2t" if from_i2t else "t2i",
                           adacl_m1=m1, adacl_m2=m2, adacl_clamped=clamped,
                           note="m1, m2: AdaCL margins that would put this anchor pair at 1 - eps among its "
                                "top-k negatives at the teacher's temperature")

    table = pa.table({
        "uid": uids,
        "similarity": pa.array(positive, pa.float32()),
        "clone_gap_i2t": pa.array(i2t["gap"], pa.float32()),
        "clone_gap_t2i": pa.array(t2i["gap"], pa.float32()),
        "clone_gap": pa.array(clone_gap, pa.float32()),
        "clone_partner": _take_uids(uids, i2t["partner"]),
        "clone_partner_t2i": _take_uids(uids, t2i["partner"]),
        "clone_count": pa.array(i2t["count"], pa.int64()),
        "clone_count_t2i": pa.array(t2i["count"], pa.int64()),
        "clone_prob": pa.array(clone_prob, pa.float64()),
        "mismatch_prob": pa.array(mismatch_prob, pa.float64()),
        "p_match_softmax": pa.array(i2t["p_match"], pa.float64()),
        "p_match_softmax_t2i": pa.array(t2i["p_match"], pa.float64()),
        "entropy_i2t": pa.array(i2t["entropy"], pa.float64()),
        "entropy_t2i": pa.array(t2i["entropy"], pa.float64()),
        "hubness_text": pa.array(cm.hubness(i2t["nearest"], n), pa.int64()),
        "hubness_image": pa.array(cm.hubness(t2i["nearest"], n), pa.int64()),
        "duplicate_of": _take_uids(uids, dup),
    })
    summary = {
        "n": n, "k": k, "eps": eps, "margin": margin, "tau": tau, "dup_threshold": dup_threshold, "dup_k": dup_k,
        "anchor": meta_anchor, "gda": gda.to_dict(), "gda_fit_samples": int(len(fit_on)),
        "match_gate": {"enabled": gate, "applied": gated, "ashman_d": separation, "gda": match_gda.to_dict(),
                       "random_pair_similarity_q95": random_q95, "n_mismatched": int((~matched).sum())},
        "n_duplicates": int((dup >= 0).sum()),
        "n_recounted": {"i2t": i2t["n_recounted"], "t2i": t2i["n_recounted"]},
        "teacher": pool.teacher.to_dict(), "source": str(emb), "index": "exact inner product (blocked)",
    }
    if truth:
        summary["truth_check"] = truth_report(pool, truth, clone_prob > 0.5, dup)
    write_table_atomic(table, out, meta={"clones": summary}, row_group_size=1 << 20)
    return summary


def truth_report(pool: EmbeddingPool, spec: str, predicted_clone: np.ndarray, dup: np.ndarray) -> dict:
    """Detection quality against injected truth (synth corpus): precision / recall / F1 of clone_prob > 0.5
    against the samples whose truth is `clone` or `duplicate`; and, because a clone pair has two members of
    which only the injected one carries the label, also against the injected samples together with their
    originals (json fields `clone_of` / `duplicate_of`, when `spec` is json:PATH). duplicate_of is read as
    "belongs to a duplicate group" (it points to a sample, or a sample points to it)."""
    from curate.stages.evaluate import pool_field

    truth = np.asarray([str(v) for v in pool_field(pool, spec)], dtype=object)
    kinds = np.unique(truth)
    report = {"truth_counts": {str(k): int((truth == k).sum()) for k in kinds},
              "clone_prob>0.5 vs injected clone|duplicate": cm.precision_recall_f1(predicted_clone,
                                                                                   np.isin(truth, CLONE_TRUTH)),
              "clone_prob>0.5 rate by kind": {str(k): float(predicted_clone[truth == k].mean()) for k in kinds},
              "duplicate_of vs injected duplicate": cm.precision_recall_f1(dup >= 0, truth == "duplicate")}
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

        in_group = dup >= 0
        in_group[dup[dup >= 0]] = True
        report["clone_prob>0.5 vs clone|duplicate pairs (injected + originals)"] = cm.precision_recall_f1(
            predicted_clone, with_originals(CLONE_TRUTH, ("clone_of", "duplicate_of")))
        report["duplicate_of groups vs duplicate pairs (injected + originals)"] = cm.precision_recall_f1(
            in_group, with_originals(("duplicate",), ("duplicate_of",)))
    return report
