"""NormSim: metric vs plain-loop references, hand case, properties, targets, the stage and the CLI."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_embedding_dir, run_normsim
from curate.errors import CurateError
from curate.io.tables import EmbeddingPool, TeacherInfo, numpy_to_vectors, read_meta
from curate.io.targets import load_target
from curate.metrics.normsim import (build_ivf_index, keep_count, nested_sizes, normsim_2, normsim_2d, normsim_inf,
                                    normsim_inf_exact, second_moment, splitmix64_mix, subsample_draws, subsample_mask,
                                    top_fraction_mask)
from curate.stages.normsim import NormsimConfig
from curate.stages.normsim.local import normsim_scores
from curate.stages.normsim.targets import normsim_target
from normsim_oracles import (MASK64, SPLITMIX_GAMMA, in_subsample, reference_normsim, reference_vas_d, splitmix64,
                             subsets_of_column, write_pool)


def random_unit(n: int, d: int, rng) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------- metrics

def test_hand_case_two_axes():
    """Targets (1,0), (0,1), candidate (0.6, 0.8): NormSim_2 = sqrt(0.36 + 0.64) = 1, NormSim_∞ = 0.8."""
    target = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    v = np.array([[0.6, 0.8]], np.float32)
    np.testing.assert_allclose(normsim_2(v, second_moment(target)), [1.0], atol=1e-6)
    np.testing.assert_allclose(normsim_inf_exact(v, target), [0.8], atol=1e-6)
    # |.|: a candidate opposite to every target is as aligned as one along them.
    np.testing.assert_allclose(normsim_inf_exact(-v, target), [0.8], atol=1e-6)
    np.testing.assert_allclose(normsim_inf(-v, build_ivf_index(target, nlist=1)), [0.8], atol=1e-6)


def test_normsim_matches_loop_with_negative_products():
    rng = np.random.default_rng(0)
    v, target = random_unit(30, 5, rng), random_unit(7, 5, rng)
    assert (v @ target.T).min() < -0.3  # the absolute value matters here
    np.testing.assert_allclose(normsim_2(v, second_moment(target)), reference_normsim(v, target, 2), atol=1e-5)
    want_inf = reference_normsim(v, target, float("inf"))
    np.testing.assert_allclose(normsim_inf_exact(v, target), want_inf, atol=1e-6)
    np.testing.assert_allclose(normsim_inf_exact(v, target, tile_elements=10), want_inf, atol=1e-6)  # 1 row per tile


def test_exact_inf_equals_faiss_flat_over_both_signs():
    """The one-pass max/min route gives what FAISS IndexFlatIP top-1 over [X; -X] gives, at half the work."""
    import faiss

    rng = np.random.default_rng(8)
    v, target = random_unit(200, 12, rng), random_unit(40, 12, rng)
    index = faiss.IndexFlatIP(12)
    index.add(np.concatenate([target, -target]))
    np.testing.assert_allclose(normsim_inf_exact(v, target), index.search(v, 1)[0][:, 0], atol=1e-6)


def test_second_moment_in_chunks():
    rng = np.random.default_rng(1)
    x = random_unit(50, 4, rng)
    np.testing.assert_allclose(second_moment(x, chunk_rows=7), x.astype(np.float64).T @ x, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(1, 8), d=st.integers(2, 6), seed=st.integers(0, 2**32 - 1))
def test_inf_le_2_le_sqrt_m_inf(n, m, d, seed):
    rng = np.random.default_rng(seed)
    v, target = random_unit(n, d, rng), random_unit(m, d, rng)
    inf = normsim_inf_exact(v, target).astype(np.float64)
    two = normsim_2(v, second_moment(target)).astype(np.float64)
    assert (inf <= two + 1e-5).all()
    assert (two <= np.sqrt(m) * inf + 1e-5).all()


def test_ivf_index_full_probe_is_exact_and_default_recall():
    rng = np.random.default_rng(2)
    centres = random_unit(20, 16, rng)
    target = centres[rng.integers(0, 20, 3000)] + 0.1 * rng.standard_normal((3000, 16)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    v = random_unit(500, 16, rng)
    exact = normsim_inf_exact(v, target)
    full = normsim_inf(v, build_ivf_index(target, nlist=32, nprobe=32))
    np.testing.assert_allclose(full, exact, atol=1e-6)
    approx = normsim_inf(v, build_ivf_index(target, nlist=32, nprobe=4))
    assert (approx <= exact + 1e-6).all()  # IVF can only miss the best match, never invent a better one
    recall = float(np.mean(np.abs(approx - exact) < 1e-6))
    assert recall >= 0.8, recall


def test_top_fraction_exact_count_and_ties():
    assert keep_count(10, 0.3) == 3  # not ⌈3.0000000000000004⌉ = 4
    assert keep_count(7, 0.5) == 4 and keep_count(5, 0.0) == 0 and keep_count(5, 1.0) == 5
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5, 0.7], np.float32)
    mask = top_fraction_mask(scores, 0.5)  # 3 kept: 0.9, 0.7, then the first 0.5 (index 0)
    assert mask.tolist() == [True, True, False, False, False, True]


def clustered_pool(n: int, d: int, seed: int) -> np.ndarray:
    """Unit vectors, a third of them in a tight cluster, so that dropping rows moves the second moment."""
    rng = np.random.default_rng(seed)
    v = random_unit(n, d, rng)
    v[: n // 3] = random_unit(1, d, rng) + 0.3 * v[: n // 3]
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_splitmix64_and_the_subsample_draws():
    assert int(splitmix64_mix(np.uint64(SPLITMIX_GAMMA))) == 0xE220A8397B1DCDAF  # splitmix64(seed 0), 1st output
    assert int(splitmix64_mix(np.uint64(2 * SPLITMIX_GAMMA & MASK64))) == 0x6E789E6AA1B965F4  # 2nd output
    rows = np.array([0, 1, 7, 123456789, 2**40 + 3])
    for seed, iteration in [(0, 0), (0, 1), (5, 0), (2**64 - 1, 99)]:
        want = [splitmix64((splitmix64((seed + (iteration + 1) * SPLITMIX_GAMMA) & MASK64)
                            + (int(r) + 1) * SPLITMIX_GAMMA) & MASK64) for r in rows]
        assert subsample_draws(rows, seed, iteration).tolist() == want
        assert subsample_mask(rows, seed, iteration, 0.3).tolist() == [in_subsample(int(r), seed, iteration, 0.3)
                                                                        for r in rows]
    share = subsample_mask(np.arange(100_000), 3, 2, 0.1).mean()
    assert abs(share - 0.1) < 0.004  # a Bernoulli(0.1) sample: sd 0.00095
    assert subsample_mask(np.arange(10), 0, 0, 1.0).all()
    # fresh draws each iteration and seed, independent of the other rows
    assert (subsample_draws(np.arange(50), 0, 0) != subsample_draws(np.arange(50), 0, 1)).all()
    assert (subsample_draws(np.arange(50), 0, 0) != subsample_draws(np.arange(50), 1, 0)).all()
    assert subsample_draws(np.arange(50), 4, 3)[17] == subsample_draws(np.array([17]), 4, 3)[0]


def test_nested_sizes_equal_chunks_down_to_the_final_count():
    assert nested_sizes(10, 10, 0.3, 3) == [10, 7, 4, 3]  # chunk ⌈7/3⌉ = 3, the last one down to 3
    assert nested_sizes(10, 6, 0.3, 3) == [6, 5, 4, 3]  # after a pre-filter keeping 6: chunk ⌈3/3⌉ = 1
    assert nested_sizes(10, 10, 0.3, 5) == [10, 8, 6, 4, 3, 3]  # chunk 2: 4 - 2 would undershoot 3
    assert nested_sizes(10, 3, 0.3, 4) == [3, 3, 3, 3, 3]
    assert nested_sizes(1000, 1000, 0.29, 1) == [1000, 290]  # ⌈0.29·1000⌉, not int(289.99999999999994)
    with pytest.raises(ValueError, match="keeps 2 rows, fewer than the final fraction's 3"):
        nested_sizes(10, 2, 0.3, 3)


def test_normsim_2d_hand_example():
    """N = 5, D = 2, T = 2, F = 0.4, subsample 1 (every row): C_0 = mean x xᵀ = diag(0.6, 0.4); iteration 0
    scores sqrt(0.6) = .7746 (x1, x2), sqrt(.528) = .7266 (x3), sqrt(.4) = .6325 (x4), sqrt(.472) = .6870 (x5)
    and removes the chunk ⌈(5 − 2)/2⌉ = 2 lowest (x4, x5: level 1); C_1 = mean over x1..x3 =
    [[.88, .16], [.16, .12]] scores sqrt(.88) = .9381 (x1, x2) and sqrt(.76) = .8718 (x3); the last iteration
    keeps 2 (x1, x2: level T+1 = 3) and removes x3 (level 2). Column: level + score/2."""
    v = np.array([[1, 0], [1, 0], [0.8, 0.6], [0, 1], [-0.6, 0.8]], np.float32)
    got = normsim_2d(v, iterations=2, final_fraction=0.4, subsample=1.0, chunk_rows=2)
    want = [3 + math.sqrt(0.88) / 2, 3 + math.sqrt(0.88) / 2, 2 + math.sqrt(0.76) / 2, 1 + math.sqrt(0.4) / 2,
            1 + math.sqrt(0.472) / 2]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.dtype == np.float32 and top_fraction_mask(got, 0.4).tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("iterations, final_fraction, subsample, seed, prefilter",
                         [(30, 0.3, 0.1, 0, False), (30, 0.3, 0.1, 7, True), (12, 0.5, 0.25, 3, False),
                          (1, 0.3, 0.1, 1, True), (100, 0.2, 0.1, 2, False)])
def test_normsim_2d_selects_what_the_reference_loop_selects(iterations, final_fraction, subsample, seed, prefilter):
    v = clustered_pool(1500, 8, seed)
    candidates = np.random.default_rng(seed).random(len(v)) < 0.6 if prefilter else None
    column = normsim_2d(v, iterations, final_fraction, subsample, seed, candidates, chunk_rows=400)
    want = reference_vas_d(v, iterations, final_fraction, subsample, seed, candidates)
    assert subsets_of_column(column, iterations) == want  # every S_i, not only the final one
    top = top_fraction_mask(column, final_fraction)
    assert np.flatnonzero(top).tolist() == want[-1]  # "keep the top F" by the column is the subset
    if prefilter:  # the pre-filter's dropped rows rank below every candidate
        assert column[~candidates].max() < column[candidates].min()


def test_normsim_2d_is_nested_and_seeded():
    v = clustered_pool(900, 6, 4)
    column = normsim_2d(v, 20, 0.3, 0.1, seed=4)
    subsets = [set(s) for s in subsets_of_column(column, 20)]
    assert all(later <= earlier for earlier, later in zip(subsets, subsets[1:]))  # S_{i+1} ⊂ S_i
    assert [len(s) for s in subsets] == nested_sizes(900, 900, 0.3, 20)
    assert normsim_2d(v, 20, 0.3, 0.1, seed=4).tobytes() == column.tobytes()
    assert normsim_2d(v, 20, 0.3, 0.1, seed=5).tobytes() != column.tobytes()  # another subsample, other scores


# ---------------------------------------------------------------- targets

def test_targets_npy_parquet_dir_and_errors(tmp_path):
    teacher = TeacherInfo("test", "none", 6, 100.0)
    rng = np.random.default_rng(4)
    raw = rng.standard_normal((5, 6)).astype(np.float32) * 3.0
    want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.save(tmp_path / "t.npy", raw)
    np.testing.assert_allclose(load_target(tmp_path / "t.npy", teacher), want, atol=1e-6)  # normalised on load
    pq.write_table(pa.table({"embedding": numpy_to_vectors(raw, pa.float32())}), tmp_path / "t.parquet")
    np.testing.assert_allclose(load_target(tmp_path / "t.parquet", teacher), want, atol=1e-6)
    emb = make_embedding_dir(tmp_path / "dir", [3, 4], dim=6, seed=5)
    from_dir = load_target(emb, teacher)
    pool_image = np.concatenate([c["image_embedding"] for _, c in EmbeddingPool(emb).iter_chunks()])
    np.testing.assert_allclose(from_dir, pool_image / np.linalg.norm(pool_image, axis=1, keepdims=True), atol=1e-6)
    one_table = sorted(Path(emb).glob("*.parquet"))[0]  # one embed table as a .parquet target
    np.testing.assert_allclose(load_target(one_table, teacher), from_dir[:3], atol=1e-6)

    with pytest.raises(CurateError, match=r"t\.npy: target embeddings have dimension 6 but the pool's have 8"):
        load_target(tmp_path / "t.npy", TeacherInfo("test", "none", 8, 100.0))
    with pytest.raises(CurateError, match="different|embedded with"):
        load_target(emb, TeacherInfo("other", "none", 6, 100.0))
    raw[2] = 0.0
    np.save(tmp_path / "zero.npy", raw)
    with pytest.raises(CurateError, match=r"zero\.npy: 1 target rows are not finite or have zero norm"):
        load_target(tmp_path / "zero.npy", teacher)
    with pytest.raises(CurateError, match="only valid with --p 2d"):
        load_target("none", teacher)
    with pytest.raises(CurateError, match="target not found"):
        load_target(tmp_path / "missing.npy", teacher)
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "bad.parquet")
    with pytest.raises(CurateError, match="no `image_embedding` or `embedding` column"):
        load_target(tmp_path / "bad.parquet", teacher)


class FakeTextTower:
    """Stands in for load_teacher(...): each prompt maps to a fixed random unit vector."""

    calls = 0

    def __init__(self, dim: int):
        import torch

        self.dim, self.device = dim, torch.device("cpu")
        self.info = TeacherInfo("fake", "none", dim, 100.0)

    def tokenizer(self, prompts):
        return list(prompts)

    def encode_text(self, tokens):
        import torch

        FakeTextTower.calls += 1
        return torch.from_numpy(np.stack([prompt_vector(p, self.dim) for p in tokens]))


def prompt_vector(prompt: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(prompt.encode()[:8].ljust(8, b"\0"), "little") ^ len(prompt) ^ sum(prompt.encode())
    x = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return x / np.linalg.norm(x)


def test_imagenet_text_target_averages_templates_and_caches(tmp_path, monkeypatch):
    import curate.models
    from open_clip import zero_shot_metadata as z

    monkeypatch.setattr(curate.models, "load_teacher", lambda model, pretrained, device="cpu", **kw: FakeTextTower(8),
                        raising=False)
    teacher = TeacherInfo("fake", "none", 8, 100.0)
    FakeTextTower.calls = 0
    got = normsim_target("imagenet-text", teacher, cache_dir=tmp_path, templates="simple").matrix
    assert got.shape == (1000, 8) and FakeTextTower.calls > 0
    for cls in (0, 417, 999):
        name = z.IMAGENET_CLASSNAMES[cls]
        mean = np.mean([prompt_vector(t(name), 8) for t in z.SIMPLE_IMAGENET_TEMPLATES], axis=0)
        np.testing.assert_allclose(got[cls], mean / np.linalg.norm(mean), atol=1e-5)
    FakeTextTower.calls = 0
    again = normsim_target("imagenet-text", teacher, cache_dir=tmp_path, templates="simple").matrix
    assert FakeTextTower.calls == 0 and np.array_equal(got, again)  # served from the per-teacher cache
    with pytest.raises(CurateError, match="dimension 8 but the pool's have 4|dim"):
        normsim_target("imagenet-text", TeacherInfo("fake", "none", 4, 100.0), cache_dir=tmp_path / "other",
                       templates="simple")


# ---------------------------------------------------------------- the stage and the CLI

def test_stage_hand_case_and_columns(tmp_path):
    pool_dir = write_pool(tmp_path / "emb", np.array([[0.6, 0.8], [1.0, 0.0], [-0.8, 0.6]], np.float32))
    np.save(tmp_path / "axes.npy", np.array([[1.0, 0.0], [0.0, 1.0]], np.float32))
    run_normsim(pool_dir, tmp_path / "inf.parquet", target=str(tmp_path / "axes.npy"), p="inf")
    run_normsim(pool_dir, tmp_path / "two.parquet", target=str(tmp_path / "axes.npy"), p="2")
    inf = pq.read_table(tmp_path / "inf.parquet")
    two = pq.read_table(tmp_path / "two.parquet")
    assert inf.column_names == ["uid", "normsim_inf"] and two.column_names == ["uid", "normsim_2"]
    # fp16 storage rounds 0.6 and 0.8 slightly
    np.testing.assert_allclose(inf.column("normsim_inf").to_numpy(), [0.8, 1.0, 0.8], atol=1e-3)
    np.testing.assert_allclose(two.column("normsim_2").to_numpy(), [1.0, 1.0, 1.0], atol=1e-3)
    assert read_meta(tmp_path / "inf.parquet")["params"]["target_rows"] == 2


def test_stage_matches_reference_multiple_files(tmp_path):
    emb = make_embedding_dir(tmp_path / "emb", [11, 9, 15], dim=6, seed=6)
    target = random_unit(9, 6, np.random.default_rng(7))
    np.save(tmp_path / "target.npy", target)
    pool = EmbeddingPool(emb)
    v = np.concatenate([c["image_embedding"] for _, c in pool.iter_chunks()])
    for p in ("inf", "2"):
        result = run_normsim(emb, tmp_path / f"{p}.parquet", target=str(tmp_path / "target.npy"), p=p)
        assert result.rows == 35
        got = pq.read_table(tmp_path / f"{p}.parquet").column(f"normsim_{p}").to_numpy()
        np.testing.assert_allclose(got, reference_normsim(v, target, float(p)), atol=1e-5)
    ivf = NormsimConfig(target=str(tmp_path / "target.npy"), p="inf", index="ivf", nlist=3, nprobe=3)
    np.testing.assert_allclose(normsim_scores(pool, ivf), reference_normsim(v, target, float("inf")), atol=1e-5)
    run_normsim(emb, tmp_path / "2d.parquet", target=None, p="2d", iterations=3, final_fraction=0.5, subsample=0.5,
                seed=2, cache_dir=tmp_path / "c")
    got = pq.read_table(tmp_path / "2d.parquet").column("normsim_2d").to_numpy()
    assert subsets_of_column(got, 3) == reference_vas_d(v, 3, 0.5, 0.5, 2)
    np.testing.assert_allclose(got, normsim_2d(v, 3, 0.5, 0.5, 2), rtol=1e-6, atol=1e-6)
    meta = read_meta(tmp_path / "2d.parquet")
    params = meta["params"]
    assert (params["iterations"], params["final_fraction"], params["subsample"], params["seed"]) == (3, 0.5, 0.5, 2)
    assert params["schedule"] == "nested" and params["prefilter"] is None
    assert params["kept_rows"] == [35, 29, 23, 18] and len(params["subsample_rows"]) == 3
    first = (tmp_path / "2d.parquet").read_bytes()
    run_normsim(emb, tmp_path / "2d.parquet", target="none", p="2d", iterations=3, final_fraction=0.5, subsample=0.5,
                seed=2, cache_dir=tmp_path / "c")
    assert (tmp_path / "2d.parquet").read_bytes() == first


def test_stage_parameter_errors(tmp_path):
    emb = make_embedding_dir(tmp_path / "emb", [4], dim=3, seed=0)
    np.save(tmp_path / "t.npy", np.eye(3, dtype=np.float32))
    np.save(tmp_path / "t4.npy", np.eye(4, dtype=np.float32))
    out = tmp_path / "o.parquet"
    cases = [(dict(target=str(tmp_path / "t.npy"), p="3"), "--p must be one of"),
             (dict(target=None, p="inf"), "needs a target"),
             (dict(target="none", p="2"), "needs a target"),
             (dict(target=str(tmp_path / "t.npy"), p="2d"), "pass --target none"),
             (dict(target=str(tmp_path / "t4.npy"), p="inf"), r"t4\.npy: target embeddings have dimension 4 but the pool's have 3"),
             (dict(target=str(tmp_path / "t.npy"), p="inf", index="hnsw"), "--index 'hnsw'; choose one of flat, ivf"),
             (dict(target=None, p="2d", final_fraction=0.0), "--final-fraction"),
             (dict(target=None, p="2d", iterations=0), "--iterations 0 must be an integer from 1 to 10000"),
             (dict(target=None, p="2d", iterations=10_001), "--iterations 10001 must be an integer from 1 to 10000"),
             (dict(target=None, p="2d", subsample=0.0), r"--subsample 0.0 must be in \(0, 1\]"),
             (dict(target=None, p="2d", subsample=1.5), r"--subsample 1.5 must be in \(0, 1\]"),
             (dict(target=None, p="2d", seed=-1), "--seed -1 must be an integer from 0"),
             (dict(target=None, p="2d", prefilter=tmp_path / "nothing"), "no subset uid file"),
             (dict(target=str(tmp_path / "t.npy"), p="2", iterations=5), "use them with --p 2d, not --p 2"),
             (dict(target=str(tmp_path / "t.npy"), p="inf", prefilter=tmp_path), "use them with --p 2d, not --p inf")]
    for kwargs, message in cases:
        with pytest.raises(CurateError, match=message):
            run_normsim(emb, out, **kwargs)
    assert not out.exists()


def test_cli_normsim(tmp_path, monkeypatch, capsys):
    from curate import cli

    emb = make_embedding_dir(tmp_path / "emb", [5, 3], dim=4, seed=1)
    np.save(tmp_path / "t.npy", np.eye(4, dtype=np.float32))
    monkeypatch.setattr(sys, "argv", ["curate", "normsim", str(emb), "--target", str(tmp_path / "t.npy"), "--p", "2",
                                      "--out", str(tmp_path / "n.parquet")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    assert "8 rows" in capsys.readouterr().err
    np.testing.assert_allclose(pq.read_table(tmp_path / "n.parquet").column("normsim_2").to_numpy(), 1.0, atol=2e-3)
    monkeypatch.setattr(sys, "argv", ["curate", "normsim", str(emb), "--p", "inf", "--out", str(tmp_path / "x.parquet")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs a target" in err and "Traceback" not in err


def test_cli_normsim_2d_with_its_schedule_then_filter_keeps_the_subset(tmp_path, monkeypatch, capsys):
    from curate import cli
    from curate.io.uids import read_uid_npy, write_uid_npy

    def run(*args) -> int:
        monkeypatch.setattr(sys, "argv", ["curate", *map(str, args)])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        return exit_info.value.code or 0

    emb = make_embedding_dir(tmp_path / "emb", [120, 80], dim=6, seed=3)
    pool = EmbeddingPool(emb)
    uids = pool.column("uid").tolist()
    candidates = np.random.default_rng(3).random(200) < 0.7
    write_uid_npy([u for u, c in zip(uids, candidates) if c], tmp_path / "pre.npy")
    out = tmp_path / "n.parquet"
    assert run("normsim", emb, "--target", "none", "--p", "2d", "--iterations", 9, "--final-fraction", 0.25,
               "--subsample", 0.3, "--seed", 4, "--prefilter", tmp_path / "pre.npy", "--out", out,
               "--cache-dir", tmp_path / "c") == 0
    v = np.concatenate([c["image_embedding"] for _, c in pool.iter_chunks()])
    want = reference_vas_d(v, 9, 0.25, 0.3, 4, candidates)
    params = read_meta(out)["params"]
    assert (params["iterations"], params["subsample"], params["seed"], params["kept_rows"][0]) == (9, 0.3, 4,
                                                                                                   candidates.sum())
    assert run("filter", out, "--keep", "normsim_2d:0.25", "--out", tmp_path / "subset") == 0
    assert sorted(read_uid_npy(tmp_path / "subset" / "uids.npy")) == sorted(uids[i] for i in want[-1])
    capsys.readouterr()
    assert run("normsim", emb, "--target", str(tmp_path / "pre.npy"), "--p", "inf", "--seed", 1, "--out",
               tmp_path / "x.parquet") == 2
    err = capsys.readouterr().err
    assert "use them with --p 2d, not --p inf" in err and "Traceback" not in err


def test_fp16_conversion_is_exact_for_every_bit_pattern():
    from curate.io.tables import to_float32

    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).reshape(256, 256)
    want = every.astype(np.float32)
    got = to_float32(every, out=np.full((300, 256), 7.0, np.float32))
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(want)], want[~np.isnan(want)])


def test_prefetch_keeps_order_and_reraises():
    from curate.io.prefetch import prefetch

    assert list(prefetch(range(50))) == list(range(50))
    assert list(prefetch([])) == []

    def failing():
        yield 1
        raise OSError("disk gone")

    items = prefetch(failing())
    assert next(items) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(items)


def test_max_abs_scorer_reused_across_calls_of_any_size():
    from curate.metrics.normsim import MaxAbsInnerProduct

    rng = np.random.default_rng(3)
    target = random_unit(6, 5, rng)
    scorer = MaxAbsInnerProduct(target, tile_elements=18)  # 3 rows per tile
    for n in (7, 2, 11, 0, 3):
        v = random_unit(n, 5, rng) if n else np.empty((0, 5), np.float32)
        np.testing.assert_allclose(scorer(v), reference_normsim(v, target, float("inf")), atol=1e-6)


@pytest.mark.parametrize("target_rows", [3, 9])  # below D: the direct V Xᵀ route; above: the second moment
def test_stage_blocks_from_tables_and_cache_match_reference(tmp_path, monkeypatch, target_rows):
    """Many blocks per file (shared out to worker threads), both sources."""
    import curate.io.tables as tables
    import curate.stages.normsim.common as stage

    monkeypatch.setattr(tables, "READ_BATCH_ROWS", 4)
    monkeypatch.setattr(stage, "READ_BATCH_ROWS", 4)
    monkeypatch.setattr(stage, "CPU_BLOCK_ROWS", 4)
    emb = make_embedding_dir(tmp_path / "emb", [11, 9, 15], dim=6, seed=16)
    target = random_unit(target_rows, 6, np.random.default_rng(17))
    np.save(tmp_path / "target.npy", target)
    pool = EmbeddingPool(emb)
    v = np.concatenate([c["image_embedding"] for _, c in pool.iter_chunks()])
    pool.matrix("image_embedding", tmp_path / "cache")
    for p in ("inf", "2"):
        want = reference_normsim(v, target, float(p))
        for cache in (None, tmp_path / "cache"):
            result = run_normsim(emb, tmp_path / "out.parquet", target=str(tmp_path / "target.npy"), p=p,
                                 cache_dir=cache)
            got = pq.read_table(tmp_path / "out.parquet").column(f"normsim_{p}").to_numpy()
            np.testing.assert_allclose(got, want, atol=1e-5)
            if p == "2":
                assert result.params["route"] == ("direct" if target_rows < 6 else "second moment")


@pytest.mark.parametrize("source", ["tables", "cache"])
def test_scoring_threads_same_bits_for_any_thread_count(tmp_path, source):
    """The CPU products run one BLAS thread per block, so 1, 2 or 5 worker threads (and the pending form,
    sliced table by table as the table writer does) give identical bits, equal to the plain loops."""
    from curate.metrics.normsim import MaxAbsInnerProduct, QuadraticForm
    from curate.stages.normsim.common import score_rows, table_starts

    emb = make_embedding_dir(tmp_path / "emb", [37, 5, 60], dim=8, seed=21)
    pool = EmbeddingPool(emb)
    cache = None
    if source == "cache":
        cache = tmp_path / "cache"
        pool.matrix("image_embedding", cache)
    v = np.concatenate([c["image_embedding"] for _, c in pool.iter_chunks()]).astype(np.float32)
    target = random_unit(11, 8, np.random.default_rng(22))
    for p, scorer in (("inf", MaxAbsInnerProduct(target, tile_elements=33)), ("2", QuadraticForm(second_moment(target)))):
        runs = [score_rows(pool, scorer, cache, 0, pool.n_rows, 6, threads=t) for t in (1, 2, 5)]
        starts = table_starts(pool)
        with score_rows(pool, scorer, cache, 0, pool.n_rows, 6, threads=2, pending=True) as scoring:
            runs.append(np.concatenate([scoring[a:b] for a, b in zip(starts[:-1], starts[1:])]))
            runs.append(scoring.result())
        for run in runs[1:]:
            np.testing.assert_array_equal(run, runs[0])
        np.testing.assert_allclose(runs[0], reference_normsim(v, target, float(p)), atol=1e-5)
        # a span of whole tables (a map task) gives the same rows
        np.testing.assert_array_equal(score_rows(pool, scorer, cache, starts[1], starts[3], 6, threads=2),
                                      runs[0][starts[1]:])


def test_scoring_threads_raise_a_worker_error_and_restore_thread_settings(tmp_path):
    from curate.run.threads import blas_thread_count
    from curate.stages.normsim.common import score_rows

    import torch

    emb = make_embedding_dir(tmp_path / "emb", [40, 40], dim=4, seed=5)
    pool = EmbeddingPool(emb)
    calls = []

    def scorer(rows):
        calls.append(len(rows))
        if len(calls) == 3:
            raise RuntimeError("scorer broke on block 3")
        return rows[:, 0].copy()

    before = (torch.get_num_threads(), blas_thread_count())
    with pytest.raises(RuntimeError, match="scorer broke on block 3"):
        score_rows(pool, scorer, None, 0, pool.n_rows, 4, threads=2)
    assert len(calls) < 20  # the workers stopped instead of scoring the other 17 blocks
    calls.clear()
    with pytest.raises(RuntimeError, match="scorer broke on block 3"):
        with score_rows(pool, scorer, None, 0, pool.n_rows, 4, threads=2, pending=True) as scoring:
            scoring[0:80]
    assert (torch.get_num_threads(), blas_thread_count()) == before
