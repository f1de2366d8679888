"""The bad-input suite: dirty tars, images, captions, tables, parameters and checkpoints.

Promises checked here, each through the real CLI:
* a bad sample is skipped and recorded (`_errors/<stem>.parquet`: key, reason, kind), a bad shard is recorded
  and named in the run summary, and every good sample around the damage is kept;
* bad tables and parameters give a one-line error naming the file and what to do (exit 2), never a traceback;
* member names never become output paths; checkpoints are only read with torch.load(weights_only=True);
* `curate embed` opens no network connection.

One `curate embed` subprocess embeds the whole dirty corpus (one shard per kind of damage) with decode
workers and with sockets blocked; the tests then check each shard's outcome. The per-case numbers (cases
tried, crashes, good samples lost) are kept in pytest's cache under `curate/robustness/` for the README.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import NO_NETWORK_SITECUSTOMIZE, make_embedding_dir, record_robustness, run_curate
from curate.io.shards import MAX_IMAGE_PIXELS, RawSample
from curate.io.tables import TeacherInfo, build_embedding_table, vectors_to_numpy, write_table_atomic
from curate.io.uids import content_uid, read_uid_npy, write_uid_npy

REPO = Path(__file__).resolve().parents[1]
CURATE_BIN = Path(sys.executable).parent / "curate"


# ---------------------------------------------------------------- the tally for the README

@dataclass
class Tally:
    cases: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    good_expected: int = 0
    good_kept: int = 0

    def case(self, name: str, output: str = "", good_expected: int = 0, good_kept: int = 0) -> None:
        """One bad input tried: a traceback in its output is a crash; good samples must all be kept."""
        self.cases.append(name)
        if "Traceback (most recent call last)" in output:
            self.crashes.append(name)
        self.good_expected += good_expected
        self.good_kept += good_kept


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def _record_tally(request):
    yield
    kinds: dict[str, int] = {}
    for name in TALLY.cases:
        kinds[name.split("/")[0]] = kinds.get(name.split("/")[0], 0) + 1
    record_robustness(request.config, "test_dirty", {
        "cases": len(TALLY.cases), "by_kind": kinds, "crashes": len(TALLY.crashes), "crash_cases": TALLY.crashes,
        "good_samples_expected": TALLY.good_expected, "good_samples_lost": TALLY.good_expected - TALLY.good_kept})


def run_cli(monkeypatch, capsys, *args, case: str | None = None) -> tuple[int, str]:
    """`curate ARGS` through cli.main() in this process (conftest.run_curate), counted in the robustness tally."""
    code, text = run_curate(monkeypatch, capsys, *args)
    TALLY.case(case or " ".join(map(str, args[:1])), text)
    return code, text


def assert_one_line_error(code: int, text: str, *patterns: str) -> str:
    """Exit 2, no traceback, and exactly one `error:` line, matching every pattern (regex)."""
    assert "Traceback" not in text, text
    assert code == 2, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    for pattern in patterns:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------- building dirty shards

def image_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def scene(seed: int, size=(48, 48)) -> Image.Image:
    """Flat coloured rectangles on a coloured ground: JPEG-friendly, and distinct per seed for the teacher."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(4):
        x, y = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
        pixels[y:y + 12, x:x + 12] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


def good(key: str, seed: int, fmt: str = "PNG") -> list[tuple[str, bytes]]:
    ext = "jpg" if fmt == "JPEG" else "png"
    return [(f"{key}.{ext}", image_bytes(scene(seed), fmt)), (f"{key}.txt", f"a good caption number {seed}".encode())]


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, 0
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info


