"""`curate clones`: AdaCL's discovery on seeded batches (against the loop oracle), the pool-wide k-NN extension
(dense and blocked paths), duplicates, the truth report and the CLI."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from curate.io.tables import read_meta
from curate.metrics import clones as cm
from curate.metrics.negclip import partition_batches
from curate.recipe import load_recipe
from curate.stages.clones import ClonesConfig
from adacl_oracles import oracle_discovery, oracle_margins, oracle_posterior, oracle_probability
from conftest import run_clones
from embedding_dirs import unit_rows, write_embedding_dir

S_HAND = np.array([[.31, .30, .10], [.12, .28, .27], [.05, .06, .33]])


def test_dense_stats_of_a_3x3_hand_example():
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


def test_precision_recall_f1_by_hand():
    r = cm.precision_recall_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)


def stored(x):
    """What the embedding tables hold: fp16 values (as `curate embed` writes them)."""
    return np.asarray(x, np.float16).astype(np.float64)


def oracle_batch_columns(S, scale, eps):
    """Per-row clone_prob, partner, gap and the batch's anchor, p̂_u and margins, from the loop oracle."""
    n = len(S)
    i_plus, i_minus, s_bar, pair = oracle_discovery(S)
    partner = [max((j for j in range(n) if j != i), key=lambda j: (S[i][j], -j)) for i in range(n)]
    prob = oracle_posterior([S[i][partner[i]] for i in range(n)],
                            [S[i_minus][j] for j in range(n) if j != i_minus],
                            [S[i_plus][j] for j in range(n) if j != i_plus])
    out = {"prob": prob, "partner": partner, "gap": [S[i][i] - S[i][partner[i]] for i in range(n)],
           "anchor": None, "n_potential": len(s_bar)}
    if pair is not None:
        u = pair[0]
        neg_sum = sum(math.exp(S[u][j] * scale) for j in range(n) if j != u)
        p_hat = oracle_probability(S[u][u], scale, 0.0, neg_sum)
        out.update(anchor=S[u][u], anchor_gap=S[u][u] - S[pair], p_hat=p_hat,
                   margins=oracle_margins(S[u][u], p_hat, neg_sum, eps) if p_hat < 1 - eps else None)
    return out


def hand_pool(tmp_path):
    """Images e_0, e_1, e_2 and texts t_j = (S[:, j], residual) so that <v_i, t_j> = S[i, j]."""
    img = np.zeros((3, 6))
    img[[0, 1, 2], [0, 1, 2]] = 1.0
    txt = np.zeros((3, 6))
    txt[:, :3] = S_HAND.T
    txt[[0, 1, 2], [3, 4, 5]] = np.sqrt(1.0 - (S_HAND ** 2).sum(axis=0))
    return write_embedding_dir(tmp_path / "emb", img, txt, logit_scale=50.0)


