"""Our output files read with the tools users already hold: DuckDB, Polars and pandas read whole output
directories as numbers; webdataset reads exported shards; DataComp's uid convention and fraction rule hold,
checked against formulas written from DataComp's own code (resharder.py, baselines/apply_filter.py)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import make_embedding_dir, run_curate, run_filter
from curate.io.tables import EmbeddingPool, vectors_to_numpy

duckdb = pytest.importorskip("duckdb")
pl = pytest.importorskip("polars")
pd = pytest.importorskip("pandas")
wds = pytest.importorskip("webdataset")

U16 = np.dtype("u8,u8")  # DataComp's subset dtype


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory):
    """Shards as img2dataset writes them by default: KEY.jpg/.txt/.json, the json without a `uid`; one
    sample without a caption (skipped by embed) and one with no json at all."""
    root = tmp_path_factory.mktemp("interop") / "shards"
    root.mkdir()
    n = 0
    for shard in range(3):
        members = []
        for i in range(12):
            key = f"{shard:05d}{i:04d}"
            members.append((f"{key}.jpg", png(n)))
            if not (shard == 1 and i == 3):
                members.append((f"{key}.txt", f"a picture number {n}".encode()))
            if not (shard == 2 and i == 5):
                members.append((f"{key}.json", json.dumps({"url": f"http://x/{n}.jpg", "key": key,
                                                           "status": "success"}).encode()))
            n += 1
        write_tar(root / f"{shard:05d}.tar", members)
    return root


@pytest.fixture(scope="module")
def run_dir(img2dataset_shards, tmp_path_factory):
    """embed -> score -> filter -> export through the CLI, with a random-init tiny teacher (asked by name)."""
    out = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    cap = _Capture()
    try:
        code, text = run_curate(mp, cap, "embed", img2dataset_shards, "--out", out / "emb", "--model", "curate-tiny",
                                "--pretrained", "none", "--device", "cpu", "--workers", "0", "--batch-size", "8")
        assert code == 0, text
        code, text = run_curate(mp, cap, "score", out / "emb", "--out", out / "scores.parquet", "--device", "cpu",
                                "--k", "2", "--batch-size", "8")
        assert code == 0, text
        code, text = run_curate(mp, cap, "filter", out / "scores.parquet", "--keep", "negclip:0.5",
                                "--out", out / "subset")
        assert code == 0, text
        code, text = run_curate(mp, cap, "export", img2dataset_shards, "--subset", out / "subset",
                                "--out", out / "export", "--shard-size", "7")
        assert code == 0, text
    finally:
        mp.undo()
    return out


class _Capture:
    """capsys for a module-scoped fixture: run_curate only calls readouterr()."""

    def readouterr(self):
        class Result:
            out = err = ""
        return Result()


def test_duckdb_polars_and_pandas_read_the_embedding_directory_as_numbers(run_dir):
    emb = run_dir / "emb"
    assert (emb / "_errors").is_dir() and (emb / "_markers").is_dir()  # side records exist, beside the tables
    pool = EmbeddingPool(emb)
    want = pool.matrix("image_embedding").astype(np.float32)
    assert pool.n_rows == 35  # 36 samples, one without a caption skipped

    assert duckdb.sql(f"SELECT count(*) FROM '{emb}/*.parquet'").fetchall() == [(35,)]
    rows = duckdb.sql(f"SELECT image_embedding::FLOAT[] AS v FROM '{emb}/*.parquet'").fetchall()
    duck = np.array([r[0] for r in rows], dtype=np.float32)
    assert duck.shape == want.shape
    assert np.array_equal(np.sort(duck, axis=0), np.sort(want, axis=0))  # same numbers (DuckDB may reorder)

    frame = pl.scan_parquet(f"{emb}/*.parquet").collect()
    assert frame.height == 35 and frame.schema["image_embedding"].inner.is_float()
    np.testing.assert_array_equal(frame["image_embedding"].to_numpy().astype(np.float32), want)

    df = pd.read_parquet(emb)  # pyarrow's dataset reader skips `_`-prefixed folders
    assert len(df) == 35
    np.testing.assert_array_equal(np.stack(df["image_embedding"].to_numpy()).astype(np.float32), want)


def test_a_table_written_back_by_duckdb_or_polars_still_reads_as_a_pool(run_dir, tmp_path):
    emb = run_dir / "emb"
    first = sorted(emb.glob("*.parquet"))[0]
    meta = pq.read_schema(first).metadata
    pl.read_parquet(first).write_parquet(tmp_path / "polars.parquet")
    duckdb.sql(f"COPY (SELECT * FROM '{first}') TO '{tmp_path / 'duck.parquet'}' (FORMAT parquet)")
    want = vectors_to_numpy(pq.read_table(first).column("text_embedding"))
    for name in ("polars.parquet", "duck.parquet"):
        table = pq.read_table(tmp_path / name)
        np.testing.assert_array_equal(vectors_to_numpy(table.column("text_embedding")), want)
        back = tmp_path / name.replace(".parquet", "")
        back.mkdir()
        pq.write_table(table.replace_schema_metadata(meta), back / "t.parquet")
        np.testing.assert_array_equal(EmbeddingPool(back).matrix("text_embedding").astype(np.float32), want)


def test_score_tables_and_the_subset_read_in_every_tool(run_dir):
    scores, kept = run_dir / "scores.parquet", run_dir / "subset" / "kept.parquet"
    for path, rows in ((scores, 35), (kept, 18)):  # ceil(0.5 x 35)
        assert duckdb.sql(f"SELECT count(*) FROM '{path}'").fetchall() == [(rows,)]
        assert pl.read_parquet(path).height == rows
        assert len(pd.read_parquet(path)) == rows
    frame = pd.read_parquet(scores)
    assert frame["negclip"].dtype == np.float32 and frame["uid"].str.fullmatch("[0-9a-f]{32}").all()


def test_uids_npy_is_datacomps_sorted_u8_u8_layout(run_dir):
    pairs = np.load(run_dir / "subset" / "uids.npy")
    assert pairs.dtype == U16 and len(pairs) == 18
    assert (np.sort(pairs) == pairs).all()
    # DataComp (baselines/utils.py): high = int(uid[:16], 16), low = int(uid[16:], 16)
    uids = pd.read_parquet(run_dir / "subset" / "kept.parquet")["uid"]
    want = np.array(sorted((int(u[:16], 16), int(u[16:], 16)) for u in uids), dtype=U16)
    assert np.array_equal(pairs, want)


def resharder_lookup(json_bytes: bytes, subset: np.ndarray) -> int:
    """DataComp's resharder.py, process_example: the uid from the sample's json, divmod'ed into (high, low),
    counted in the subset by searchsorted left/right."""
    key_str = json.loads(json_bytes).get("uid")
    key_u16 = np.array([divmod(int(key_str, 16), 2 ** 64)], U16)[0]
    return int(np.searchsorted(subset, key_u16, "right") - np.searchsorted(subset, key_u16, "left"))


def test_exported_shards_read_in_webdataset_and_datacomps_resharder_finds_every_uid(run_dir):
    export = run_dir / "export"
    subset = np.load(run_dir / "subset" / "uids.npy")
    sizes = json.loads((export / "sizes.json").read_text())
    tars = sorted(export.glob("*.tar"))
    assert sorted(sizes) == [t.name for t in tars] and sum(sizes.values()) == 18
    samples = list(wds.WebDataset([str(t) for t in tars], shardshuffle=False))
    assert len(samples) == 18
    for sample in samples:
        assert {"jpg", "txt", "json"} <= set(sample)
        assert resharder_lookup(sample["json"], subset) == 1  # the input json had no uid; the export wrote it
    per_tar = [sum(1 for _ in wds.WebDataset(str(t), shardshuffle=False)) for t in tars]
    assert per_tar == [sizes[t.name] for t in tars]


def test_the_input_shards_without_uids_are_what_the_summary_warns_about(run_dir, img2dataset_shards):
    meta = [json.loads(m) for m in pq.read_table(run_dir / "emb" / "00000.parquet").column("json").to_pylist()]
    assert all("uid" not in m for m in meta)
    marker = json.loads((run_dir / "emb" / "_markers" / "embed" / "00000.done").read_text())
    assert marker["content_uids"] == 12


# ---------------------------------------------------------------- DataComp's fraction rule

def datacomp_keep(values: np.ndarray, fraction: float) -> np.ndarray:
    """baselines/apply_filter.py: n = int(len(df) * fraction); threshold = -np.sort(-df[key].values)[n];
    the subset is df[df[key] >= threshold]."""
    n = int(len(values) * fraction)
    threshold = -np.sort(-values)[n]
    return values >= threshold


def write_pool_scores(path, values: np.ndarray, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    uids = [rng.bytes(16).hex() for _ in range(len(values))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": uids, "clip_l14_similarity_score": pa.array(values, pa.float32())}), path,
                   row_group_size=97)
    return uids


def test_hand_case_0_3_of_400_keeps_121_with_datacomps_rule_and_120_with_ours(tmp_path):
    values = np.linspace(0, 1, 400).astype(np.float32)
    write_pool_scores(tmp_path / "s.parquet", values)
    assert run_filter([tmp_path / "s.parquet"], tmp_path / "ours", keep=["clip_l14_similarity_score:0.3"]).kept == 120
    result = run_filter([tmp_path / "s.parquet"], tmp_path / "dc", keep=["clip_l14_similarity_score:0.3"],
                         fraction_rule="datacomp")
    assert result.kept == 121 == int(datacomp_keep(values, 0.3).sum())


@pytest.mark.parametrize("fraction", [0.07, 0.1, 0.3, 0.5, 0.97])
@pytest.mark.parametrize("distributed", [False, True])
def test_datacomp_rule_reproduces_apply_filters_subset(tmp_path, fraction, distributed):
    rng = np.random.default_rng(int(fraction * 100))
    values = rng.integers(0, 60, 1000).astype(np.float32) / 60  # many ties
    values[rng.choice(1000, 25, replace=False)] = np.nan  # never kept, as `>= threshold` is False for NaN
    uids = write_pool_scores(tmp_path / "s.parquet", values)
    options = {"tasks": 4} if distributed else {}
    run_filter([tmp_path / "s.parquet"], tmp_path / "dc", keep=[f"clip_l14_similarity_score:{fraction}"],
                fraction_rule="datacomp", **options)
    keep = datacomp_keep(values, fraction)
    want = np.array(sorted((int(u[:16], 16), int(u[16:], 16)) for u, k in zip(uids, keep) if k), dtype=U16)
    assert np.array_equal(np.load(tmp_path / "dc" / "uids.npy"), want)


def test_where_datacomps_formula_would_keep_nothing_the_rule_is_an_error(tmp_path):
    values = np.arange(100, dtype=np.float32)
    values[:5] = np.nan  # int(0.99 x 100) = 99 lands on a NaN: `>= NaN` keeps no row at all
    assert datacomp_keep(values, 0.99).sum() == 0
    write_pool_scores(tmp_path / "s.parquet", values)
    with pytest.raises(Exception, match=r"int\(0.99 x 100\) \+ 1 = 100 \(DataComp's rule\).* only 95 rows"):
        run_filter([tmp_path / "s.parquet"], tmp_path / "dc", keep=["clip_l14_similarity_score:0.99"],
                    fraction_rule="datacomp")


def test_the_cli_takes_a_shell_glob_of_datacomp_metadata_parts(tmp_path, monkeypatch, capsys):
    values = np.random.default_rng(3).random(300).astype(np.float32)
    meta = tmp_path / "metadata"
    for part in range(3):
        write_pool_scores(meta / f"{part:08d}.parquet", values[part * 100:(part + 1) * 100], seed=part)
    files = sorted(meta.glob("*.parquet"))  # what the shell passes for metadata/*.parquet
    code, text = run_curate(monkeypatch, capsys, "filter", *files, "--keep", "clip_l14_similarity_score:0.3",
                            "--fraction-rule", "datacomp", "--out", tmp_path / "glob")
    assert code == 0, text
    code, text = run_curate(monkeypatch, capsys, "filter", meta, "--keep", "clip_l14_similarity_score:0.3",
                            "--fraction-rule", "datacomp", "--out", tmp_path / "dir")
    assert code == 0, text
    assert np.load(tmp_path / "glob" / "uids.npy").tobytes() == np.load(tmp_path / "dir" / "uids.npy").tobytes()
    assert len(np.load(tmp_path / "glob" / "uids.npy")) == int(datacomp_keep(values, 0.3).sum()) == 91


def test_make_embedding_dir_tables_read_in_duckdb_too(tmp_path):
    emb = make_embedding_dir(tmp_path / "emb", [5, 3], dim=4, seed=0)
    assert duckdb.sql(f"SELECT count(*), min(len(text_embedding)) FROM '{emb}/*.parquet'").fetchall() == [(8, 4)]
