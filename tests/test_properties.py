"""Property tests (hypothesis) of the robustness promises, beyond the metric-level ones that already exist:

* tests/metrics/test_clipscore_negclip.py: negclip <= 0 for the metric function;
* tests/stages/test_filter.py: exact filter sizes for any fraction, one sequential step == independent, uid halves;
* tests/stages/test_normsim.py: NormSim_inf <= NormSim_2 <= sqrt(M) NormSim_inf for the metric functions.

Here the same laws are checked through the stages and their files (pool split over any number of tables,
fp16 storage, joins, DataComp's uid file), and the dirty-data promises are fuzzed: a damaged or truncated
tar never raises and never loses a sample the damage did not touch, any image bytes decode or give a
SampleError, any caption bytes give a string, and no member name escapes the export directory.
"""

from __future__ import annotations

import io
import math
import tarfile
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from curate.io.shards import RawSample, SampleError, iter_shard, load_rgb, raw_caption
from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic
from curate.io.uids import read_uid_npy, write_uid_npy
from conftest import record_robustness

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXAMPLES: dict[str, int] = {}


def count(name: str) -> None:
    EXAMPLES[name] = EXAMPLES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _record_examples(request):
    yield
    record_robustness(request.config, "test_properties", {"examples": sum(EXAMPLES.values()),
                                                                   "per_property": EXAMPLES})


def unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_pool(root: Path, image: np.ndarray, text: np.ndarray, splits: list[int], logit_scale: float = 100.0,
               uids: list[str] | None = None) -> Path:
    """One embedding directory, rows split over len(splits) tables in pool order."""
    n, d = image.shape
    uids = uids or [f"{i:032x}" for i in range(n)]
    teacher = TeacherInfo("prop", "none", d, logit_scale)
    bounds = np.cumsum([0] + splits)
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = build_embedding_table(uids[a:b], [str(i) for i in range(a, b)], ["c"] * (b - a), image[a:b], text[a:b])
        write_table_atomic(table, root / f"part-{f:04d}.parquet", meta={"teacher": teacher.to_dict()})
    return root


def random_splits(draw_sizes: list[int], n: int) -> list[int]:
    """Cut n rows into consecutive tables at the given (sorted, deduplicated) positions."""
    cuts = sorted({c % (n + 1) for c in draw_sizes})
    bounds = [0] + cuts + [n]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


# ---------------------------------------------------------------- uid files

@settings(max_examples=40, **SETTINGS)
@given(values=st.lists(st.one_of(st.integers(0, 2**128 - 1), st.sampled_from([0, 2**64 - 1, 2**64, 2**128 - 1])),
                       max_size=40))
def test_uid_npy_file_round_trips_in_datacomp_layout(values):
    """write_uid_npy -> file -> read_uid_npy and export's subset index give back exactly the uids."""
    from curate.io.uids import load_subset
    from curate.stages.export.common import SubsetIndex

    count("uid-npy-round-trip")
    uids = [f"{v:032x}" for v in values]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "uids.npy"
        assert write_uid_npy(uids, path) == len(uids)
        raw = np.load(path, allow_pickle=False)
        assert raw.dtype == np.dtype("u8,u8") and raw.ndim == 1
        # DataComp's own split, by hand: high 64 bits then low 64 bits, sorted
        assert [(int(h), int(lo)) for h, lo in raw.tolist()] == sorted((v >> 64, v & (2**64 - 1)) for v in values)
        assert read_uid_npy(path) == sorted(uids)
        index = SubsetIndex(load_subset(path))
        assert len(index) == len(set(uids))
        assert all(index.position(u) >= 0 for u in uids)
        outsider = next(f"{v:032x}" for v in range(2**10) if f"{v:032x}" not in set(uids))
        assert index.position(outsider) == -1


# ---------------------------------------------------------------- scores through the stages

@settings(max_examples=12, **SETTINGS)
@given(n=st.integers(1, 40), d=st.integers(2, 8), cuts=st.lists(st.integers(0, 40), max_size=4),
       batch_size=st.integers(1, 50), k=st.integers(1, 3), logit_scale=st.floats(1.0, 100.0),
       seed=st.integers(0, 2**16))
