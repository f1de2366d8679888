"""PCME / PCME++ match probabilities and losses, tier-1 logistic calibration, ROC-AUC, `curate pcme ...`."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from curate.cli import app
from curate.errors import CurateError
from curate.io.tables import read_meta
from curate.metrics import pcme as pm
from curate.stages.pcme import PcmeCalibrateConfig, PcmeFitConfig, PcmeScoreConfig
from curate.stages.pcme import entry as stage
from embedding_dirs import noisy_pairs, write_embedding_dir


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_csd_hand_check():
    p = pm.match_prob_csd(torch.tensor(0.9), 5.0, 5.0)
    assert float(p) == pytest.approx(0.62246, abs=1e-5)


def _gaussians(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(b, d, generator=g, dtype=torch.float64)  # noqa: E731
    return draw(), draw() - 2, draw(), draw() - 2


def test_csd_pairwise_and_paired_against_loops():
    mu_v, lv_v, mu_t, lv_t = _gaussians(5, 4, 0)
    pair = pm.csd_pairwise(mu_v, lv_v, mu_t, lv_t).numpy()
    for i in range(5):
        for j in range(5):
            want = sum((mu_v[i, d] - mu_t[j, d]) ** 2 + math.exp(lv_v[i, d]) + math.exp(lv_t[j, d]) for d in range(4))
            assert pair[i, j] == pytest.approx(float(want), rel=1e-10)
    np.testing.assert_allclose(pm.csd_paired(mu_v, lv_v, mu_t, lv_t).numpy(), np.diag(pair), rtol=1e-10)


def test_mc_probability_from_samples_against_a_loop():
    g = torch.Generator().manual_seed(1)
    zv = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    zt = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    a, b = 2.0, 3.0
    log_p, log_not = pm.mc_log_match_from_samples(zv, zt, a, b, pairwise=True)
    for i in range(3):
        for j in range(2):
            vals = [_sig(-a * float(torch.linalg.norm(zv[i, k] - zt[j, l])) + b) for k in range(4) for l in range(4)]
            assert float(log_p[i, j].exp()) == pytest.approx(np.mean(vals), rel=1e-10)
            assert float(log_not[i, j].exp()) == pytest.approx(1 - np.mean(vals), rel=1e-10)
    lp, _ = pm.mc_log_match_from_samples(zv[:2], zt, a, b, pairwise=False)
    np.testing.assert_allclose(lp.numpy(), np.diag(log_p.numpy()[:2, :2]), rtol=1e-10)


def test_mc_reduces_to_the_distance_formula_without_variance_and_samples_reparameterise():
    mu_v, _, mu_t, _ = _gaussians(4, 3, 2)
    tiny = torch.full((4, 3), -60.0, dtype=torch.float64)
    p = pm.match_prob_mc(mu_v, tiny, mu_t, tiny, 4.0, 1.0, n_samples=3, generator=torch.Generator().manual_seed(0))
    want = [_sig(-4.0 * float(torch.linalg.norm(mu_v[i] - mu_t[i])) + 1.0) for i in range(4)]
    np.testing.assert_allclose(p.numpy(), want, rtol=1e-9)
    mu = torch.tensor([[1.0, -2.0]])
    lv = torch.log(torch.tensor([[0.25, 4.0]]))
    z = pm._samples(mu, lv, 20000, torch.Generator().manual_seed(1))[0]
    np.testing.assert_allclose(z.mean(0).numpy(), [1.0, -2.0], atol=0.05)
    np.testing.assert_allclose(z.var(0).numpy(), [0.25, 4.0], rtol=0.05)


def test_kl_against_formula():
    mu, lv, _, _ = _gaussians(3, 4, 3)
    got = pm.kl_to_standard_normal(mu, lv).numpy()
    for i in range(3):
        want = sum(0.5 * (float(mu[i, d]) ** 2 + math.exp(lv[i, d]) - float(lv[i, d]) - 1) for d in range(4))
        assert got[i] == pytest.approx(want, rel=1e-10)


def vib_oracle(mu: np.ndarray, logvar: np.ndarray) -> float:
    """The VIB term as PCME++ averages it: (1/(B·D)) Σ_i Σ_d ½(μ_id² + σ_id² - log σ_id² - 1), by loops."""
    b, d = mu.shape
    total = sum(0.5 * (mu[i, k] ** 2 + math.exp(logvar[i, k]) - logvar[i, k] - 1) for i in range(b) for k in range(d))
    return total / (b * d)


def test_vib_penalty_averages_over_rows_and_dimensions():
    mu, lv, _, _ = _gaussians(3, 5, 6)
    assert float(pm.vib_penalty(mu, lv)) == pytest.approx(vib_oracle(mu.numpy(), lv.numpy()), rel=1e-12)
    # pcmepp's criterion, transcribed: -0.5 * (1 + logsigma - mu.pow(2) - logsigma.exp()).mean()
    pcmepp = float(-0.5 * (1 + lv - mu.pow(2) - lv.exp()).mean())
    assert float(pm.vib_penalty(mu, lv)) == pytest.approx(pcmepp, rel=1e-12)
    # by hand: μ = (1, 0), σ² = (1, 1): per dimension ½(1 + 1 - 0 - 1) = ½ and ½(0 + 1 - 0 - 1) = 0; mean ¼
    assert float(pm.vib_penalty(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2))) == pytest.approx(0.25)


def test_vib_weight_means_the_same_at_any_width():
    """The VIB term in the loss is a per-dimension mean: copying every dimension k times leaves it unchanged
    (a sum over dimensions would grow k-fold, the ~D x stronger regulariser of a summed KL)."""
    mu_v, lv_v, mu_t, lv_t = _gaussians(4, 3, 5)
    w = 0.5

    def vib_part(k):
        widen = lambda x: x.repeat(1, k)  # noqa: E731
        args = (widen(mu_v), widen(lv_v), widen(mu_t), widen(lv_t))
        return float(pm.pcme_loss(*args, 1.0, 0.0, vib_weight=w) - pm.pcme_loss(*args, 1.0, 0.0, vib_weight=0.0))

    assert vib_part(1) == pytest.approx(w * 0.5 * (vib_oracle(mu_v.numpy(), lv_v.numpy())
                                                  + vib_oracle(mu_t.numpy(), lv_t.numpy())), rel=1e-9)
    assert vib_part(4) == pytest.approx(vib_part(1), rel=1e-9)


def test_csd_loss_against_a_loop():
    mu_v, lv_v, mu_t, lv_t = _gaussians(4, 3, 4)
    a, b, w = 1.5, 2.0, 0.01
    got = float(pm.pcme_loss(mu_v, lv_v, mu_t, lv_t, a, b, kind="csd", vib_weight=w))
    csd = pm.csd_pairwise(mu_v, lv_v, mu_t, lv_t).numpy()
    terms = []
    for i in range(4):
        for j in range(4):
            p = _sig(-a * csd[i, j] + b)
            terms.append(-math.log(p) if i == j else -math.log(1 - p))
    vib = 0.5 * (vib_oracle(mu_v.numpy(), lv_v.numpy()) + vib_oracle(mu_t.numpy(), lv_t.numpy()))
    assert got == pytest.approx(np.mean(terms) + w * vib, rel=1e-9)
    mc = pm.pcme_loss(mu_v, lv_v, mu_t, lv_t, a, b, kind="mc", n_samples=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(mc)
    with pytest.raises(ValueError):
        pm.pcme_loss(mu_v, lv_v, mu_t, lv_t, a, b, kind="nope")


def test_logistic_calibration_recovers_known_parameters_and_is_stationary():
    rng = np.random.default_rng(0)
    a_true, b_true = 6.0, 8.0
    s = rng.uniform(-0.2, 0.9, 40000)
    p = 1 / (1 + np.exp(-(-a_true * (2 - 2 * s) + b_true)))
    y = rng.random(len(s)) < p
    # equal numbers of positives and negatives keep the balanced weighting equal to plain ML
    n = min(y.sum(), (~y).sum())
    s_pos, s_neg = s[y][:n], s[~y][:n]
    fit = pm.fit_match_logistic(s_pos, s_neg)
    assert fit["converged"]
    assert fit["a"] == pytest.approx(a_true, rel=0.1)
    assert fit["b"] == pytest.approx(b_true, rel=0.1)
    # gradient of the log-likelihood at the fit, written out: ~0
    ga = gb = 0.0
    for x, lab in ((2 - 2 * s_pos, 1.0), (2 - 2 * s_neg, 0.0)):
        q = 1 / (1 + np.exp(-(-fit["a"] * x + fit["b"])))
        ga += float(np.sum((q - lab) * -x)) / len(x)
        gb += float(np.sum(q - lab)) / len(x)
    assert abs(ga) < 1e-4 and abs(gb) < 1e-4
    np.testing.assert_allclose(pm.match_prob_from_cosine(np.array([0.5]), 5.0, 5.0), [_sig(0.0)])


def test_roc_auc_against_pair_counting():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    labels = rng.random(40) < 0.4
    pos, neg = scores[labels], scores[~labels]
    want = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])
    assert pm.binary_roc_auc(scores, labels) == pytest.approx(want, rel=1e-12)
    assert math.isnan(pm.binary_roc_auc(scores, np.ones(40, bool)))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The heads are tiny: one intra-op thread is as fast, and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def noisy_emb(tmp_path_factory):
    img, txt, clean = noisy_pairs(600, 16, 0.3, seed=7, noise=0.08)
    docs = [{"truth": "clean" if c else "swapped"} for c in clean]
    return write_embedding_dir(tmp_path_factory.mktemp("pcme") / "emb", img, txt, docs=docs, split=[250, 350])


def test_calibrate_stage(noisy_emb, tmp_path):
    out = tmp_path / "cal.parquet"
    s = stage.calibrate_p_match(noisy_emb, out, PcmeCalibrateConfig(pairs=400, truth="json:truth"))
    t = pq.read_table(out)
    assert t.column_names == ["uid", "similarity", "p_match"] and t.num_rows == 600
    assert s.a > 0
    assert s.truth_check["roc_auc_p_match_clean_vs_corrupted"] > 0.95
    p = t.column("p_match").to_numpy()
    sim = t.column("similarity").to_numpy().astype(np.float64)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(-s.a * (2 - 2 * sim) + s.b))), rtol=1e-6)
    assert read_meta(out)["pcme"]["n_pairs"] == 400


@pytest.mark.parametrize("loss", ["csd", "mc"])
def test_fit_and_score_stage(noisy_emb, tmp_path, loss):
    heads = tmp_path / "heads.pt"
    stage.fit_heads(noisy_emb, heads, PcmeFitConfig(loss=loss, steps=40, batch_size=64, n_samples=4, hidden=16,
                                                  device="cpu", seed=3))
    ckpt = torch.load(heads, weights_only=True)  # plain types and tensors only
    assert ckpt["config"]["loss"] == loss and ckpt["train"]["steps"] == 40
    assert ckpt["train"]["final_loss"] < ckpt["train"]["loss_curve"][0]
    out = tmp_path / "pcme.parquet"
    s = stage.p_match_and_uncertainty(noisy_emb, heads, out, PcmeScoreConfig(device="cpu", truth="json:truth"))
    t = pq.read_table(out)
    assert t.column_names == ["uid", "p_match", "csd", "uncertainty_img", "uncertainty_txt", "uncertainty"]
    u = t.column("uncertainty_img").to_numpy()
    assert np.all(u > 0) and np.all(np.isfinite(u))
    assert s.truth_check["roc_auc_p_match_clean_vs_corrupted"] > 0.9
    # score recomputes the closed form from the heads
    h, _ = stage.load_heads(heads)
    from curate.io.tables import EmbeddingPool

    pool = EmbeddingPool(noisy_emb)
    v = torch.from_numpy(pool.matrix("image_embedding").astype(np.float32)[:5])
    w = torch.from_numpy(pool.matrix("text_embedding").astype(np.float32)[:5])
    mu_i, lv_i, mu_t, lv_t = h(v, w)
    want = torch.sigmoid(-h.a * pm.csd_paired(mu_i, lv_i, mu_t, lv_t) + h.b).detach().numpy()
    np.testing.assert_allclose(t.column("p_match").to_numpy()[:5], want, rtol=1e-5)


def test_fit_is_deterministic_and_cli(noisy_emb, tmp_path):
    runner = CliRunner()
    args = ["pcme", "fit", str(noisy_emb), "--steps", "15", "--batch-size", "32", "--hidden", "8", "--device", "cpu"]
    assert runner.invoke(app, args + ["--out", str(tmp_path / "a.pt")]).exit_code == 0
    assert runner.invoke(app, args + ["--out", str(tmp_path / "b.pt")]).exit_code == 0
    a = torch.load(tmp_path / "a.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()  # same seed, same bytes
    res = runner.invoke(app, ["pcme", "score", str(noisy_emb), "--heads", str(tmp_path / "a.pt"), "--out",
                              str(tmp_path / "s.parquet"), "--estimator", "mc", "--samples", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["pcme", "calibrate", str(noisy_emb), "--out", str(tmp_path / "c.parquet")])
    assert res.exit_code == 0, res.output


def test_monte_carlo_uses_seven_samples_per_side_by_default(noisy_emb, tmp_path, monkeypatch):
    """J = 7 as in PCME's configs, for `pcme fit --loss mc` and `pcme score --estimator mc` alike."""
    runner = CliRunner()
    res = runner.invoke(app, ["pcme", "fit", str(noisy_emb), "--loss", "mc", "--steps", "2", "--batch-size", "8",
                              "--hidden", "4", "--device", "cpu", "--out", str(tmp_path / "h.pt")])
    assert res.exit_code == 0, res.output
    assert torch.load(tmp_path / "h.pt", weights_only=True)["config"]["n_samples"] == 7
    res = runner.invoke(app, ["pcme", "score", str(noisy_emb), "--heads", str(tmp_path / "h.pt"), "--out",
                              str(tmp_path / "s.parquet"), "--estimator", "mc", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert read_meta(tmp_path / "s.parquet")["pcme"]["n_samples"] == 7
    # the library's defaults agree: 7 draws per side reach the sampler
    seen = []
    real = pm._samples

    def counting(mu, logvar, n, generator):
        seen.append(n)
        return real(mu, logvar, n, generator)

    monkeypatch.setattr(pm, "_samples", counting)
    mu_v, lv_v, mu_t, lv_t = _gaussians(2, 3, 8)
    pm.match_prob_mc(mu_v, lv_v, mu_t, lv_t, 1.0, 0.0)
    pm.pcme_loss(mu_v, lv_v, mu_t, lv_t, 1.0, 0.0, kind="mc")
    assert seen == [7, 7, 7, 7] and pm.DEFAULT_SAMPLES == 7


def test_score_refuses_foreign_heads_and_bad_files(noisy_emb, tmp_path):
    heads = tmp_path / "h.pt"
    stage.fit_heads(noisy_emb, heads, PcmeFitConfig(steps=2, batch_size=16, hidden=4, device="cpu"))
    img, txt, _ = noisy_pairs(10, 16, 0.0, seed=1)
    other = write_embedding_dir(tmp_path / "other", img, txt, model="another-teacher")
    with pytest.raises(CurateError, match="teacher"):
        stage.p_match_and_uncertainty(other, heads, tmp_path / "x.parquet", PcmeScoreConfig(device="cpu"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CurateError, match="not a readable heads checkpoint"):
        stage.p_match_and_uncertainty(noisy_emb, bad, tmp_path / "x.parquet", PcmeScoreConfig(device="cpu"))
    with pytest.raises(CurateError, match="no such heads"):
        stage.p_match_and_uncertainty(noisy_emb, tmp_path / "missing.pt", tmp_path / "x.parquet",
                                      PcmeScoreConfig(device="cpu"))
    with pytest.raises(CurateError, match="--loss"):
        stage.fit_heads(noisy_emb, heads, PcmeFitConfig(loss="nope"))


def test_formula_hand_checks():
    """The Formulas section's examples, by hand."""
    zv = torch.zeros(1, 2, 2, dtype=torch.float64)
    zt = torch.tensor([[[0.6, 0.8], [0.0, 0.0]]], dtype=torch.float64)  # distances 1, 0, 1, 0
    log_p, _ = pm.mc_log_match_from_samples(zv, zt, 5.0, 5.0, pairwise=False)
    assert float(log_p.exp()) == pytest.approx(0.5 * (0.5 + _sig(5.0)), abs=1e-7)  # 0.746654
    mu_v, mu_t = torch.zeros(1, 2), torch.tensor([[0.3, 0.4]])
    lv_v, lv_t = torch.log(torch.tensor([[0.2, 0.1]])), torch.log(torch.tensor([[0.2, 0.15]]))
    csd = pm.csd_paired(mu_v, lv_v, mu_t, lv_t)
    assert float(csd) == pytest.approx(0.25 + 0.65, abs=1e-6)
    assert float(pm.match_prob_csd(csd, 5.0, 5.0)) == pytest.approx(_sig(0.5), abs=1e-6)  # 0.622459
    assert float(pm.match_prob_from_cosine(0.8, 5.0, 5.0)) == pytest.approx(_sig(3.0))  # 0.952574
    # the same example through the heads' scoring: μ = x (W = 0) and constant log σ² (output weights 0)
    heads = pm.PCMEHeads(2, init_a=5.0, init_b=5.0)
    with torch.no_grad():
        heads.img.var_out.bias.copy_(lv_v[0])
        heads.txt.var_out.bias.copy_(lv_t[0])
    got = heads.score(mu_v, mu_t)
    assert float(got["csd"]) == pytest.approx(0.9, abs=1e-6)
    assert float(got["p_match"]) == pytest.approx(_sig(0.5), abs=1e-6)
    assert (float(got["uncertainty_img"]), float(got["uncertainty_txt"])) == pytest.approx((0.15, 0.175))