def tar_bytes(members: list) -> bytes:
    """members: (name, data) for files, or TarInfo objects for links and devices."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                name, data = m
                tar.addfile(member(name, data), io.BytesIO(data))
    return buf.getvalue()


def unterminated(members: list[tuple[str, bytes]]) -> bytes:
    """Tar members (header + data padded to 512) without the end-of-archive blocks, to append more to."""
    out = b""
    for name, data in members:
        out += member(name, data).tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return out


def header_offset(data: bytes, name: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return next(m.offset for m in tar.getmembers() if m.name == name)


@dataclass
class Case:
    """A dirty shard: its bytes, the keys that must be embedded (in order) and the problems that must be recorded."""

    name: str
    data: bytes
    kept: list[str]
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (key, reason regex, kind)


def cmyk_jpeg() -> bytes:
    return image_bytes(scene(101).convert("CMYK"), "JPEG", quality=95)


def bomb_png() -> bytes:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 64  # just over PIL's guard; a 1-bit PNG of one colour is tiny
    return image_bytes(Image.new("1", (side, side)))


def gradient16() -> Image.Image:
    ramp = (np.arange(48 * 48, dtype=np.uint32).reshape(48, 48) * 28).astype(np.uint16)
    return Image.fromarray(ramp)  # mode I;16


def translucent() -> Image.Image:
    img = scene(103).convert("RGBA")
    alpha = np.full((48, 48), 255, np.uint8)
    alpha[:, :24] = 60
    img.putalpha(Image.fromarray(alpha))
    return img


def palette_with_transparency() -> Image.Image:
    img = scene(104).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    img.info["transparency"] = int(np.asarray(img)[0, 0])
    return img


def wide_strip() -> Image.Image:
    rng = np.random.default_rng(105)
    return Image.fromarray(rng.integers(0, 256, (2, 20000, 3), dtype=np.uint8))


def dirty_cases() -> list[Case]:
    cases = []
    cases.append(Case("clean", tar_bytes(good("c0", 1) + good("c1", 2, "JPEG")), ["c0", "c1"]))

    base = tar_bytes([m for i in range(6) for m in good(f"g{i}", 10 + i)])
    damaged = bytearray(base)
    at = header_offset(base, "g3.png")
    damaged[at:at + 512] = np.random.default_rng(0).integers(1, 256, 512, dtype=np.uint8).tobytes()
    cases.append(Case("garbage_header", bytes(damaged), ["g0", "g1", "g2", "g4", "g5"],
                      [("g2", r"corrupt tar data .*skipped; reading resumed at member 'g3\.txt'", "skipped"),
                       ("g3", r"no image member", "skipped")]))

    base = tar_bytes([m for i in range(4) for m in good(f"t{i}", 20 + i)])
    cut = header_offset(base, "t2.png") + 512 + 100  # inside t2.png's data
    cases.append(Case("truncated", base[:cut], ["t0", "t1"],
                      [("t2", r"corrupt or truncated tar after key 't2'", "skipped")]))
    cases.append(Case("empty", b"", [], [("", r"empty file", "skipped")]))
    cases.append(Case("concatenated", tar_bytes(good("cat0", 24)) + tar_bytes(good("cat1", 25)), ["cat0", "cat1"],
                      [("cat0", r"zero bytes skipped before member 'cat1\.png' \(end blocks of a concatenated", "skipped")]))
    base = tar_bytes(good("y0", 26) + [("y0.json", b'{"a": 1}')] + good("y1", 27) + [("y1.json", b'{"a": 2}')]
                     + good("y2", 28))
    zeroed = bytearray(base)
    at = header_offset(base, "y1.json")
    zeroed[at:at + 1024] = bytes(1024)  # header and data block of y1.json, as a crashed writer can leave them
    cases.append(Case("zeroed_member", bytes(zeroed), ["y0", "y1", "y2"],
                      [("y1", r"1024 zero bytes skipped before member 'y2\.png'", "skipped")]))
    cases.append(Case("not_a_tar", np.random.default_rng(1).integers(0, 256, 5000, np.uint8).tobytes(), [],
                      [("", r"not a tar archive|invalid header|corrupt", "skipped")]))
    cases.append(Case("gzipped", gzip.compress(tar_bytes(good("z0", 30) + good("z1", 31)), mtime=0), ["z0", "z1"]))
    cases.append(Case("paths", tar_bytes(
        good("../escape", 40) + good("/abs/evil", 41) + good("a/../../up", 42) + good("p0", 43)),
        ["../escape", "/abs/evil", "a/../../up", "p0"]))
    cases.append(Case("links", tar_bytes(
        good("l0", 50)
        + [member("sym.png", kind=tarfile.SYMTYPE, linkname="/etc/passwd"),
           member("hard.png", kind=tarfile.LNKTYPE, linkname="l0.png"),
           member("dev.txt", kind=tarfile.CHRTYPE), member("fifo.png", kind=tarfile.FIFOTYPE)]
        + good("l1", 51)),
        ["l0", "l1"],
        [("sym.png", r"symlink", "skipped"), ("hard.png", r"hard link", "skipped"),
         ("dev.txt", r"device or special file", "skipped"), ("fifo.png", r"device or special file", "skipped")]))
    cases.append(Case("dup_keys", tar_bytes(
        good("k1", 60) + good("k2", 61) + [("k3.png", image_bytes(scene(62))), ("k3.txt", b"first"), ("k3.txt", b"second")]
        + [("k1.png", image_bytes(scene(63))), ("k1.txt", b"another sample reusing key k1")]  # new uid: kept
        + good("k2", 61)),  # same content, same uid: a repeat
        ["k1", "k2", "k3", "k1"],
        [("k3", r"duplicate member 'k3\.txt' in one sample; kept the first", "skipped"),
         ("k1", r"key 'k1' appears again", "note"), ("k2", r"duplicate uid within the shard", "skipped")]))
    cases.append(Case("images", tar_bytes(
        [("undecodable.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg"), ("undecodable.txt", b"broken")]
        + [("zero.png", b""), ("zero.txt", b"zero bytes")]
        + [("bomb.png", bomb_png()), ("bomb.txt", b"a decompression bomb")]
        + [("cmyk.jpg", cmyk_jpeg()), ("cmyk.txt", b"a cmyk jpeg")]
        + [("palette.png", image_bytes(palette_with_transparency())), ("palette.txt", b"palette with transparency")]
        + [("sixteen.png", image_bytes(gradient16())), ("sixteen.txt", b"a 16-bit grey ramp")]
        + [("alpha.png", image_bytes(translucent())), ("alpha.txt", b"half transparent")]
        + [("la.png", image_bytes(scene(106).convert("LA"))), ("la.txt", b"grey with alpha")]
        + [("wide.png", image_bytes(wide_strip())), ("wide.txt", b"twenty thousand by two")]
        + [("tall.png", image_bytes(Image.new("RGB", (1, 300_000), (10, 200, 30)))), ("tall.txt", b"one by 300k")]),
        ["cmyk", "palette", "sixteen", "alpha", "la", "wide", "tall"],
        [("undecodable", r"undecodable image", "skipped"), ("zero", r"image is empty \(0 bytes\)", "skipped"),
         ("bomb", r"decompression-bomb guard", "skipped")]))
    cases.append(Case("captions", tar_bytes(
        [("nocap.png", image_bytes(scene(70)))]
        + [("empty.png", image_bytes(scene(71))), ("empty.txt", b"")]
        + [("blank.png", image_bytes(scene(72))), ("blank.txt", b" \t\n  ")]
        + [("latin1.png", image_bytes(scene(73))), ("latin1.txt", "café crème".encode("latin-1"))]
        + [("huge.png", image_bytes(scene(74))), ("huge.txt", b"word " * 200_000)]
        + [("nul.png", image_bytes(scene(75))), ("nul.txt", b"a caption\x00with a NUL")]),
        ["latin1", "huge", "nul"],
        [("nocap", r"missing caption", "skipped"), ("empty", r"empty caption", "skipped"),
         ("blank", r"empty caption", "skipped"), ("latin1", r"not valid UTF-8; decoded with replacement", "note"),
         ("huge", r"caption \(1000000 chars\) fills the teacher's \d+-token context", "note")]))
    cases.append(Case("json", tar_bytes(
        good("j0", 80) + [("j0.json", b"{not json")]
        + good("j1", 81) + [("j1.json", json.dumps({"uid": "NOT-A-UID"}).encode())]
        + good("j2", 82) + [("j2.json", b"[1, 2, 3]")]
        + good("j3", 83) + [("j3.json", json.dumps({"uid": "ab" * 16}).encode())]),
        ["j0", "j1", "j2", "j3"],
        [("j0", r"invalid \.json", "note"), ("j1", r"not 32 lowercase hex; uid taken from content", "note"),
         ("j2", r"invalid \.json .*not an object", "note")]))
    oversized = member("o1.png", b"")
    oversized.size = 3 << 30  # the header claims 3 GiB; the data is not there
    cases.append(Case("oversized", unterminated(good("o0", 90)) + oversized.tobuf(tarfile.GNU_FORMAT), ["o0"],
                      [("o1.png", r"over the .*-byte limit per member", "skipped"),
                       ("o1", r"corrupt or truncated tar after key 'o1'", "skipped")]))
    return cases


CASES = dirty_cases()


@pytest.fixture(scope="module")
def dirty_run(tmp_path_factory):
    """`curate embed` (2 decode workers, sockets blocked) over one shard per dirty case."""
    root = tmp_path_factory.mktemp("dirty")
    shards = root / "shards"
    shards.mkdir()
    for case in CASES:
        (shards / f"{case.name}.tar").write_bytes(case.data)
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK_SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "CURATE_TEST_NET_LOG": str(root / "net.log"), "COLUMNS": "250", "NO_COLOR": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    before = {p for p in root.rglob("*")}
    started = time.perf_counter()
    proc = subprocess.run([str(CURATE_BIN), "embed", str(shards), "--out", str(root / "emb"), "--workers", "2",
                           "--batch-size", "4", "--device", "cpu", "--model", "curate-tiny", "--pretrained", "none"], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    seconds = time.perf_counter() - started
    created = {p for p in root.rglob("*")} - before
    return {"root": root, "shards": shards, "out": root / "emb", "proc": proc, "seconds": seconds,
            "created": created, "net_log": root / "net.log"}


def errors_of(out: Path, stem: str) -> list[dict]:
    path = out / "_errors" / f"{stem}.parquet"
    return pq.read_table(path).to_pylist() if path.exists() else []


def test_dirty_embed_run_exits_zero_without_traceback_or_network(dirty_run):
    proc = dirty_run["proc"]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "Exception ignored" not in output, output
    assert not dirty_run["net_log"].exists(), dirty_run["net_log"].read_text()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_dirty_shard_keeps_good_samples_and_records_problems(dirty_run, case):
    out, proc = dirty_run["out"], dirty_run["proc"]
    table = pq.read_table(out / f"{case.name}.parquet")
    keys = table.column("key").to_pylist()
    kept_good = sum(1 for k in case.kept if k in keys)
    TALLY.case(f"tar/{case.name}", proc.stdout + proc.stderr, good_expected=len(case.kept), good_kept=kept_good)
    assert keys == case.kept
    assert (out / "_markers" / "embed" / f"{case.name}.done").exists()
    errors = errors_of(out, case.name)
    for key, reason, kind in case.problems:
        assert any(e["key"] == key and re.search(reason, e["reason"]) and e["kind"] == kind for e in errors), \
            f"no record ({key!r}, {reason!r}, {kind}) in {errors}"
    expected_skips = sum(1 for p in case.problems if p[2] == "skipped")
    assert sum(e["kind"] == "skipped" for e in errors) == expected_skips, errors
    if case.problems:  # the run summary names every shard with a problem
        assert re.search(rf"\b{case.name}\b", proc.stderr + proc.stdout), proc.stderr
    else:
        assert errors == []


def test_summary_counts_match_the_records(dirty_run):
    out = dirty_run["out"]
    for case in CASES:
        marker = json.loads((out / "_markers" / "embed" / f"{case.name}.done").read_text())
        errors = errors_of(out, case.name)
        assert marker["embedded"] == len(case.kept)
        assert marker["skipped"] == sum(e["kind"] == "skipped" for e in errors)
        assert marker["notes"] == sum(e["kind"] == "note" for e in errors)


def test_member_names_never_become_output_paths(dirty_run):
    root, out = dirty_run["root"], dirty_run["out"]
    stems = {c.name for c in CASES}
    allowed = {out, out / "_markers", out / "_markers" / "embed", out / "_errors", root / "net.log"}
    for path in dirty_run["created"]:
        if path in allowed:
            continue
        rel = path.relative_to(out)  # raises if anything was written outside the output directory
        name = rel.name
        stem = name.removesuffix(".parquet").removesuffix(".done")
        assert stem in stems and len(rel.parts) in (1, 2, 3), rel
    assert not any("escape" in p.name or "evil" in p.name or p.name == "up" for p in root.rglob("*"))


def embed_rows(out: Path, stem: str) -> dict[str, np.ndarray]:
    table = pq.read_table(out / f"{stem}.parquet")
    image = vectors_to_numpy(table.column("image_embedding"))
    return dict(zip(table.column("key").to_pylist(), image))


@pytest.fixture(scope="module")
def teacher():
    from curate.models import load_teacher

    return load_teacher("curate-tiny", "none", device="cpu")  # seeded random init: the subprocess's weights


def reference_embedding(teacher, image: Image.Image) -> np.ndarray:
    with torch.no_grad():
        return teacher.encode_image(teacher.preprocess(image)[None])[0].numpy()


def composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def test_odd_image_modes_embed_like_their_rgb_conversion(dirty_run, teacher):
    rows = embed_rows(dirty_run["out"], "images")
    cmyk_decoded = Image.open(io.BytesIO(cmyk_jpeg()))
    assert cmyk_decoded.mode == "CMYK"
    sixteen = np.asarray(gradient16()).astype(np.float64)
    references = {
        "cmyk": cmyk_decoded.convert("RGB"),
        "palette": composite_on_white(palette_with_transparency()),
        "sixteen": Image.fromarray(np.round(sixteen / 65535 * 255).astype(np.uint8)).convert("RGB"),
        "alpha": composite_on_white(translucent()),
        "la": composite_on_white(scene(106).convert("LA")),
        "wide": wide_strip(),  # the full 20000 x 2 image through the teacher's own preprocess
    }
    for key, ref in references.items():
        cosine = float(rows[key] @ reference_embedding(teacher, ref))
        assert cosine > 0.998, f"{key}: cosine {cosine:.4f} to its RGB conversion"
    # and CMYK is not read as if it were RGB: far closer to the picture it was made from than to a channel swap
    original = scene(101)
    swapped = Image.fromarray(np.asarray(original)[..., ::-1].copy())
    assert rows["cmyk"] @ reference_embedding(teacher, original) > 0.98
    assert rows["cmyk"] @ reference_embedding(teacher, original) > rows["cmyk"] @ reference_embedding(teacher, swapped)
    # the (1 x 300000) strip is embedded like its central part, not resized to 64 x 19 million pixels
    tall = reference_embedding(teacher, Image.new("RGB", (1, 16), (10, 200, 30)))
    assert float(rows["tall"] @ tall) > 0.998


def test_extreme_aspect_images_are_fast_and_match_the_full_preprocess(teacher):
    from curate.stages.embed.tasks import crop_extreme_aspect

    strip = wide_strip()
    started = time.perf_counter()
    cropped = teacher.preprocess(crop_extreme_aspect(strip))
    fast = time.perf_counter() - started
    started = time.perf_counter()
    full = teacher.preprocess(strip)  # resizes to 640000 x 64 first
    slow = time.perf_counter() - started
    TALLY.case("image/aspect-crop")
    assert torch.allclose(cropped, full, atol=0.02), float((cropped - full).abs().max())
    assert fast < slow / 5, (fast, slow)
    assert crop_extreme_aspect(scene(1)) is not None and crop_extreme_aspect(scene(1)).size == (48, 48)


def test_captions_decode_with_replacement_and_are_stored_whole(dirty_run):
    table = pq.read_table(dirty_run["out"] / "captions.parquet")
    captions = dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    assert captions["latin1"] == "caf\ufffd cr\ufffdme"
    assert captions["huge"] == "word " * 200_000
    assert captions["nul"] == "a caption\x00with a NUL"
    uids = dict(zip(table.column("key").to_pylist(), table.column("uid").to_pylist()))
    assert uids["huge"] == content_uid(image_bytes(scene(74)), "word " * 200_000)


def test_a_megabyte_caption_is_tokenised_fast(teacher):
    from curate.stages.embed.tasks import ShardBatches

    huge = "word " * 200_000
    batches = ShardBatches([], teacher.preprocess, teacher.tokenizer, 4, teacher.context_length, None)
    problems: list = []
    pixels = teacher.preprocess(scene(1))
    started = time.perf_counter()
    batch = batches._batch("s", [("k", "u" * 32, huge, None, None, pixels)], problems)
    seconds = time.perf_counter() - started
    TALLY.case("caption/1MB-timing")
    assert seconds < 2.0, f"tokenising a 1 MB caption took {seconds:.1f} s"
    assert batch["tokens"].shape == (1, teacher.context_length)
    assert problems and "truncated" in problems[0][2]


def test_export_of_the_dirty_corpus_keeps_every_good_sample_inside_out(dirty_run, monkeypatch, capsys):
    out, root = dirty_run["out"], dirty_run["root"]
    uids = [u for case in CASES for u in pq.read_table(out / f"{case.name}.parquet").column("uid").to_pylist()]
    unknown = ["f" * 32, "0" * 31 + "1"]
    write_uid_npy(uids + unknown, root / "subset.npy")
    before = {p for p in root.rglob("*")}
    code, text = run_cli(monkeypatch, capsys, "export", dirty_run["shards"], "--subset", root / "subset.npy",
                         "--out", root / "export", "--shard-size", "7", case="export/dirty")
    assert code == 0 and "Traceback" not in text, text
    created = {p for p in root.rglob("*")} - before
    assert all(p == root / "export" or (root / "export") in p.parents for p in created), created
    names = []
    for tar_path in sorted((root / "export").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for info in tar.getmembers():
                assert info.isreg() and re.fullmatch(r"\d{9}\.[a-z0-9._-]+", info.name), info.name
                names.append(info.name)
    keys = sorted({n.split(".")[0] for n in names})
    TALLY.case("export/dirty-good-samples", text, good_expected=len(uids), good_kept=len(keys))
    assert len(keys) == len(uids)  # every good sample exported once
    missing = read_uid_npy(root / "export" / "missing_uids.npy")
    assert sorted(missing) == sorted(unknown)
    assert "2 subset uids were not found" in text
    # the path-like samples travel with their bytes under safe names
    escape_png = dict(good("../escape", 40))["../escape.png"]
    found = False
    for tar_path in sorted((root / "export").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            found |= any(tar.extractfile(m).read() == escape_png for m in tar.getmembers())
    assert found


def test_an_unreadable_shard_fails_after_retries_and_the_rest_finish(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(tar_bytes(good("a0", 1)))
    (shards / "b.tar").mkdir()  # matched by the shard glob, but cannot be opened as a file
    (shards / "c.tar").write_bytes(tar_bytes(good("c0", 2)))
    out = tmp_path / "emb"
    code, text = run_cli(monkeypatch, capsys, "embed", shards, "--out", out, "--workers", "0", "--device", "cpu",
                         "--model", "curate-tiny", "--pretrained", "none",
                         "--retries", "1", case="shard/unreadable")
    line = assert_one_line_error(code, text, r"shard b", r"cannot open shard", r"rerun")
    assert "IsADirectoryError" in line
    assert re.search(r"shard b .*FAILED after 2 attempt", text), text  # named in the summary table too
    done = {p.stem for p in (out / "_markers" / "embed").glob("*.done")}
    assert done == {"a", "c"} and not (out / "b.parquet").exists()
    # --fail-fast stops at the first failed shard: c is not embedded
    (out / "_markers" / "embed" / "c.done").unlink()
    (out / "c.parquet").unlink()
    code, text = run_cli(monkeypatch, capsys, "embed", shards, "--out", out, "--workers", "0", "--device", "cpu",
                         "--model", "curate-tiny", "--pretrained", "none",
                         "--retries", "0", "--fail-fast", case="shard/unreadable-fail-fast")
    assert_one_line_error(code, text, r"shard b")
    assert not (out / "c.parquet").exists()
    # once the shard is readable, a rerun does only what is missing
    (shards / "b.tar").rmdir()
    (shards / "b.tar").write_bytes(tar_bytes(good("b0", 3)))
    code, text = run_cli(monkeypatch, capsys, "embed", shards, "--out", out, "--workers", "0", "--device", "cpu",
                         "--model", "curate-tiny", "--pretrained", "none",
                         case="shard/unreadable-then-fixed")
    assert code == 0, text
    assert {p.stem for p in (out / "_markers" / "embed").glob("*.done")} == {"a", "b", "c"}


@pytest.mark.parametrize("map_tasks", [False, True])
def test_export_stops_at_an_unreadable_shard_and_resumes(tmp_path, monkeypatch, capsys, map_tasks):
    """One process keeps the tars written before the shard; as map tasks the find pass fails on it before
    any tar is written. Either way a rerun finishes."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(tar_bytes(good("a0", 1) + good("a1", 2)))
    (shards / "b.tar").mkdir()
    (shards / "c.tar").write_bytes(tar_bytes(good("c0", 3)))
    uids = [content_uid(image_bytes(scene(s)), f"a good caption number {s}") for s in (1, 2, 3)]
    write_uid_npy(uids, tmp_path / "uids.npy")
    args = ["export", shards, "--subset", tmp_path / "uids.npy", "--out", tmp_path / "out", "--shard-size", "1"]
    args += ["--tasks", "3", "--retries", "0"] if map_tasks else []
    case = "export/unreadable-shard" + ("-map-tasks" if map_tasks else "")
    code, text = run_cli(monkeypatch, capsys, *args, case=case)
    assert_one_line_error(code, text, r"b\.tar: cannot open shard", r"rerun to resume")
    assert not json.loads((tmp_path / "out" / "export_manifest.json").read_text())["complete"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ([] if map_tasks else ["00000.tar", "00001.tar"])
    (shards / "b.tar").rmdir()
    (shards / "b.tar").write_bytes(tar_bytes([]))
    code, text = run_cli(monkeypatch, capsys, *args, case=case + "-fixed")
    assert code == 0 and "exported 3 of the subset's 3 samples" in text, text
    assert map_tasks or "2 finished tars" in text, text


# ---------------------------------------------------------------- tables

def write_table(path: Path, uids, image, text=None, dim=None, teacher=None, **extra_meta) -> Path:
    image = np.asarray(image, np.float32)
    text = image if text is None else np.asarray(text, np.float32)
    dim = dim or image.shape[1]
    teacher = teacher or TeacherInfo("test", "none", dim, 100.0)
    table = build_embedding_table(list(uids), [str(i) for i in range(len(uids))], ["c"] * len(uids), image, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table_atomic(table, path, meta={"teacher": teacher.to_dict(), **extra_meta})
    return path


def unit_rows(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def pool(tmp_path):
    return make_embedding_dir(tmp_path / "emb", [5, 4], dim=8, seed=0)


@pytest.mark.parametrize("command", ["score", "normsim"])
@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_nan_or_zero_embeddings_name_the_file_row_and_uid(tmp_path, monkeypatch, capsys, command, bad):
    image = unit_rows(3, 8, 1)
    image[1] = np.nan if bad == "nan" else 0.0
    emb = tmp_path / "bad"
    write_table(emb / "t.parquet", ["a" * 32, "b" * 32, "c" * 32], image)
    target = make_embedding_dir(tmp_path / "target", [4], dim=8, seed=3, model="test")
    extra = ["--device", "cpu"] if command == "score" else ["--target", target]
    code, text = run_cli(monkeypatch, capsys, command, emb, "--out", tmp_path / "o.parquet", *extra,
                         case=f"table/{bad}-{command}")
    assert_one_line_error(code, text, r"t\.parquet", r"row 1 \(uid b{32}\)", "not finite" if bad == "nan" else "all zeros",
                          r"re-embed")
    assert not (tmp_path / "o.parquet").exists()


def test_normsim_2d_refuses_zero_rows_too(tmp_path, monkeypatch, capsys):
    image = unit_rows(4, 8, 1)
    image[2] = 0.0
    write_table(tmp_path / "bad" / "t.parquet", [f"{i:032x}" for i in range(4)], image)
    code, text = run_cli(monkeypatch, capsys, "normsim", tmp_path / "bad", "--target", "none", "--p", "2d",
                         "--out", tmp_path / "o.parquet", case="table/zero-normsim-2d")
    assert_one_line_error(code, text, r"t\.parquet", r"row 2", "all zeros")


def test_duplicate_uids_across_shards_score_then_filter_refuses(tmp_path, monkeypatch, capsys):
    """Documented: score and normsim score rows as they are; filter refuses a pool with a repeated uid."""
    emb = make_embedding_dir(tmp_path / "emb", [4], dim=8, seed=0)
    (emb / "shard-00001.parquet").write_bytes((emb / "shard-00000.parquet").read_bytes())
    code, text = run_cli(monkeypatch, capsys, "score", emb, "--out", tmp_path / "s.parquet", "--device", "cpu",
                         "--k", "2", "--batch-size", "3", case="table/duplicate-uids-score")
    assert code == 0, text
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 8
    code, text = run_cli(monkeypatch, capsys, "filter", tmp_path / "s.parquet", "--keep", "negclip:0.5",
                         "--out", tmp_path / "f", case="table/duplicate-uids-filter")
    line = assert_one_line_error(code, text, r"s\.parquet", r"appears more than once", r"deduplicate")
    assert re.search(r"uid ([0-9a-f]{32})", line)[1] in pq.read_table(emb / "shard-00000.parquet").column("uid").to_pylist()


@pytest.mark.parametrize("kind", ["dim", "logit_scale", "model"])
def test_tables_of_two_teachers_or_dims_are_refused(tmp_path, monkeypatch, capsys, kind):
    emb = make_embedding_dir(tmp_path / "emb", [3], dim=8, seed=0)
    other = {"dim": dict(dim=16), "logit_scale": dict(dim=8, logit_scale=50.0), "model": dict(dim=8, model="other")}
    make_embedding_dir(tmp_path / "other", [3], seed=1, **other[kind])
    (emb / "shard-00001.parquet").write_bytes((tmp_path / "other" / "shard-00000.parquet").read_bytes())
    for command, extra in (("score", ["--device", "cpu"]), ("normsim", ["--target", tmp_path / "other"])):
        code, text = run_cli(monkeypatch, capsys, command, emb, "--out", tmp_path / "o.parquet", *extra,
                             case=f"table/two-teachers-{kind}-{command}")
        assert_one_line_error(code, text, r"different teachers|target was embedded with", r"shard-0000")


def test_vectors_that_disagree_with_their_metadata_are_refused(tmp_path, monkeypatch, capsys):
    write_table(tmp_path / "lie" / "t.parquet", ["a" * 32], unit_rows(1, 4, 0),
                teacher=TeacherInfo("test", "none", 8, 100.0), dim=4)
    for command, extra in (("score", ["--device", "cpu"]), ("normsim", ["--target", "none", "--p", "2d"])):
        code, text = run_cli(monkeypatch, capsys, command, tmp_path / "lie", "--out", tmp_path / "o.parquet", *extra,
                             case=f"table/dim-vs-metadata-{command}")
        assert_one_line_error(code, text, r"t\.parquet", r"4-d vectors", r"embed_dim 8")


def test_target_of_another_dimension_is_refused(tmp_path, monkeypatch, capsys, pool):
    np.save(tmp_path / "t4.npy", unit_rows(3, 4, 0))
    for p in ("inf", "2"):
        code, text = run_cli(monkeypatch, capsys, "normsim", pool, "--target", tmp_path / "t4.npy", "--p", p,
                             "--out", tmp_path / "o.parquet", case=f"table/target-dim-{p}")
        assert_one_line_error(code, text, r"t4\.npy", r"dimension 4 but the pool's have 8")


def test_missing_columns_and_unreadable_tables_are_clear(tmp_path, monkeypatch, capsys, pool):
    (tmp_path / "mc").mkdir()
    pq.write_table(pq.read_table(pool / "shard-00000.parquet").drop(["text_embedding"]).replace_schema_metadata(
        pq.read_schema(pool / "shard-00000.parquet").metadata), tmp_path / "mc" / "t.parquet")
    code, text = run_cli(monkeypatch, capsys, "score", tmp_path / "mc", "--out", tmp_path / "o.parquet",
                         "--device", "cpu", case="table/missing-column")
    assert_one_line_error(code, text, r"t\.parquet", r"no column `text_embedding`")
    for content, message in ((b"", r"size is 0 bytes"), (b"PAR1 not really", r"not a readable Parquet")):
        (tmp_path / "g").mkdir(exist_ok=True)
        (tmp_path / "g" / "t.parquet").write_bytes(content)
        code, text = run_cli(monkeypatch, capsys, "score", tmp_path / "g", "--out", tmp_path / "o.parquet",
                             "--device", "cpu", case="table/unreadable-parquet")
        assert_one_line_error(code, text, r"t\.parquet", message)
    pq.write_table(pa.table({"uid": ["a" * 32], "negclip": [0.1]}), tmp_path / "g" / "t.parquet")
    code, text = run_cli(monkeypatch, capsys, "score", tmp_path / "g", "--out", tmp_path / "o.parquet",
                         "--device", "cpu", case="table/score-table-as-embeddings")
    assert_one_line_error(code, text, r"t\.parquet", r"no `curate` teacher metadata")


@pytest.mark.parametrize("content", ["int64", "float", "2d", "pickle", "text", "big-endian"])
def test_uid_file_of_the_wrong_dtype_is_refused(tmp_path, monkeypatch, capsys, content):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(tar_bytes(good("a0", 1)))
    path = tmp_path / "uids.npy"
    if content == "int64":
        np.save(path, np.arange(4))
    elif content == "float":
        np.save(path, np.ones(3))
    elif content == "2d":
        np.save(path, np.zeros((2, 2), dtype="u8,u8"))
    elif content == "pickle":
        np.save(path, np.array([{"uid": "a" * 32}], dtype=object), allow_pickle=True)
    elif content == "text":
        path.write_text("0123456789abcdef0123456789abcdef\n")
    else:
        np.save(path, np.zeros(2, dtype=">u8,>u8"))
    code, text = run_cli(monkeypatch, capsys, "export", shards, "--subset", path, "--out", tmp_path / "out",
                         case=f"uids/{content}")
    assert_one_line_error(code, text, r"uids\.npy", r"u8,u8|cannot read as a \.npy|not a \.npy file")
    assert not any((tmp_path / "out").glob("*.tar"))


def test_an_empty_subset_exports_nothing(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(tar_bytes(good("a0", 1)))
    write_uid_npy([], tmp_path / "uids.npy")
    code, text = run_cli(monkeypatch, capsys, "export", shards, "--subset", tmp_path / "uids.npy",
                         "--out", tmp_path / "out", case="uids/empty-subset")
    assert code == 0 and "exported 0 of the subset's 0 samples" in text, text


# ---------------------------------------------------------------- parameters

def test_k_and_b_larger_than_the_pool_are_the_documented_edge(tmp_path, monkeypatch, capsys, pool):
    code, text = run_cli(monkeypatch, capsys, "score", pool, "--out", tmp_path / "s.parquet", "--device", "cpu",
                         "--k", "50", "--batch-size", "1000000", case="param/k-b-over-pool")
    assert code == 0, text
    assert "K=50, B=9" in text  # B = min(B, N): one batch of the whole pool
    scores = pq.read_table(tmp_path / "s.parquet")
    assert (np.asarray(scores.column("negclip")) <= 0).all()
    # with b = N every partition is the same single batch, so K does not change the scores
    code, text = run_cli(monkeypatch, capsys, "score", pool, "--out", tmp_path / "s1.parquet", "--device", "cpu",
                         "--k", "1", "--batch-size", "9", case="param/k1-b-equals-pool")
    np.testing.assert_allclose(np.asarray(pq.read_table(tmp_path / "s1.parquet").column("negclip")),
                               np.asarray(scores.column("negclip")), rtol=1e-5, atol=1e-6)


PARAMETER_ERRORS = [
    (["score", "{pool}", "--out", "{tmp}/s.parquet", "--device", "cpu", "--k", "0"], [r"--k 0 must be >= 1"]),
    (["score", "{pool}", "--out", "{tmp}/s.parquet", "--device", "cpu", "--batch-size", "0"], [r"--batch-size"]),
    (["score", "{pool}", "--out", "{tmp}/s.parquet", "--device", "cpu", "--metric", "normsim_inf"],
     [r"unknown metric normsim_inf"]),
    (["score", "{pool}", "--out", "{tmp}/s.parquet", "--device", "cpu", "--metric", ""], [r"no metric"]),
    (["score", "{pool}", "--out", "{tmp}/s.parquet", "--device", "tpu"], [r"tpu"]),
    (["normsim", "{pool}", "--target", "{pool}", "--p", "3", "--out", "{tmp}/n.parquet"], [r"--p must be one of"]),
    (["normsim", "{pool}", "--target", "{pool}", "--p", "1", "--out", "{tmp}/n.parquet"], [r"--p must be one of"]),
    (["normsim", "{pool}", "--target", "{pool}", "--p", "nan", "--out", "{tmp}/n.parquet"], [r"--p must be one of"]),
    (["normsim", "{pool}", "--p", "inf", "--out", "{tmp}/n.parquet"], [r"needs a target"]),
    (["normsim", "{pool}", "--target", "{tmp}/nothing.npy", "--out", "{tmp}/n.parquet"], [r"target not found"]),
    (["normsim", "{pool}", "--target", "none", "--p", "2d", "--final-fraction", "0", "--out", "{tmp}/n.parquet"],
     [r"--final-fraction"]),
    (["normsim", "{pool}", "--target", "none", "--p", "2d", "--iterations", "0", "--out", "{tmp}/n.parquet"],
     [r"--iterations"]),
    (["filter", "{scores}", "--keep", "negclip:0", "--out", "{tmp}/f"], [r"must be in \(0, 1\]"]),
    (["filter", "{scores}", "--keep", "negclip:1.5", "--out", "{tmp}/f"], [r"must be in \(0, 1\]"]),
    (["filter", "{scores}", "--keep", "negclip:-0.1", "--out", "{tmp}/f"], [r"must be in \(0, 1\]"]),
    (["filter", "{scores}", "--keep", "negclip:nan", "--out", "{tmp}/f"], [r"not a number"]),
    (["filter", "{scores}", "--keep", "negclip:abc", "--out", "{tmp}/f"], [r"not a number"]),
    (["filter", "{scores}", "--keep", "negclip0.3", "--out", "{tmp}/f"], [r"METRIC:VALUE"]),
    (["filter", "{scores}", "--keep", "normsim_inf:0.3", "--out", "{tmp}/f"], [r"unknown metric 'normsim_inf'",
                                                                               r"clipscore, negclip"]),
    (["filter", "{scores}", "--keep", "negclip:0.3", "--mode", "both", "--out", "{tmp}/f"], [r"--mode"]),
    (["filter", "{scores}", "--out", "{tmp}/f"], [r"nothing to select"]),
    (["export", "{shards}", "--subset", "{tmp}/u.npy", "--out", "{tmp}/x", "--shard-size", "0"], [r"--shard-size 0"]),
    (["embed", "{shards}", "--out", "{tmp}/e", "--batch-size", "0", "--device", "cpu", "--pretrained", "none"],
     [r"--batch-size 0"]),
    (["embed", "{shards}", "--out", "{tmp}/e", "--precision", "fp8", "--device", "cpu", "--pretrained", "none"],
     [r"--precision"]),
    (["embed", "{tmp}/no-such-dir/*.tar", "--out", "{tmp}/e", "--device", "cpu"], [r"no tar shards found"]),
    (["embed", "{shards}", "--out", "{tmp}/e", "--model", "no-such-model", "--device", "cpu", "--pretrained", "none"],
     [r"unknown model"]),
]


def _param_id(index: int, args: list[str]) -> str:
    flags = [a for a in args if not a.startswith("{") and a not in ("--out", "--device", "cpu", "--subset", "--target")]
    return f"{index:02d}-" + "_".join(flags)


@pytest.mark.parametrize("args,patterns", PARAMETER_ERRORS,
                         ids=[_param_id(i, a) for i, (a, _) in enumerate(PARAMETER_ERRORS)])
def test_bad_parameters_are_one_line_errors(tmp_path, monkeypatch, capsys, pool, args, patterns):
    scores = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(10)], "clipscore": np.arange(10.0),
                             "negclip": -np.arange(10.0)}), scores)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(tar_bytes(good("a0", 1)))
    write_uid_npy(["a" * 32], tmp_path / "u.npy")
    filled = [a.format(pool=pool, tmp=tmp_path, scores=scores, shards=shards) for a in args]
    code, text = run_cli(monkeypatch, capsys, *filled, case=f"param/{_param_id(0, args)[3:]}")
    assert_one_line_error(code, text, *patterns)