def test_score_stage_negclip_is_never_positive_and_ignores_how_the_pool_is_split(n, d, cuts, batch_size, k,
                                                                                  logit_scale, seed):
    from conftest import run_score

    count("score-stage-negclip")
    rng = np.random.default_rng(seed)
    image, text = unit_rows(rng, n, d), unit_rows(rng, n, d)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = write_pool(tmp / "one", image, text, [n], logit_scale)
        many = write_pool(tmp / "many", image, text, random_splits(cuts, n), logit_scale)
        kw = dict(k=k, batch_size=batch_size, seed=seed, device="cpu")
        run_score(one, tmp / "one.parquet", metrics="clipscore,negclip", **kw)
        run_score(many, tmp / "many.parquet", metrics="clipscore,negclip", **kw)
        a, b = pq.read_table(tmp / "one.parquet"), pq.read_table(tmp / "many.parquet")
    negclip = np.asarray(a.column("negclip"))
    assert (negclip <= 1e-4).all()  # each LSE holds s_ii/τ itself (fp16 storage, float32 output)
    assert np.all(np.abs(np.asarray(a.column("clipscore"))) <= 1 + 1e-3)
    # the partitions are of the whole pool in pool order, so the file layout cannot matter
    assert a.column("uid").to_pylist() == b.column("uid").to_pylist()
    assert np.array_equal(negclip, np.asarray(b.column("negclip")))


@settings(max_examples=12, **SETTINGS)
@given(n=st.integers(1, 30), m=st.integers(1, 12), d=st.integers(2, 8), cuts=st.lists(st.integers(0, 30), max_size=3),
       seed=st.integers(0, 2**16))
def test_normsim_stage_inf_le_2_le_sqrt_m_inf(n, m, d, cuts, seed):
    from conftest import run_normsim

    count("normsim-stage-inequality")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool = write_pool(tmp / "pool", unit_rows(rng, n, d), unit_rows(rng, n, d), random_splits(cuts, n))
        target = unit_rows(rng, m, d).astype(np.float32)
        np.save(tmp / "target.npy", target)
        run_normsim(pool, tmp / "inf.parquet", target=str(tmp / "target.npy"), p="inf")
        run_normsim(pool, tmp / "two.parquet", target=str(tmp / "target.npy"), p="2")
        inf = np.asarray(pq.read_table(tmp / "inf.parquet").column("normsim_inf"), np.float64)
        two = np.asarray(pq.read_table(tmp / "two.parquet").column("normsim_2"), np.float64)
    tolerance = 2e-3  # embeddings are stored as fp16
    assert (inf <= two + tolerance).all()
    assert (two <= math.sqrt(m) * inf + tolerance * math.sqrt(m)).all()


fractions = st.builds(lambda num, den: Fraction(min(num, den), den), st.integers(1, 1000), st.integers(1, 1000))


@settings(max_examples=15, **SETTINGS)
@given(n=st.integers(1, 120), fraction=fractions, cuts=st.lists(st.integers(0, 120), max_size=3),
       ties=st.booleans(), shuffle_seed=st.integers(0, 2**16))
