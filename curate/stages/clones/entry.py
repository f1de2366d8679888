"""`curate clones`' entry: AdaCL's discovery on seeded batches, the pool-wide k-NN extension and duplicates
(`run`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curate.config import check_config
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool, write_table_atomic
from curate.metrics import adacl
from curate.metrics import clones as cm
from curate.metrics.negclip import batches_per_partition, effective_batch_size, partition_batches
from curate.models.teacher import resolve_device
from curate.stages.clones import CLONE_TRUTH, ClonesConfig, ClonesResult
from curate.stages.common import clipscore_blocks, pool_cache_dir, pool_field

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


def uids_at(uids: pa.Array, idx: np.ndarray) -> pa.Array:
    """The uids at pool rows `idx`; null where the index is negative (no partner, no duplicate)."""
    idx = np.asarray(idx, dtype=np.int64)
    return uids.take(pa.array(idx, mask=idx < 0))


def run(emb: str | Path, out: str | Path, cfg: ClonesConfig = ClonesConfig()) -> ClonesResult:
    """Compute the clone table of an embedding directory and write it to `out` (Parquet)."""
    check_config(cfg)
    out = Path(out)
    batch_size, seed, eps, dup_threshold, dup_k = cfg.batch_size, cfg.seed, cfg.eps, cfg.dup_threshold, cfg.dup_k
    query_block = cfg.query_block
    pool = EmbeddingPool(emb)
    n = pool.n_rows
    if n < 2:
        raise CurateError(f"{emb}: clone negatives need at least 2 samples, found {n}")
    k = min(cfg.k, n - 1)
    tau = pool.teacher.tau
    margin = tau if cfg.margin is None else float(cfg.margin)
    device = str(resolve_device(cfg.device))
    cache = pool_cache_dir(out, cfg.cache_dir)
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
    columns = {"uid": uids, "similarity": pa.array(positive, pa.float32())}
    for suffix in ("", "_t2i"):  # the batch discovery's columns, image->text then text->image
        columns.update({
            f"clone_prob{suffix}": pa.array(found[f"prob{suffix}"], f64),
            f"clone_partner{suffix}": uids_at(uids, found[f"partner{suffix}"]),
            f"clone_gap{suffix}": pa.array(found[f"gap{suffix}"], f64),
            f"anchor_similarity{suffix}": pa.array(found[f"anchor{suffix}"], f64),
            f"anchor_gap{suffix}": pa.array(found[f"anchor_gap{suffix}"], f64),
            f"anchor_p_hat{suffix}": pa.array(found[f"anchor_p_hat{suffix}"], f64)})
    table = pa.table({
        **columns,
        "clone_batch": pa.array(found["batch"], pa.int32()),
        "knn_clone_prob": pa.array(knn_prob["i2t"], f64),
        "knn_clone_prob_t2i": pa.array(knn_prob["t2i"], f64),
        "knn_gap_i2t": pa.array(i2t["gap"], pa.float32()),
        "knn_gap_t2i": pa.array(t2i["gap"], pa.float32()),
        "knn_partner": uids_at(uids, i2t["partner"]),
        "knn_partner_t2i": uids_at(uids, t2i["partner"]),
        "knn_count": pa.array(i2t["count"], pa.int64()),
        "knn_count_t2i": pa.array(t2i["count"], pa.int64()),
        "p_match_softmax": pa.array(i2t["p_match"], f64),
        "p_match_softmax_t2i": pa.array(t2i["p_match"], f64),
        "entropy_i2t": pa.array(i2t["entropy"], f64),
        "entropy_t2i": pa.array(t2i["entropy"], f64),
        "hubness_text": pa.array(cm.hubness(i2t["nearest"], n), pa.int64()),
        "hubness_image": pa.array(cm.hubness(t2i["nearest"], n), pa.int64()),
        "duplicate_of": uids_at(uids, dup),
    })
    flagged = flag_clones(found["prob"], found["prob_t2i"])
    result = ClonesResult(
        n=n, batch_size=effective_batch_size(n, batch_size), n_batches=batches_per_partition(n, batch_size),
        seed=seed, eps=eps, tau=tau, k=k, margin=margin, dup_threshold=dup_threshold,
        dup_k=dup_k, n_potential_clones=int(flagged.sum()), batches=batches,
        knn_gda=knn_gda, n_duplicates=int((dup >= 0).sum()),
        n_recounted={"i2t": i2t["n_recounted"], "t2i": t2i["n_recounted"]},
        teacher=pool.teacher.to_dict(), source=str(emb),
        index="batches: seeded partition (negCLIPLoss's scheme, partition 0); knn: exact inner product (blocked)",
    )
    if cfg.truth:
        result.truth_check = truth_report(pool, cfg.truth, {
            "clone_prob>0.5": flagged, "knn_clone_prob>0.5": flag_clones(knn_prob["i2t"], knn_prob["t2i"])}, dup)
    write_table_atomic(table, out, meta={"clones": result.metadata()}, row_group_size=1 << 20)
    return result


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
