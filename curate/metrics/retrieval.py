"""Cross-modal retrieval metrics: Recall@K, RSUM, R-Precision, mAP@R and PMRP, computed in query blocks.

Images may have several captions (COCO-style 1:5): `text_to_image[t]` is the image index of caption t.
Similarities are computed one block of queries at a time (block x gallery), never the full matrix; all numbers
are reported in percent. One order everywhere: decreasing score, ties broken by gallery index (exact duplicate
captions or images tie; the first in pool order ranks first), so R@1 equals R-Precision when R = 1.
"""

from __future__ import annotations

import numpy as np


def ranks_of_best_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """0-based rank of the best-ranked relevant item, ordering by decreasing score then index (the Recall@K
    rank of VSE++, Faghri et al. 2018, Sec. 4: an image query is correct if any of its captions is in the top K).
    Computed without sorting: #{j : s_j > m} + #{j : s_j = m, j < f}, m the best relevant score, f the lowest
    index of a relevant item scoring m."""
    masked = np.where(positive, scores, -np.inf)
    best = masked.max(axis=1)
    first = np.argmax(masked == best[:, None], axis=1)
    index = np.arange(scores.shape[1])[None, :]
    return (scores > best[:, None]).sum(axis=1) + ((scores == best[:, None]) & (index < first[:, None])).sum(axis=1)


def recall_at_k(ranks: np.ndarray, k: int) -> float:
    """R@K = fraction of queries whose best relevant item ranks within the top K (Faghri et al. 2018, Sec. 4)."""
    return float((np.asarray(ranks) < k).mean()) if len(ranks) else float("nan")


