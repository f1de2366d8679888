"""Clone negatives: dense and k-NN paths, the paper's hand example, GDA, duplicates, the `curate clones` stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from curate.io.tables import read_meta
from curate.metrics import clones as cm
from curate.stages.clones import run_clones
from helpers_issue6 import unit_rows, write_embedding_dir

S_HAND = np.array([[.31, .30, .10], [.12, .28, .27], [.05, .06, .33]])


def test_dense_hand_example_from_the_issue():
    st = cm.dense_clone_stats(S_HAND, margin=0.02)
    np.testing.assert_allclose(st.gap_i2t, [.01, .01, .27], atol=1e-12)
    np.testing.assert_array_equal(st.partner_i2t, [1, 2, 1])
    np.testing.assert_allclose(st.gap_t2i, [.19, -.02, .06], atol=1e-12)
    # s_ij >= s_ii - 0.02: row 0 has .30 >= .29, row 1 has .27 >= .26, row 2 none; column 1 has .30 >= .26
    np.testing.assert_array_equal(st.count_i2t, [1, 1, 0])
    np.testing.assert_array_equal(st.count_t2i, [0, 1, 0])


def _loop_stats(S, margin):
    n = len(S)
    out = {k: [] for k in ("gap_i2t", "partner_i2t", "count_i2t", "gap_t2i", "partner_t2i", "count_t2i")}
    for i in range(n):
        best, arg, cnt = -np.inf, -1, 0
        for j in range(n):
            if j == i:
                continue
            if S[i, j] > best:
                best, arg = S[i, j], j
            cnt += S[i, j] >= S[i, i] - margin
        out["gap_i2t"].append(S[i, i] - best), out["partner_i2t"].append(arg), out["count_i2t"].append(cnt)
        best, arg, cnt = -np.inf, -1, 0
        for j in range(n):
            if j == i:
                continue
            if S[j, i] > best:
                best, arg = S[j, i], j
            cnt += S[j, i] >= S[i, i] - margin
        out["gap_t2i"].append(S[i, i] - best), out["partner_t2i"].append(arg), out["count_t2i"].append(cnt)
    return {k: np.array(v) for k, v in out.items()}


def test_dense_matches_plain_loops():
    rng = np.random.default_rng(0)
    S = rng.uniform(-1, 1, (17, 17))
    st = cm.dense_clone_stats(S, margin=0.4)
    ref = _loop_stats(S, 0.4)
    for name, want in ref.items():
        np.testing.assert_allclose(getattr(st, name), want, atol=1e-12, err_msg=name)


def _fp16_unit(rng, n, d):
    return unit_rows(rng.standard_normal((n, d))).astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("backend,db_block", [("faiss", None), ("faiss", 7), ("torch", 11)])
def test_knn_path_equals_brute_force(backend, db_block):
    rng = np.random.default_rng(1)
    n, d, k, margin, tau = 60, 8, 4, 0.2, 0.05
    v = _fp16_unit(rng, n, d)
    t = unit_rows(v + 0.25 * rng.standard_normal((n, d))).astype(np.float16).astype(np.float32)
    S = v.astype(np.float64) @ t.T.astype(np.float64)
    ref = cm.dense_clone_stats(S, margin)
    pos = np.einsum("ij,ij->i", v, t)
    got = {"gap": np.empty(n), "partner": np.empty(n, np.int64), "count": np.empty(n, np.int64),
           "p": np.empty(n), "h": np.empty(n), "nearest": np.empty(n, np.int64)}
    sat = np.zeros(n, bool)
    for q0, sims, ids in cm.knn_search(v, t, k + 1, query_block=13, db_block=db_block, backend=backend):
        sl = slice(q0, q0 + len(sims))
        st = cm.neighbour_stats(pos[sl], sims, ids, np.arange(q0, q0 + len(sims)), k, margin, tau)
        got["gap"][sl], got["partner"][sl], got["count"][sl] = st.gap, st.partner, st.count
        got["p"][sl], got["h"][sl], got["nearest"][sl], sat[sl] = st.p_match, st.entropy, st.nearest, st.saturated
    assert sat.any() and not sat.all()  # the margin is wide enough that some lists saturate
    got["count"][sat] = cm.count_at_least(v[sat], pos[sat] - np.float32(margin), t, np.nonzero(sat)[0],
                                          db_block=db_block)
    np.testing.assert_allclose(got["gap"], ref.gap_i2t, atol=1e-5)
    np.testing.assert_array_equal(got["partner"], ref.partner_i2t)
    np.testing.assert_array_equal(got["count"], ref.count_i2t)
    np.testing.assert_array_equal(got["nearest"], S.argmax(axis=1))
    # softmax of the positive among positive + its k best negatives, and its entropy, by a plain loop
    for i in range(n):
        negs = sorted((S[i, j] for j in range(n) if j != i), reverse=True)[:k]
        cand = np.array([S[i, i]] + negs) / tau
        e = np.exp(cand - cand.max())
        p = e / e.sum()
        assert got["p"][i] == pytest.approx(p[0], abs=1e-5)
        assert got["h"][i] == pytest.approx(-(p * np.log(p)).sum(), abs=1e-5)


def test_hubness_counts_nearest_neighbours():
    nearest = np.array([2, 2, 0, 2, 4])
    want = [sum(1 for x in nearest if x == j) for j in range(6)]
    np.testing.assert_array_equal(cm.hubness(nearest, 6), want)


def test_duplicate_roots_follow_chains_to_the_first_occurrence():
    # 3 -> 1 -> 0, 5 -> 3, 4 none, 2 -> 0
    dup = np.array([-1, 0, 0, 1, -1, 3])
    np.testing.assert_array_equal(cm.resolve_duplicate_roots(dup), [-1, 0, 0, 0, -1, 0])


def test_first_duplicate_keeps_the_smaller_index():
    sims = np.array([[1.0, 0.995, 0.2], [1.0, 0.999, 0.98], [1.0, 0.999, 0.5]])
    ids = np.array([[0, 4, 1], [1, 0, 2], [4, 0, 1]])
    # row 0 (self 0): 4 is later -> none; row 1: 0 qualifies; row 2 (self 4): 0 qualifies and is smallest
    got = cm.first_duplicate(sims, ids, np.array([0, 1, 4]), threshold=0.99)
    np.testing.assert_array_equal(got, [-1, 0, 0])


def test_gda_recovers_two_known_gaussians():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-0.05, 0.02, 3000), rng.normal(0.20, 0.05, 7000)])
    rng.shuffle(x)
    fit = cm.fit_gda(x)
    assert fit.mean_clone == pytest.approx(-0.05, abs=0.005)
    assert fit.mean_salient == pytest.approx(0.20, abs=0.005)
    assert fit.std_clone == pytest.approx(0.02, abs=0.004)
    assert fit.std_salient == pytest.approx(0.05, abs=0.004)
    assert fit.weight_clone == pytest.approx(0.3, abs=0.02)
    # posterior by Bayes' rule, written out
    for g in (-0.1, 0.0, 0.05, 0.1, 0.2):
        nc = fit.weight_clone * np.exp(-0.5 * ((g - fit.mean_clone) / fit.std_clone) ** 2) / fit.std_clone
        ns = fit.weight_salient * np.exp(-0.5 * ((g - fit.mean_salient) / fit.std_salient) ** 2) / fit.std_salient
        assert fit.posterior_clone(np.array([g]), monotone=False)[0] == pytest.approx(nc / (nc + ns), rel=1e-9)
    # the monotone envelope: never increasing in the gap, equal to Bayes between the means
    grid = np.linspace(-1, 2, 2001)
    post = fit.posterior_clone(grid)
    assert np.all(np.diff(post) <= 1e-12)
    inside = (grid >= fit.mean_clone) & (grid <= fit.mean_salient)
    np.testing.assert_allclose(post[inside], fit.posterior_clone(grid[inside], monotone=False))
    # the anchor: median gap of the samples classed as potential clones
    post_x = fit.posterior_clone(x)
    assert cm.clone_anchor(x, post_x) == pytest.approx(float(np.median(x[post_x > 0.5])))
    assert cm.clone_anchor(x, post_x) == pytest.approx(-0.05, abs=0.01)


def test_gda_warm_start_and_constant_input():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 0.01, 500), rng.normal(0.1, 0.01, 500)])
    cold = cm.fit_gda(x)
    warm = cm.fit_gda(x, init=cold)
    assert warm.n_iter <= 3 and warm.mean_clone == pytest.approx(cold.mean_clone, abs=1e-6)
    same = cm.fit_gda(np.full(10, 0.3))
    np.testing.assert_allclose(same.posterior_clone(np.array([0.3, 0.5])), 0.5)


def test_precision_recall_f1_by_hand():
    r = cm.precision_recall_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)


def _hand_pool(tmp_path):
    """Images e_0, e_1, e_2 and texts t_j = (S[:, j], residual) so that <v_i, t_j> = S[i, j]."""
    img = np.zeros((3, 6))
    img[[0, 1, 2], [0, 1, 2]] = 1.0
    txt = np.zeros((3, 6))
    txt[:, :3] = S_HAND.T
    txt[[0, 1, 2], [3, 4, 5]] = np.sqrt(1.0 - (S_HAND ** 2).sum(axis=0))
    return write_embedding_dir(tmp_path / "emb", img, txt, logit_scale=50.0)


def test_stage_reproduces_the_hand_example(tmp_path):
    emb = _hand_pool(tmp_path)
    out = tmp_path / "clones.parquet"
    summary = run_clones(emb, out, k=10, eps=0.1, device="cpu")
    t = pq.read_table(out).to_pydict()
    uid = [f"{i:032x}" for i in range(3)]
    np.testing.assert_allclose(t["clone_gap_i2t"], [.01, .01, .27], atol=1e-3)
    np.testing.assert_allclose(t["clone_gap_t2i"], [.19, -.02, .06], atol=1e-3)
    assert t["clone_partner"] == [uid[1], uid[2], uid[1]]
    assert t["clone_count"] == [1, 1, 0] and t["clone_count_t2i"] == [0, 1, 0]  # margin = τ = 0.02
    assert t["hubness_text"] == [1, 1, 1] and t["hubness_image"] == [2, 0, 1]
    # p_match_softmax of sample 0 at τ = 0.02: 1 / (1 + e^{-0.5} + e^{-10.5})
    assert t["p_match_softmax"][0] == pytest.approx(1 / (1 + np.exp(-0.5) + np.exp(-10.5)), abs=2e-3)
    assert t["duplicate_of"] == [None, None, None]
    meta = read_meta(out)["clones"]
    assert not meta["match_gate"]["applied"]  # three samples are too few to judge
    assert meta["k"] == 2 and meta["eps"] == 0.1 and "gda" in meta and "gap" in meta["anchor"]
    assert summary["margin"] == pytest.approx(0.02)


def test_stage_matches_dense_and_finds_duplicates(tmp_path):
    rng = np.random.default_rng(4)
    n, d = 80, 12
    img = unit_rows(rng.standard_normal((n, d)))
    txt = unit_rows(img + 0.8 * rng.standard_normal((n, d)))
    img[17] = img[5]              # exact copies of image 5
    img[40] = img[5]
    img[30] = unit_rows(img[10:11] + 0.005 * rng.standard_normal((1, d)))[0]  # near copy of 10 (cos ~ 0.9998)
    docs = [{"truth": "duplicate", "duplicate_of": f"{5 if i != 30 else 10:032x}"} if i in (17, 40, 30)
            else {"truth": "clean"} for i in range(n)]
    emb = write_embedding_dir(tmp_path / "emb", img, txt, docs=docs, split=[33, 47])
    out = tmp_path / "c.parquet"
    summary = run_clones(emb, out, k=5, margin=0.15, device="cpu", truth="json:truth")
    t = pq.read_table(out).to_pydict()
    v = img.astype(np.float16).astype(np.float64)
    w = txt.astype(np.float16).astype(np.float64)
    ref = cm.dense_clone_stats(v @ w.T, margin=0.15)
    np.testing.assert_allclose(t["clone_gap_i2t"], ref.gap_i2t, atol=1e-4)
    np.testing.assert_allclose(t["clone_gap_t2i"], ref.gap_t2i, atol=1e-4)
    uid = np.array([f"{i:032x}" for i in range(n)])
    assert t["clone_partner"] == list(uid[ref.partner_i2t])
    assert t["clone_partner_t2i"] == list(uid[ref.partner_t2i])
    np.testing.assert_array_equal(t["clone_count"], ref.count_i2t)
    np.testing.assert_array_equal(t["clone_count_t2i"], ref.count_t2i)
    dup = {i: x for i, x in enumerate(t["duplicate_of"]) if x is not None}
    assert dup == {17: uid[5], 40: uid[5], 30: uid[10]}
    check = summary["truth_check"]
    assert check["duplicate_of vs injected duplicate"]["f1"] == 1.0
    assert check["duplicate_of groups vs duplicate pairs (injected + originals)"]["f1"] == 1.0
    assert check["truth_counts"] == {"clean": 77, "duplicate": 3}
    gap = np.minimum(ref.gap_i2t, ref.gap_t2i)
    np.testing.assert_allclose(t["clone_gap"], gap, atol=1e-4)
    assert all(0.0 <= p <= 1.0 for p in t["clone_prob"])
    # the anchor is the median gap of the samples whose clone_prob > 0.5
    sel = np.array(t["clone_gap"])[np.array(t["clone_prob"]) > 0.5]
    assert summary["anchor"]["gap"] == pytest.approx(float(np.median(sel)), abs=1e-6)


def test_ashman_d_formula():
    fit = cm.GDAFit(0.1, 0.02, 0.5, 0.5, 0.05, 0.5, 1, True, 0.0)
    assert cm.ashman_d(fit) == pytest.approx(np.sqrt(2) * 0.4 / np.sqrt(0.02 ** 2 + 0.05 ** 2))


def test_match_gate_keeps_mismatched_pairs_out_of_the_clone_fit(tmp_path):
    rng = np.random.default_rng(8)
    n, d = 300, 32
    img = unit_rows(rng.standard_normal((n, d)))
    txt = unit_rows(img + 0.08 * rng.standard_normal((n, d)))
    bad = np.arange(210, 300)
    txt[bad] = unit_rows(rng.standard_normal((len(bad), d)))  # mismatched captions: s_ii near 0
    emb = write_embedding_dir(tmp_path / "emb", img, txt)
    s = run_clones(emb, tmp_path / "gated.parquet", k=5, device="cpu")
    t = pq.read_table(tmp_path / "gated.parquet").to_pydict()
    assert s["match_gate"]["applied"] and s["match_gate"]["ashman_d"] > 2
    mismatch = np.array(t["mismatch_prob"])
    matched = mismatch <= 0.5
    # every mismatched caption is gated; of the matched pairs at most a far outlier (Bayes with a wide noise
    # Gaussian) may be
    assert not matched[bad].any() and matched[:210].sum() >= 208
    assert all(t["clone_prob"][i] == 0.0 for i in np.nonzero(~matched)[0])
    # the clone GDA saw the matched samples' gaps only
    gap = np.array(t["clone_gap"], np.float64)
    want = cm.fit_gda(gap[matched].astype(np.float32))
    assert s["gda"]["mean_clone"] == pytest.approx(want.mean_clone, abs=1e-6)
    np.testing.assert_allclose(np.array(t["clone_prob"])[matched], want.posterior_clone(gap[matched]), atol=1e-6)
    s2 = run_clones(emb, tmp_path / "ungated.parquet", k=5, device="cpu", gate=False)
    assert not s2["match_gate"]["applied"]
    t2 = pq.read_table(tmp_path / "ungated.parquet").to_pydict()
    assert np.mean([t2["clone_prob"][i] > 0.5 for i in bad]) > 0.9  # without the gate noise is the low group
    assert all(x == 0.0 for x in t2["mismatch_prob"])
    # a unimodal pool is not gated even when asked, nor a pool too small to judge
    clean = write_embedding_dir(tmp_path / "clean", img[:210], txt[:210])
    assert not run_clones(clean, tmp_path / "c.parquet", k=5, device="cpu")["match_gate"]["applied"]
    small = write_embedding_dir(tmp_path / "small", img[150:250], txt[150:250])
    assert not run_clones(small, tmp_path / "s.parquet", k=5, device="cpu")["match_gate"]["applied"]


def test_cli_clones_and_user_errors(tmp_path):
    rng = np.random.default_rng(5)
    img = unit_rows(rng.standard_normal((20, 8)))
    emb = write_embedding_dir(tmp_path / "emb", img, unit_rows(img + 0.5 * rng.standard_normal((20, 8))))
    out = tmp_path / "o" / "c.parquet"
    res = CliRunner().invoke(app, ["clones", str(emb), "--out", str(out), "--k", "3", "--eps", "0.2",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    meta = read_meta(out)["clones"]
    assert meta["eps"] == 0.2 and meta["k"] == 3
    first = out.read_bytes()
    assert CliRunner().invoke(app, ["clones", str(emb), "--out", str(out), "--k", "3", "--eps", "0.2",
                                    "--device", "cpu"]).exit_code == 0
    assert out.read_bytes() == first  # rerun: identical bytes
    one = write_embedding_dir(tmp_path / "one", img[:1], img[:1])
    with pytest.raises(CurateError, match="at least 2"):
        run_clones(one, tmp_path / "x.parquet")
    with pytest.raises(CurateError, match="eps"):
        run_clones(emb, tmp_path / "x.parquet", eps=1.5)
    with pytest.raises(CurateError, match="json"):
        run_clones(emb, tmp_path / "x.parquet", truth="json:truth")
    assert json.loads(json.dumps(meta))  # metadata is plain JSON
