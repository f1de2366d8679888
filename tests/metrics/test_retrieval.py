"""Retrieval metrics against plain loops, the 5-item PMRP example by hand, and `curate eval` with grouped captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from curate.metrics import retrieval as rm
from curate.stages.evaluate import EvalConfig
from curate.stages.evaluate.entry import run as evaluate_run
from embedding_dirs import unit_rows, write_embedding_dir


def _loop_metrics(img, txt, t2i, labels_img=None, labels_txt=None, ks=(1, 5, 10), zetas=(0, 1, 2)):
    """Everything by explicit sorting and counting, one query at a time."""
    S = img.astype(np.float64) @ txt.astype(np.float64).T
    out = {}
    for direction in ("i2t", "t2i"):
        M = S if direction == "i2t" else S.T
        recalls = {k: [] for k in ks}
        rps, maps = [], []
        pm = {z: [] for z in zetas}
        for q in range(M.shape[0]):
            order = sorted(range(M.shape[1]), key=lambda j: (-M[q, j], j))
            rel = [(t2i[j] == q) if direction == "i2t" else (j == t2i[q]) for j in order]
            first = rel.index(True)
            for k in ks:
                recalls[k].append(first < k)
            R = sum(rel)
            rps.append(sum(rel[:R]) / R)
            hits, ap = 0, 0.0
            for i in range(R):
                if rel[i]:
                    hits += 1
                    ap += hits / (i + 1)
            maps.append(ap / R)
            if labels_img is not None:  # PMRP as PCME's evaluate_plausible_metrics: labelled items only
                lq = labels_img[q] if direction == "i2t" else labels_txt[q]
                lg = labels_txt if direction == "i2t" else labels_img
                if not lq.any():
                    continue
                retrieved = [j for j in order if lg[j].any()]
                for z in zetas:
                    matched = [int(np.sum(lq != lg[j])) <= z for j in retrieved]
                    Rz = sum(matched)
                    if Rz:
                        pm[z].append(sum(matched[:Rz]) / Rz)
        res = {f"R@{k}": 100 * np.mean(v) for k, v in recalls.items()}
        res["r_precision"] = 100 * np.mean(rps)
        res["map_at_r"] = 100 * np.mean(maps)
        if labels_img is not None:
            res["pmrp"] = {f"zeta={z}": 100 * np.mean(v) for z, v in pm.items()}
        out[direction] = res
    out["rsum"] = sum(out["i2t"][f"R@{k}"] + out["t2i"][f"R@{k}"] for k in ks)
    return out


def _random_grouped(seed, n_img=9, d=6, n_labels=4):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, n_img)
    t2i = np.repeat(np.arange(n_img), counts)
    img = unit_rows(rng.standard_normal((n_img, d))).astype(np.float32)
    txt = unit_rows(img[t2i] + 0.9 * rng.standard_normal((len(t2i), d))).astype(np.float32)
    labels_img = (rng.random((n_img, n_labels)) < 0.4).astype(np.uint8)
    labels_txt = labels_img[t2i].copy()
    flip = rng.random(labels_txt.shape) < 0.1  # captions need not carry exactly their image's labels
    labels_txt[flip] ^= 1
    return img, txt, t2i, labels_img, labels_txt


@pytest.mark.parametrize("seed,block", [(0, None), (1, 2), (2, 5)])
def test_all_metrics_against_loops(seed, block):
    img, txt, t2i, li, lt = _random_grouped(seed)
    li[1] = 0  # an unlabelled image, and unlabelled captions: PMRP leaves them out
    lt[[0, 3]] = 0
    got = rm.retrieval_metrics(img, txt, t2i, labels_img=li, labels_txt=lt, block=block)
    want = _loop_metrics(img, txt, t2i, li, lt)
    for direction in ("i2t", "t2i"):
        for key in ("R@1", "R@5", "R@10", "r_precision", "map_at_r"):
            assert got[direction][key] == pytest.approx(want[direction][key], abs=1e-9), (direction, key)
        for z in (0, 1, 2):
            assert got[direction]["pmrp"][f"zeta={z}"] == pytest.approx(want[direction]["pmrp"][f"zeta={z}"], abs=1e-9)
        per_zeta = [want[direction]["pmrp"][f"zeta={z}"] for z in (0, 1, 2)]
        assert got[direction]["pmrp"]["mean"] == pytest.approx(np.mean(per_zeta))
    assert got["rsum"] == pytest.approx(want["rsum"], abs=1e-9)


def test_pmrp_leaves_unlabelled_items_out_by_hand():
    """Items 2 and 3 carry no label: they are neither queries nor ranked (they would match each other at ζ = 0
    and every singly-labelled item at ζ = 1 if their zero vectors counted as labels)."""
    labels = np.array([[1, 0], [0, 1], [0, 0], [0, 0]])
    S = np.array([[.5, .9, .8, .7],    # full ranking 1 2 3 0, labelled ranking 1 0
                  [.2, .6, .9, .1],    # full ranking 2 1 0 3, labelled ranking 1 0
                  [.3, .4, .5, .6],
                  [.9, .1, .2, .3]])
    # ζ = 0 and 1: q0 relevant {0}, top-1 of (1, 0) is 1 -> 0; q1 relevant {1} -> 1; mean 1/2
    # ζ = 2: both relevant to both, R = 2 -> 1 each
    hand = {0: 0.5, 1: 0.5, 2: 1.0}
    img = S / np.linalg.norm(S, axis=1, keepdims=True)
    got = rm.retrieval_metrics(img, np.eye(4), np.arange(4), labels_img=labels, labels_txt=labels, block=3)
    for z, want in hand.items():
        assert got["i2t"]["pmrp"][f"zeta={z}"] == pytest.approx(100 * want)
        assert got["i2t"]["pmrp_queries"][f"zeta={z}"] == 2
    assert got["pmrp_unlabelled"] == {"images": 2, "texts": 2}
    # nothing labelled: no PMRP query at all
    none = rm.retrieval_metrics(img, np.eye(4), np.arange(4), labels_img=0 * labels, labels_txt=0 * labels)
    assert np.isnan(none["i2t"]["pmrp"]["zeta=0"]) and none["t2i"]["pmrp_queries"]["zeta=0"] == 0


def test_block_functions_against_loops():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((6, 11))
    positive = rng.random((6, 11)) < 0.3
    positive[:, 0] = True
    ranks = rm.ranks_of_best_positive(scores, positive)
    rp, mp, R = rm.r_precision_and_map_at_r(scores, positive)
    for q in range(6):
        order = np.argsort(-scores[q])
        rel = positive[q, order]
        assert ranks[q] == int(np.argmax(rel))
        r = rel.sum()
        assert R[q] == r and rp[q] == pytest.approx(rel[:r].mean())
        prec = np.cumsum(rel) / np.arange(1, 12)
        assert mp[q] == pytest.approx(float((prec[:r] * rel[:r]).sum() / r))
    # many ties: the order is decreasing score, then gallery index
    tied = rng.integers(0, 4, (40, 15)).astype(float)
    rel = rng.random((40, 15)) < 0.4
    rp, mp, _ = rm.r_precision_and_map_at_r(tied, rel)
    ranks = rm.ranks_of_best_positive(tied, rel)
    for q in range(40):
        r = rel[q].sum()
        if r == 0:
            assert np.isnan(rp[q]) and np.isnan(mp[q])
            continue
        full = rel[q, np.argsort(-tied[q], kind="stable")]
        assert ranks[q] == int(np.argmax(full))
        ranked = full[:r]
        assert rp[q] == pytest.approx(ranked.mean())
        assert mp[q] == pytest.approx(sum(ranked[:i + 1].mean() for i in range(r) if ranked[i]) / r)
    a = rng.integers(0, 2, (3, 5))
    b = rng.integers(0, 2, (4, 5))
    np.testing.assert_array_equal(rm.hamming_distances(a, b), [[int((x != y).sum()) for y in b] for x in a])


def test_pmrp_five_items_by_hand():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    S = np.array([[.9, .8, .1, .5, .2],    # ranking 0 1 3 4 2
                  [.3, .6, .7, .2, .1],    # ranking 2 1 0 3 4
                  [.1, .2, .4, .3, .9],    # ranking 4 2 3 1 0
                  [.7, .1, .2, .6, .3],    # ranking 0 3 4 2 1
                  [.1, .2, .3, .4, .5]])   # ranking 4 3 2 1 0
    # ζ=0: q0 {0,3} top-2 (0,1) -> 1/2; q1 {1} top-1 (2) -> 0; q2 {2} (4) -> 0; q3 {0,3} (0,3) -> 1; q4 {4} -> 1
    # ζ=1: q0 {0,1,3} (0,1,3) -> 1; q1 {0,1,2,3} -> 1; q2 {1,2} top-2 (4,2) -> 1/2; q3 {0,1,3} (0,3,4) -> 2/3;
    #      q4 {4} -> 1
    # ζ=2: q0..q3 relate to all they must rank -> 1 (q1 excludes item 4, ranked last); q4 {0,2,3,4} top-4
    #      (4,3,2,1) -> 3/4
    hand = {0: (0.5 + 0 + 0 + 1 + 1) / 5, 1: (1 + 1 + 0.5 + 2 / 3 + 1) / 5, 2: (1 + 1 + 1 + 1 + 0.75) / 5}
    for z, want in hand.items():
        rp, _, _ = rm.r_precision_and_map_at_r(S, rm.plausible_positive(labels, labels, z))
        assert rp.mean() == pytest.approx(want)
    # the same through the blocked driver: images = rows of S (normalised: per-query order unchanged), texts = e_j
    img = S / np.linalg.norm(S, axis=1, keepdims=True)
    got = rm.retrieval_metrics(img, np.eye(5), np.arange(5), labels_img=labels, labels_txt=labels, block=2)
    for z, want in hand.items():
        assert got["i2t"]["pmrp"][f"zeta={z}"] == pytest.approx(100 * want)
    assert got["i2t"]["pmrp"]["mean"] == pytest.approx(100 * np.mean(list(hand.values())))
    assert got["i2t"]["R@1"] == pytest.approx(100 * 2 / 5)  # only queries 0 and 4 rank their own caption first
    assert got["i2t"]["R@5"] == 100.0


def _grouped_dir(tmp_path, how):
    """4 images with 3 captions each, one row per caption (the image embedding repeated), json labels."""
    rng = np.random.default_rng(6)
    n_img, per = 4, 3
    img = unit_rows(rng.standard_normal((n_img, 8)))
    t2i = np.repeat(np.arange(n_img), per)
    order = rng.permutation(len(t2i))  # captions of one image need not be adjacent
    t2i = t2i[order]
    txt = unit_rows(img[t2i] + 1.0 * rng.standard_normal((len(t2i), 8)))
    labels = [[int(x) for x in row] for row in (rng.random((n_img, 3)) < 0.5)]
    docs = [{"labels": labels[g], "image_id": f"img{g}"} for g in t2i]
    keys = [f"img{g}" for g in t2i] if how == "key" else None
    extra = {"image_key": [f"img{g}" for g in t2i]} if how == "column" else None
    emb = write_embedding_dir(tmp_path / f"emb-{how}", img[t2i], txt, docs=docs, keys=keys, extra_columns=extra,
                              split=[5, 7])
    first = [int(np.nonzero(t2i == g)[0][0]) for g in range(n_img)]
    order_imgs = np.argsort(first)  # groups are numbered by first occurrence in pool order
    remap = np.empty(n_img, np.int64)
    remap[order_imgs] = np.arange(n_img)
    return emb, img[order_imgs], txt, remap[t2i], np.array(labels)[order_imgs], np.array(labels)[t2i]


@pytest.mark.parametrize("how,group_by", [("column", "auto"), ("key", "key"), ("json", "json:image_id")])
def test_eval_groups_captions_by_image(tmp_path, how, group_by):
    emb, img, txt, t2i, li, lt = _grouped_dir(tmp_path, how)
    out = tmp_path / "eval.json"
    res = evaluate_run(emb, out, EvalConfig(labels="json:labels", group_by=group_by))
    doc = json.loads(out.read_text())
    assert doc["n_images"] == 4 and doc["n_texts"] == 12 and doc["captions_per_image"] == 3.0
    f16 = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731 - tables store fp16
    want = _loop_metrics(f16(img), f16(txt), t2i, li, lt)
    for direction in ("i2t", "t2i"):
        for key in ("R@1", "R@5", "r_precision", "map_at_r"):
            assert doc[direction][key] == pytest.approx(want[direction][key], abs=1e-6)
        assert doc[direction]["pmrp"]["zeta=1"] == pytest.approx(want[direction]["pmrp"]["zeta=1"], abs=1e-6)
    assert res.rsum == pytest.approx(want["rsum"], abs=1e-6)


def test_eval_cli_and_errors(tmp_path):
    emb, *_ = _grouped_dir(tmp_path, "column")
    res = CliRunner().invoke(app, ["eval", str(emb), "--out", str(tmp_path / "e.json"), "--group-by", "none",
                                   "--labels", "json:labels"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["n_images"] == 12 and "pmrp_mean" in doc and "R@10" in doc["t2i"]
    with pytest.raises(CurateError, match="column:NAME or json:PATH"):
        evaluate_run(emb, None, EvalConfig(labels="labels"))
    with pytest.raises(CurateError, match="multi-hot"):
        evaluate_run(emb, None, EvalConfig(labels="json:image_id"))
    with pytest.raises(CurateError, match="no row has a label vector"):
        evaluate_run(emb, None, EvalConfig(labels="json:no_such_field"))
    with pytest.raises(CurateError, match="no `nope` column"):
        evaluate_run(emb, None, EvalConfig(group_by="column:nope"))


def test_eval_rows_without_labels_leave_pmrp(tmp_path):
    """A sample whose json has no label vector is unlabelled: counted, and left out of PMRP like a zero vector."""
    rng = np.random.default_rng(8)
    img = unit_rows(rng.standard_normal((6, 8)))
    txt = unit_rows(img + 0.5 * rng.standard_normal((6, 8)))
    labels = [[1, 0], [0, 1], [1, 1], None, [0, 0], [1, 0]]
    docs = [{} if lab is None else {"labels": lab} for lab in labels]
    emb = write_embedding_dir(tmp_path / "emb", img, txt, docs=docs)
    got = evaluate_run(emb, None, EvalConfig(labels="json:labels", group_by="none"))
    assert got.pmrp_unlabelled == {"images": 2, "texts": 2}
    as_zeros = np.array([lab if lab is not None else [0, 0] for lab in labels])
    f16 = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731 - tables store fp16
    want = _loop_metrics(f16(img), f16(txt), np.arange(6), as_zeros, as_zeros)
    for direction in ("i2t", "t2i"):
        numbers = got.document()[direction]
        for z in (0, 1, 2):
            assert numbers["pmrp"][f"zeta={z}"] == pytest.approx(want[direction]["pmrp"][f"zeta={z}"], abs=1e-9)
        assert numbers["pmrp_queries"]["zeta=0"] == 4