@pytest.mark.parametrize("command", ["score", "normsim-inf", "normsim-2d", "filter"])
def test_an_empty_pool_is_a_clear_error(tmp_path, monkeypatch, capsys, command):
    empty = make_embedding_dir(tmp_path / "empty", [0, 0], dim=8, seed=0)
    target = make_embedding_dir(tmp_path / "target", [3], dim=8, seed=1)
    pq.write_table(pa.table({"uid": pa.array([], pa.string()), "negclip": pa.array([], pa.float32())}),
                   tmp_path / "es.parquet")
    args = {"score": ["score", empty, "--device", "cpu", "--out", tmp_path / "o.parquet"],
            "normsim-inf": ["normsim", empty, "--target", target, "--out", tmp_path / "o.parquet"],
            "normsim-2d": ["normsim", empty, "--target", "none", "--p", "2d", "--out", tmp_path / "o.parquet"],
            "filter": ["filter", tmp_path / "es.parquet", "--keep", "negclip:0.5", "--out", tmp_path / "f"]}[command]
    code, text = run_cli(monkeypatch, capsys, *args, case=f"param/empty-pool-{command}")
    assert_one_line_error(code, text, r"no rows")


# ---------------------------------------------------------------- checkpoints

def torch_load_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes weights_only=True) for every torch.load(...) call and every open_clip loader call in a file."""
    tree = ast.parse(path.read_text(), str(path))
    calls = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        if (owner, name) == ("torch", "load") or (owner == "open_clip" and name in (
                "create_model", "create_model_and_transforms", "create_model_from_pretrained", "load_checkpoint")):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                       for k in node.keywords)
            calls.append((node.lineno, safe))
    return calls


def test_every_torch_load_in_the_code_base_uses_weights_only():
    sources = [p for d in ("curate", "bench", "examples") for p in (REPO / d).rglob("*.py")]
    found, unsafe = 0, []
    for path in sources:
        for line, safe in torch_load_calls(path):
            found += 1
            if not safe:
                unsafe.append(f"{path.relative_to(REPO)}:{line}")
        text = path.read_text()
        if "allow_pickle=True" in text or re.search(r"\bpickle\.loads?\(", text):
            unsafe.append(f"{path.relative_to(REPO)}: unpickles data")
    TALLY.case("checkpoint/grep")
    assert found >= 2  # the teacher loader and the PCME heads loader at least
    assert not unsafe, unsafe


def test_the_grep_catches_an_unsafe_load(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nstate = torch.load('x.pt')\nok = torch.load('y.pt', weights_only=True)\n")
    assert torch_load_calls(bad) == [(2, False), (3, True)]


class _Exploit:
    """Unpickling this runs code: it would write a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_pickle_bearing_checkpoint_is_refused_by_the_cli_without_running_it(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned.txt"
    checkpoint = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "exploit": _Exploit(str(marker))}, checkpoint)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(tar_bytes(good("a0", 1)))
    code, text = run_cli(monkeypatch, capsys, "embed", shards, "--out", tmp_path / "emb", "--pretrained", checkpoint,
                         "--device", "cpu", "--workers", "0", "--retries", "0", case="checkpoint/pickle")
    assert_one_line_error(code, text, r"evil\.pt", r"refused to load", r"weights_only")
    assert not marker.exists()
    assert not (tmp_path / "emb" / "a.parquet").exists()