def test_stage_hand_example(tmp_path):
    """S = [[.31 .30 .10] [.12 .28 .27] [.05 .06 .33]], one batch. Image->text: salient scores .01 .01 .27, so
    i⁻ = 0 (clone class {.30, .10}: μ .2, σ .1) and i⁺ = 2 (non-clone {.05, .06}: μ .055, σ .005). Sample 2's
    hardest negative .06 lies one σ from μ_c̄: p(C|.06) = 1 / (1 + 20 e^{.98 - .5}) = 0.030. S̄ holds rows 0
    and 1's negatives; gaps .01 .21 .16 .01, lower median .01, first pair (0, 1): anchor s_00 = .31, and
    p̂_u = 1 / (1 + e^{-.5} + e^{-10.5}) = 0.62 at τ = 0.02."""
    emb = hand_pool(tmp_path)
    out = tmp_path / "clones.parquet"
    summary = run_clones(emb, out, eps=0.1, device="cpu")
    t = pq.read_table(out).to_pydict()
    uid = [f"{i:032x}" for i in range(3)]
    assert t["clone_partner"] == [uid[1], uid[2], uid[1]]
    np.testing.assert_allclose(t["clone_gap"], [.01, .01, .27], atol=1e-3)
    assert t["clone_prob"][0] > 0.999 and t["clone_prob"][1] > 0.999
    assert t["clone_prob"][2] == pytest.approx(1 / (1 + 20 * math.exp(0.98 - 0.5)), abs=1e-3)
    assert t["anchor_similarity"] == pytest.approx([.31] * 3, abs=1e-3)
    assert t["anchor_gap"] == pytest.approx([.01] * 3, abs=1e-3)
    assert t["anchor_p_hat"][0] == pytest.approx(1 / (1 + math.exp(-0.5) + math.exp(-10.5)), abs=2e-3)
    assert t["clone_batch"] == [0, 0, 0]
    # the same against the loop oracle on the stored (fp16) values, both directions
    S = stored(S_HAND)
    for direction, matrix in (("", S), ("_t2i", S.T)):
        want = oracle_batch_columns(matrix, 50.0, 0.1)
        np.testing.assert_allclose(t[f"clone_prob{direction}"], want["prob"], rtol=1e-9)
        np.testing.assert_allclose(t[f"anchor_similarity{direction}"], [want["anchor"]] * 3, rtol=1e-12)
        np.testing.assert_allclose(t[f"anchor_p_hat{direction}"], [want["p_hat"]] * 3, rtol=1e-9)
        name = "i2t" if direction == "" else "t2i"
        m1, m2 = want["margins"]
        assert summary.batches[name]["median_m1"] == pytest.approx(m1, rel=1e-9)
        assert summary.batches[name]["median_m2"] == pytest.approx(m2, rel=1e-9)
        assert summary.batches[name]["potential_clones"] == want["n_potential"]
    # the k-NN extension: pool-wide salient gaps, partners and counts (margin = τ = 0.02)
    np.testing.assert_allclose(t["knn_gap_i2t"], [.01, .01, .27], atol=1e-3)
    np.testing.assert_allclose(t["knn_gap_t2i"], [.19, -.02, .06], atol=1e-3)
    assert t["knn_partner"] == [uid[1], uid[2], uid[1]]
    assert t["knn_count"] == [1, 1, 0] and t["knn_count_t2i"] == [0, 1, 0]
    assert t["hubness_text"] == [1, 1, 1] and t["hubness_image"] == [2, 0, 1]
    assert t["p_match_softmax"][0] == pytest.approx(1 / (1 + np.exp(-0.5) + np.exp(-10.5)), abs=2e-3)
    # one batch holding the whole pool: the k-NN variant's labelled GDA is the batch's
    np.testing.assert_allclose(t["knn_clone_prob"], t["clone_prob"], rtol=1e-6)
    assert t["duplicate_of"] == [None, None, None]
    meta = read_meta(out)["clones"]
    assert meta["n_batches"] == 1 and meta["batch_size"] == 3 and meta["eps"] == 0.1 and meta["k"] == 2