def test_filter_stage_keeps_exactly_ceil_fraction_and_writes_matching_uid_files(n, fraction, cuts, ties,
                                                                                 shuffle_seed):
    """Through files: two score tables (a directory split anyhow, and one in another row order) joined on uid."""
    from conftest import run_filter

    count("filter-stage-exact")
    rng = np.random.default_rng(shuffle_seed)
    uids = [f"{int(x):032x}" for x in rng.choice(2**62, n, replace=False)]
    scores = rng.integers(0, 4, n).astype(np.float32) if ties else rng.standard_normal(n).astype(np.float32)
    other = rng.standard_normal(n).astype(np.float32)
    text = format(float(fraction), ".17g")
    expected = math.ceil(Fraction(text) * n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a").mkdir()
        bounds = np.cumsum([0] + random_splits(cuts, n))
        for f, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            pq.write_table(pa.table({"uid": uids[lo:hi], "negclip": scores[lo:hi]}), tmp / "a" / f"{f:03d}.parquet")
        order = rng.permutation(n)
        pq.write_table(pa.table({"uid": [uids[i] for i in order], "other": other[order]}), tmp / "b.parquet")
        result = run_filter([tmp / "a", tmp / "b.parquet"], tmp / "out", keep=[f"negclip:{text}"])
        kept = pq.read_table(tmp / "out" / "kept.parquet")
        from_npy = read_uid_npy(tmp / "out" / "uids.npy")
    assert result.kept == expected == kept.num_rows
    assert from_npy == sorted(kept.column("uid").to_pylist())
    kept_scores = np.asarray(kept.column("negclip"))
    dropped = np.setdiff1d(np.arange(n), [uids.index(u) for u in kept.column("uid").to_pylist()])
    if len(dropped) and len(kept_scores):
        assert kept_scores.min() >= scores[dropped].max()  # nothing dropped beats anything kept
    # the other table's metric travels with its uid
    by_uid = dict(zip(uids, other))
    assert np.array_equal(np.asarray(kept.column("other")), np.array([by_uid[u] for u in kept.column("uid").to_pylist()],
                                                                     np.float32))


# ---------------------------------------------------------------- dirty data fuzz

def small_tar(n_samples: int) -> tuple[bytes, dict[str, dict[str, bytes]], dict[str, tuple[int, int]], list[int]]:
    """A tar of n samples: (bytes, members per key, byte region per key, header offsets)."""
    rng = np.random.default_rng(n_samples)
    samples = {f"s{i:02d}": {"png": rng.integers(1, 256, int(rng.integers(10, 1500)), np.uint8).tobytes(),
                             "txt": f"caption {i}".encode()} for i in range(n_samples)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    regions, headers = {}, []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar.getmembers():
            key = info.name.split(".")[0]
            end = info.offset_data + -(-info.size // 512) * 512
            start = regions.get(key, (info.offset, 0))[0]
            regions[key] = (start, end)
            headers.append(info.offset)
    return data, samples, regions, headers


def read_shard(data: bytes) -> tuple[list[RawSample], list[tuple[str, str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.tar"
        path.write_bytes(data)
        problems: list[tuple[str, str]] = []
        samples = list(iter_shard(str(path), lambda key, reason: problems.append((key, reason))))
    return samples, problems


@settings(max_examples=80, **SETTINGS)
@given(n=st.integers(1, 8), start=st.floats(0, 1), length=st.integers(1, 3000),
       fill=st.one_of(st.just(b"\0"), st.binary(min_size=1, max_size=64)))
def test_overwritten_bytes_never_raise_and_untouched_samples_survive(n, start, length, fill):
    count("tar-overwrite")
    data, samples, regions, headers = small_tar(n)
    a = int(start * len(data))
    b = min(len(data), a + length)
    damaged = bytearray(data)
    damaged[a:b] = (fill * (b - a))[: b - a]
    damaged = bytes(damaged)
    got, problems = read_shard(damaged)  # must not raise
    yielded = {}
    for s in got:
        yielded.setdefault(s.key, s.members)
    for key, (lo, hi) in regions.items():
        if hi <= a or lo >= b:  # the damage did not touch this sample's headers or data
            assert yielded.get(key) == samples[key], (key, a, b, problems)
    assert set(yielded) <= set(samples)
    # a changed header (outside its checksum field's padding) or end block is always reported
    members_end = max(hi for _, hi in regions.values())
    changed = [i for i in range(a, b) if damaged[i] != data[i]]
    header_hit = any(h <= i < h + 512 and not 148 <= i - h < 156 for i in changed for h in headers)
    end_hit = any(i >= members_end for i in changed)
    # zeros over a last member, header and all, look exactly like the archive's end: undetectable
    first_hit = min((h for h in headers for i in changed if h <= i < h + 512), default=members_end)
    looks_like_the_end = not any(damaged[min(first_hit, a):])
    if (header_hit or end_hit) and not looks_like_the_end:
        assert problems, (a, b)


@settings(max_examples=60, **SETTINGS)
@given(n=st.integers(1, 8), cut=st.floats(0, 1))
def test_truncated_tars_keep_every_sample_before_the_cut(n, cut):
    count("tar-truncate")
    data, samples, regions, _ = small_tar(n)
    at = int(cut * len(data))
    got, problems = read_shard(data[:at])
    yielded = {s.key: s.members for s in got}
    complete = sorted(k for k, (_, hi) in regions.items() if hi <= at)
    # every sample that ended before the cut is kept, except perhaps the very last one (its sample may go on)
    for key in complete[:-1]:
        assert yielded.get(key) == samples[key]
    assert all(yielded[k] == samples[k] for k in yielded)
    members_end = max(hi for _, hi in regions.values())
    if at < members_end + 1024:
        assert problems  # the cut is always reported unless it fell in the spare zero padding


@settings(max_examples=25, **SETTINGS)
@given(n=st.integers(2, 6), blocks=st.integers(1, 4), where=st.integers(0, 10), zeros=st.booleans())
def test_block_aligned_junk_between_members_is_skipped_and_reported(n, blocks, where, zeros):
    count("tar-insert-junk")
    data, samples, regions, headers = small_tar(n)
    at = headers[where % len(headers)]
    junk = bytes(512 * blocks) if zeros else np.random.default_rng(where).integers(1, 256, 512 * blocks, np.uint8).tobytes()
    got, problems = read_shard(data[:at] + junk + data[at:])
    yielded = {}
    for s in got:
        yielded.setdefault(s.key, s.members)
    assert yielded == samples  # tar headers are block-aligned: reading resumes at the next one
    assert problems


SEED_IMAGES = {
    "png": lambda: _save(Image.new("RGB", (7, 5), (1, 2, 3)), "PNG"),
    "jpeg": lambda: _save(Image.new("RGB", (9, 9), (200, 10, 10)), "JPEG"),
    "gif": lambda: _save(Image.new("P", (6, 6)), "GIF"),
    "webp": lambda: _save(Image.new("RGB", (8, 8), (0, 90, 0)), "WEBP"),
    "tiff": lambda: _save(Image.new("CMYK", (4, 4)), "TIFF"),
}


def _save(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@settings(max_examples=100, **SETTINGS)
@given(kind=st.sampled_from(sorted(SEED_IMAGES)), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                  max_size=6),
       cut=st.one_of(st.none(), st.floats(0, 1)), junk=st.binary(max_size=64))
def test_any_image_bytes_decode_to_rgb_or_a_sample_error(kind, flips, cut, junk):
    count("image-fuzz")
    data = bytearray(SEED_IMAGES[kind]())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    for payload in (bytes(data), junk):
        try:
            image = load_rgb(payload, draft_size=64)
        except SampleError as exc:
            assert str(exc)
        else:
            assert image.mode == "RGB" and image.width >= 1 and image.height >= 1


@settings(max_examples=60, **SETTINGS)
@given(payload=st.binary(max_size=200))
def test_any_caption_bytes_give_a_string_and_a_note_exactly_when_not_utf8(payload):
    count("caption-fuzz")
    caption, notes = raw_caption(RawSample("k", {"txt": payload}, "s"))
    try:
        payload.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    assert isinstance(caption, str)
    assert (notes == []) == valid
    assert caption == payload.decode("utf-8", errors="replace")


member_names = st.lists(st.sampled_from(list("ab/.\\-_~ é") + ["..", "../", "/abs/", "\u202e", "__"]), min_size=1,
                        max_size=8).map("".join)


@settings(max_examples=25, **SETTINGS)
@given(keys=st.lists(member_names, min_size=1, max_size=5, unique=True),
       ext=st.sampled_from(["txt", "TXT", "json", "tar.gz", "x/../../y", "..", "a b"]))
def test_export_never_writes_outside_its_directory_whatever_the_member_names(keys, ext):
    from curate.io.shards import expand_shards, sample_uid
    from conftest import run_export

    count("export-names")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for i, key in enumerate(keys):
                for suffix, data in (("png", f"image {i}".encode()), (ext, f"caption {i}".encode()),
                                     ("txt", f"caption {i}".encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (tmp / "in" / "00000.tar").write_bytes(buf.getvalue())
        uids = [u for url in expand_shards(str(tmp / "in")) for raw in iter_shard(url, lambda k, r: None)
                if (u := sample_uid(raw))]
        write_uid_npy(sorted(set(uids)), tmp / "uids.npy")
        before = set(tmp.rglob("*"))
        report = run_export(str(tmp / "in"), tmp / "uids.npy", tmp / "out", shard_size=2)
        created = set(tmp.rglob("*")) - before
        assert all(p == tmp / "out" or (tmp / "out") in p.parents for p in created), created
        assert report.written == len(set(uids))
        for path in (tmp / "out").glob("*.tar"):
            with tarfile.open(path) as tar:
                for info in tar.getmembers():
                    assert info.isreg() and "/" not in info.name and not info.name.startswith(".")