def test_sample_level_helpers_never_raise_on_member_soup():
    """Random member dictionaries (no image, odd extensions, junk json) decode or raise SampleError only."""
    from curate.io.shards import SampleError, decode_sample, sample_uid

    rng = np.random.default_rng(7)
    pool = {"jpg": b"\xff\xd8junk", "png": image_bytes(scene(1)), "txt": b"ok", "json": b"{]", "webp": b"RIFF....",
            "cls": b"3", "txt2": b"\xff\xfe"}
    tried = 0
    for _ in range(60):
        names = rng.choice(list(pool), size=int(rng.integers(0, 5)), replace=False)
        raw = RawSample("k", {str(n): pool[str(n)] for n in names}, "s")
        sample_uid(raw)
        try:
            decode_sample(raw)
        except SampleError:
            pass
        tried += 1
    TALLY.case("sample/member-soup")
    assert tried == 60


def test_a_pretrained_name_offline_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Network only when a pretrained name is asked for; without one reachable, a clear offline error at once."""
    import socket

    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "a.tar").write_bytes(tar_bytes(good("a0", 1)))
    started = time.perf_counter()
    code, text = run_cli(monkeypatch, capsys, "embed", shards, "--out", tmp_path / "emb", "--model", "ViT-B-32",
                         "--pretrained", "openai", "--device", "cpu", "--workers", "0", "--retries", "0",
                         case="network/pretrained-offline")
    seconds = time.perf_counter() - started
    assert_one_line_error(code, text, r"ViT-B-32/openai", r"cannot be downloaded", r"--pretrained /path/to")
    assert attempts  # it did try the hub, and only because a pretrained name was asked for
    assert seconds < 30, seconds
    assert not (tmp_path / "emb" / "a.parquet").exists()