def r_precision_and_map_at_r(scores: np.ndarray, positive: np.ndarray,
                             with_map: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, with R = number of relevant items and rel(i) the relevance at rank i (1-based):
    R-Precision = (1/R) Σ_{i<=R} rel(i), MAP@R = (1/R) Σ_{i<=R} P(i)·rel(i), P(i) = precision at i
    (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", ECCV 2020, Sec. 3.2).
    Rows with the same R are handled together and only their top R is ranked (partition, then sort R items),
    never a full sort. Order: decreasing score, ties by gallery index. Queries with R = 0 get NaN."""
    positive = np.asarray(positive, dtype=bool)
    n, width = scores.shape
    n_rel = positive.sum(axis=1)
    rp = np.full(n, np.nan)
    map_r = np.full(n, np.nan)
    for r in np.unique(n_rel[n_rel > 0]):
        r = int(r)
        rows = np.nonzero(n_rel == r)[0]
        sc, pos = scores[rows], positive[rows]
        if r == 1:  # the common case (one relevant item): argmax takes the lowest index among ties
            hit = pos[np.arange(len(rows)), np.argmax(sc, axis=1)].astype(np.float64)
            rp[rows] = hit
            map_r[rows] = hit if with_map else np.nan
            continue
        if r >= width:
            top = np.ones(sc.shape, dtype=bool)
        else:
            kth = -np.partition(-sc, r - 1, axis=1)[:, r - 1]          # each row's r-th largest score
            above = sc > kth[:, None]
            tied = sc == kth[:, None]
            room = r - above.sum(axis=1)
            top = above | tied
            crowded = np.nonzero(tied.sum(axis=1) > room)[0]           # more ties than places left
            if len(crowded):                                            # keep the lowest-index ties
                fill = np.cumsum(tied[crowded], axis=1) <= room[crowded, None]
                top[crowded] = above[crowded] | (tied[crowded] & fill)
        rp[rows] = (pos & top).sum(axis=1) / r
        if with_map:
            idx = np.nonzero(top)[1].reshape(len(rows), r)                 # index order within each row
            order = np.lexsort((idx, -np.take_along_axis(sc, idx, axis=1)), axis=-1)
            rel = np.take_along_axis(pos, np.take_along_axis(idx, order, axis=1), axis=1)
            precision = np.cumsum(rel, axis=1) / np.arange(1, r + 1)
            map_r[rows] = (precision * rel).sum(axis=1) / r
    return rp, map_r, n_rel


def hamming_distances(labels_q: np.ndarray, labels_g: np.ndarray) -> np.ndarray:
    """Hamming distance between binary label vectors, (b, N), via two matmuls: q·(1-g) + (1-q)·g."""
    q = np.asarray(labels_q, dtype=np.float32)
    g = np.asarray(labels_g, dtype=np.float32)
    return np.rint(q @ (1.0 - g).T + (1.0 - q) @ g.T).astype(np.int32)


def plausible_positive(labels_q: np.ndarray, labels_g: np.ndarray, zeta: int) -> np.ndarray:
    """PMRP relevance: gallery items whose multi-label vector is within Hamming distance ζ of the query's
    (PCME, Chun et al. CVPR 2021, Sec. 5.1 "Plausible Match R-Precision")."""
    return hamming_distances(labels_q, labels_g) <= zeta


def labelled(labels: np.ndarray) -> np.ndarray:
    """Rows carrying at least one label. PMRP leaves the others out of queries and gallery, as PCME's
    evaluate_pmrp_coco.py keeps only images with an instance annotation (Chun et al. 2021, Sec. 5.1)."""
    return np.asarray(labels).any(axis=1)


def retrieval_metrics(img: np.ndarray, txt: np.ndarray, text_to_image: np.ndarray, *,
                      labels_img: np.ndarray | None = None, labels_txt: np.ndarray | None = None,
                      ks: tuple[int, ...] = (1, 5, 10), zetas: tuple[int, ...] = (0, 1, 2),
                      block: int | None = None) -> dict:
    """All retrieval numbers (percent) for images `img` (N_i, D) and captions `txt` (N_t, D), unit vectors.

    i2t: each image queries all captions, relevant = its captions; t2i: each caption queries all images,
    relevant = its image. RSUM = Σ_K (R@K i2t + R@K t2i) (Faghri et al. 2018; Chun et al. 2021, Table 1).
    R-Precision and MAP@R (Musgrave et al. 2020) use those relevant sets; PMRP (Chun et al. 2021) uses label
    relevance at Hamming ζ and is reported per ζ and as their mean, when labels are given. PMRP ranks only
    labelled items (a row of zeros is unlabelled) and averages over labelled queries that have a plausible
    match (`pmrp_queries` counts them); unlabelled rows are left out of its queries and gallery, as in PCME.
    `block` queries at a time (default: about 2^24 similarities per block).
    """
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    n_img, n_txt = len(img), len(txt)
    if n_img == 0 or n_txt == 0:
        raise ValueError("retrieval needs at least one image and one caption")
    if len(text_to_image) != n_txt or text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise ValueError("text_to_image must give an image index for every caption")
    with_labels = labels_img is not None and labels_txt is not None
    out: dict = {"n_images": n_img, "n_texts": n_txt}
    if with_labels:
        out["pmrp_unlabelled"] = {"images": int((~labelled(labels_img)).sum()),
                                  "texts": int((~labelled(labels_txt)).sum())}
    for direction, queries, gallery in (("i2t", img, txt), ("t2i", txt, img)):
        ranks, rps, maps = [], [], []
        pmrp_sums = {z: [0.0, 0] for z in zetas}
        lab_q = labels_img if direction == "i2t" else labels_txt
        lab_g = labels_txt if direction == "i2t" else labels_img
        if with_labels:
            labelled_q, labelled_cols = labelled(lab_q), np.flatnonzero(labelled(lab_g))
            lab_g_kept = np.asarray(lab_g)[labelled_cols]
        gallery32 = np.asarray(gallery, dtype=np.float32)
        step = block or max(1, min(1024, 2**24 // len(gallery)))
        for q0 in range(0, len(queries), step):
            q = np.asarray(queries[q0:q0 + step], dtype=np.float32)
            scores = q @ gallery32.T
            rows = np.arange(q0, q0 + len(q))
            if direction == "i2t":
                positive = text_to_image[None, :] == rows[:, None]
            else:
                positive = np.zeros(scores.shape, dtype=bool)
                positive[np.arange(len(q)), text_to_image[rows]] = True
            ranks.append(ranks_of_best_positive(scores, positive))
            rp, mp, _ = r_precision_and_map_at_r(scores, positive)
            rps.append(rp)
            maps.append(mp)
            keep = labelled_q[q0:q0 + step] if with_labels else None
            if with_labels and keep.any() and len(labelled_cols):
                kept_scores = scores[keep][:, labelled_cols]  # unlabelled captions/images leave the ranking
                ham = hamming_distances(np.asarray(lab_q[q0:q0 + step])[keep], lab_g_kept)
                for z in zetas:
                    prp, _, n_rel = r_precision_and_map_at_r(kept_scores, ham <= z, with_map=False)
                    ok = n_rel > 0
                    pmrp_sums[z][0] += float(prp[ok].sum())
                    pmrp_sums[z][1] += int(ok.sum())
        ranks = np.concatenate(ranks)
        rps, maps = np.concatenate(rps), np.concatenate(maps)
        res = {f"R@{k}": 100.0 * recall_at_k(ranks, k) for k in ks}
        res["r_precision"] = 100.0 * float(np.nanmean(rps))
        res["map_at_r"] = 100.0 * float(np.nanmean(maps))
        res["median_rank"] = float(np.median(ranks) + 1)
        if with_labels:
            pm = {f"zeta={z}": (100.0 * s / c if c else float("nan")) for z, (s, c) in pmrp_sums.items()}
            pm["mean"] = float(np.mean([pm[f"zeta={z}"] for z in zetas]))
            res["pmrp"] = pm
            res["pmrp_queries"] = {f"zeta={z}": c for z, (_, c) in pmrp_sums.items()}
        out[direction] = res
    out["rsum"] = float(sum(out["i2t"][f"R@{k}"] + out["t2i"][f"R@{k}"] for k in ks))
    if with_labels:
        out["pmrp_mean"] = float((out["i2t"]["pmrp"]["mean"] + out["t2i"]["pmrp"]["mean"]) / 2)
    return out