def test_stage_batches_match_the_oracle_batch_by_batch(tmp_path):
    rng = np.random.default_rng(4)
    n, d, b, seed = 50, 10, 16, 7
    img = unit_rows(rng.standard_normal((n, d)))
    txt = unit_rows(img + 0.7 * rng.standard_normal((n, d)))
    emb = write_embedding_dir(tmp_path / "emb", img, txt, split=[20, 30], logit_scale=30.0)
    out = tmp_path / "c.parquet"
    summary = run_clones(emb, out, batch_size=b, seed=seed, eps=0.2, k=4, device="cpu")
    t = pq.read_table(out).to_pydict()
    v, w = stored(img), stored(txt)
    batches = list(partition_batches(n, b, seed, 0))
    assert summary.n_batches == len(batches) == 4 and summary.batch_size == 16
    uid = np.array([f"{i:032x}" for i in range(n)])
    seen = np.zeros(n, int)
    for index, batch in enumerate(batches):
        rows = batch.members
        S = v[rows] @ w[rows].T
        for direction, matrix in (("", S), ("_t2i", S.T)):
            want = oracle_batch_columns(matrix, 30.0, 0.2)
            for local in np.nonzero(batch.own)[0]:
                i = rows[local]
                assert t["clone_batch"][i] == index
                assert t[f"clone_prob{direction}"][i] == pytest.approx(want["prob"][local], rel=1e-6, abs=1e-12)
                assert t[f"clone_partner{direction}"][i] == uid[rows[want["partner"][local]]]
                assert t[f"clone_gap{direction}"][i] == pytest.approx(want["gap"][local], abs=1e-9)
                assert t[f"anchor_similarity{direction}"][i] == pytest.approx(want["anchor"], abs=1e-12)
                assert t[f"anchor_gap{direction}"][i] == pytest.approx(want["anchor_gap"], abs=1e-9)
        seen[rows[batch.own]] += 1
    assert (seen == 1).all()      # every sample takes its values from exactly one batch (fill members do not)
    # the k-NN variant's labelled GDA: classes from the pool's least / most salient samples' N - 1 negatives
    S = v @ w.T
    gap = np.array([S[i, i] - max(S[i, j] for j in range(n) if j != i) for i in range(n)])
    lo, hi = int(np.argmin(gap)), int(np.argmax(gap))
    hardest = [max(S[i, j] for j in range(n) if j != i) for i in range(n)]
    want = oracle_posterior(hardest, [S[lo, j] for j in range(n) if j != lo], [S[hi, j] for j in range(n) if j != hi])
    np.testing.assert_allclose(t["knn_clone_prob"], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(t["knn_gap_i2t"], gap, atol=1e-4)
    # another seed gives another partition
    run_clones(emb, tmp_path / "other.parquet", batch_size=b, seed=seed + 1, k=4, device="cpu")
    assert pq.read_table(tmp_path / "other.parquet").column("clone_batch").to_pylist() != t["clone_batch"]


def test_stage_degenerate_batches_and_duplicates_with_truth(tmp_path):
    rng = np.random.default_rng(5)
    n, d = 80, 12
    img = unit_rows(rng.standard_normal((n, d)))
    txt = unit_rows(img + 0.8 * rng.standard_normal((n, d)))
    img[17] = img[5]              # exact copies of image 5
    img[40] = img[5]
    img[30] = unit_rows(img[10:11] + 0.005 * rng.standard_normal((1, d)))[0]  # near copy of 10 (cos ~ 0.9998)
    docs = [{"truth": "duplicate", "duplicate_of": f"{5 if i != 30 else 10:032x}"} if i in (17, 40, 30)
            else {"truth": "clean"} for i in range(n)]
    emb = write_embedding_dir(tmp_path / "emb", img, txt, docs=docs, split=[33, 47])
    # batches of 2: one negative per row, no spread, no GDA: clone_prob and the anchor are NaN
    s = run_clones(emb, tmp_path / "two.parquet", batch_size=2, k=5, device="cpu", truth="json:truth")
    t = pq.read_table(tmp_path / "two.parquet").to_pydict()
    assert all(math.isnan(p) for p in t["clone_prob"]) and all(math.isnan(a) for a in t["anchor_similarity"])
    assert s.batches["i2t"]["with_anchor"] == 0 and s.batches["i2t"]["no_update"] == {"no GDA": 40}
    assert s.n_potential_clones == 0 and s.batches["i2t"]["median_m1"] is None
    dup = {i: x for i, x in enumerate(t["duplicate_of"]) if x is not None}
    uid = np.array([f"{i:032x}" for i in range(n)])
    assert dup == {17: uid[5], 40: uid[5], 30: uid[10]}
    check = s.truth_check
    assert check["duplicate_of vs injected duplicate"]["f1"] == 1.0
    assert check["duplicate_of groups vs duplicate pairs (injected + originals)"]["f1"] == 1.0
    assert check["truth_counts"] == {"clean": 77, "duplicate": 3}
    assert check["clone_prob>0.5 vs injected clone|duplicate"]["tp"] == 0
    # the precision/recall of clone_prob > 0.5 (either direction) against the truth, by hand
    s = run_clones(emb, tmp_path / "c.parquet", batch_size=32, k=5, device="cpu", truth="json:truth")
    t = pq.read_table(tmp_path / "c.parquet").to_pydict()
    flagged = (np.array(t["clone_prob"]) > 0.5) | (np.array(t["clone_prob_t2i"]) > 0.5)
    injected = np.isin(np.arange(n), [17, 40, 30])
    got = s.truth_check["clone_prob>0.5 vs injected clone|duplicate"]
    assert (got["tp"], got["fp"], got["fn"]) == (int((flagged & injected).sum()), int((flagged & ~injected).sum()),
                                                 int((~flagged & injected).sum()))
    assert s.n_potential_clones == int(flagged.sum())
    assert "knn_clone_prob>0.5 vs injected clone|duplicate" in s.truth_check


def test_cli_clones_and_user_errors(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(5)
    img = unit_rows(rng.standard_normal((20, 8)))
    emb = write_embedding_dir(tmp_path / "emb", img, unit_rows(img + 0.5 * rng.standard_normal((20, 8))))
    out = tmp_path / "o" / "c.parquet"
    args = ["clones", str(emb), "--out", str(out), "--k", "3", "--eps", "0.2", "--batch-size", "8", "--seed", "3",
            "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "3 batches of 8" in res.output
    meta = read_meta(out)["clones"]
    assert (meta["eps"], meta["k"], meta["batch_size"], meta["seed"], meta["n_batches"]) == (0.2, 3, 8, 3, 3)
    first = out.read_bytes()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert out.read_bytes() == first  # rerun: identical bytes
    from curate import cli

    monkeypatch.setattr(sys, "argv", ["curate"] + args + ["--batch-size", "1"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--batch-size 1" in err and "Traceback" not in err
    assert CliRunner().invoke(app, args + ["--match-gate"]).exit_code != 0   # the EM match gate is gone
    one = write_embedding_dir(tmp_path / "one", img[:1], img[:1])
    with pytest.raises(CurateError, match="at least 2"):
        run_clones(one, tmp_path / "x.parquet")
    with pytest.raises(CurateError, match="eps"):
        run_clones(emb, tmp_path / "x.parquet", eps=1.5)
    with pytest.raises(CurateError, match="json"):
        run_clones(emb, tmp_path / "x.parquet", truth="json:truth")
    assert json.loads(json.dumps(meta))  # metadata is plain JSON


def test_clones_defaults_agree_between_cli_recipe_and_stage(tmp_path):
    import typer

    command = typer.main.get_command(app).commands["clones"]
    cli = {p.name: p.default for p in command.params}
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(f'[run]\ndir = "{tmp_path}"\n[clones]\n')
    recipe = load_recipe(recipe_path)["clones"]
    for name, value in (("batch_size", 4096), ("eps", 0.1), ("k", 10), ("seed", 0)):
        assert cli[name] == getattr(ClonesConfig(), name) == recipe[name] == value, name


def test_batch_summary_groups_no_update_reasons_by_category():
    from curate.metrics.adacl import MarginStep
    from curate.stages.clones.entry import summarise_batches

    steps = [MarginStep(5.0, 0.1, False, "p̂_u >= 1 - ε: p̂_u = 0.93, m1 would be <= 0", 0.9, 0.1, 0.93, 7),
             MarginStep(5.0, 0.1, False, "p̂_u >= 1 - ε: p̂_u = 0.99, m1 would be <= 0", 0.8, 0.2, 0.99, 3),
             MarginStep(2.0, 0.3, True, None, 0.7, 0.3, 0.5, 5),
             MarginStep(4.0, 0.5, True, None, 0.5, 0.05, 0.2, 1)]
    got = summarise_batches(steps)
    assert got["no_update"] == {"p̂_u >= 1 - ε": 2} and got["margins_updated"] == 2
    assert got["median_m1"] == 3.0 and got["median_m2"] == pytest.approx(0.4)       # updated batches only
    assert got["median_anchor_similarity"] == pytest.approx(0.75) and got["potential_clones"] == 16
