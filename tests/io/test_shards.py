"""Shard streaming, decoding of odd images, the uid rule and DataComp's uid layout."""

import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from curate.errors import CurateError
from curate.io.shards import (MAX_IMAGE_PIXELS, SampleError, decode_sample, expand_shards, iter_shard, load_rgb,
                              sample_uid, unique_stems)
from curate.io.uids import content_uid, pairs_to_uids, read_uid_npy, uids_to_pairs, write_uid_npy


def png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def add(tar, name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, len(data) if kind == tarfile.REGTYPE else 0, linkname
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for m in members:
            add(tar, *m)
    return str(path)


RED = png_bytes(Image.new("RGB", (8, 8), (255, 0, 0)))


def collect(url):
    problems = []
    samples = list(iter_shard(url, lambda k, r: problems.append((k, r))))
    return samples, problems


def test_uid_rule_is_sha256_of_image_nul_caption():
    expected = hashlib.sha256(b"IMG" + b"\0" + "two red circles".encode()).hexdigest()[:32]
    assert content_uid(b"IMG", "two red circles") == expected
    assert len(expected) == 32 and expected == expected.lower()


def test_datacomp_npy_round_trip_matches_plain_conversion(tmp_path):
    rng = np.random.default_rng(0)
    uids = [f"{int(x):032x}" for x in rng.integers(0, 2**62, 50)] + ["ffffffffffffffff0000000000000001"]
    path = tmp_path / "uids.npy"
    assert write_uid_npy(uids, path) == len(uids)
    arr = np.load(path)
    # DataComp's own conversion, written out by hand: high 64 bits then low 64 bits, sorted
    plain = sorted((int(u[:16], 16), int(u[16:], 16)) for u in uids)
    assert arr.dtype == np.dtype("u8,u8")
    assert [tuple(map(int, r)) for r in arr.tolist()] == plain
    assert sorted(read_uid_npy(path)) == sorted(uids)
    assert pairs_to_uids(uids_to_pairs(uids)) == sorted(uids)


def test_uid_npy_wrong_dtype_is_clear_error(tmp_path):
    np.save(tmp_path / "bad.npy", np.arange(4))
    with pytest.raises(CurateError, match="bad.npy.*u8,u8"):
        read_uid_npy(tmp_path / "bad.npy")


def test_iter_shard_groups_members_and_records_links(tmp_path):
    url = make_tar(tmp_path / "00000.tar", [
        ("a.jpg", RED), ("a.txt", b"red"), ("a.json", b'{"uid": "' + b"a" * 32 + b'"}'),
        ("b.png", RED), ("b.txt", b"red too"),
        ("c.txt", b"x", tarfile.SYMTYPE, "/etc/passwd"),
        ("d.txt", b"", tarfile.LNKTYPE, "a.txt"),
        ("e.txt", b"", tarfile.CHRTYPE),
    ])
    samples, problems = collect(url)
    assert [s.key for s in samples] == ["a", "b"]
    assert set(samples[0].members) == {"jpg", "txt", "json"}
    reasons = " ".join(r for _, r in problems)
    assert "symlink" in reasons and "hard link" in reasons and "device" in reasons
    assert sample_uid(samples[0]) == "a" * 32
    assert sample_uid(samples[1]) == content_uid(RED, "red too")


def test_truncated_tar_keeps_complete_samples(tmp_path):
    full = make_tar(tmp_path / "full.tar", [("a.png", RED), ("a.txt", b"one"), ("b.png", RED * 50), ("b.txt", b"two")])
    data = open(full, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: 512 * 4 + 200])  # stops inside b.png
    samples, problems = collect(str(cut))
    assert [s.key for s in samples] == ["a"]
    assert problems and "truncated" in problems[-1][1]


def test_cut_inside_a_member_keeps_earlier_samples(tmp_path):
    full = make_tar(tmp_path / "full.tar", [("a.png", RED), ("a.txt", b"one"), ("b.png", RED * 50), ("b.txt", b"two")])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(full, "rb").read()[: 512 * 5 + 100])  # inside b.png's data
    samples, problems = collect(str(cut))
    assert [s.key for s in samples] == ["a"]
    assert len(problems) == 1 and "truncated" in problems[0][1] or "unexpected end" in problems[0][1]


@pytest.mark.parametrize("payload", [b"", b"this is not a tar file at all" * 40])
def test_empty_or_non_tar_is_recorded(tmp_path, payload):
    p = tmp_path / "x.tar"
    p.write_bytes(payload)
    samples, problems = collect(str(p))
    assert samples == [] and len(problems) == 1


def test_duplicate_member_recorded_and_first_kept(tmp_path):
    url = make_tar(tmp_path / "d.tar", [("a.png", RED), ("a.txt", b"first"), ("a.txt", b"second")])
    samples, problems = collect(url)
    assert samples[0].members["txt"] == b"first"
    assert "duplicate member" in problems[0][1]


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16"])
def test_odd_image_modes_decode_to_rgb(mode):
    if mode == "I;16":
        img = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    else:
        img = Image.new("RGB", (4, 4), (200, 10, 10)).convert(mode)
    out = load_rgb(png_bytes(img, "TIFF" if mode == "CMYK" else "PNG"))
    assert out.mode == "RGB" and out.size == (4, 4)
    if mode == "I;16":  # full-scale 16-bit white must stay white, not clip to garbage
        assert np.asarray(out).min() == 255


def test_transparent_pixels_composite_on_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert np.asarray(load_rgb(png_bytes(img))).min() == 255


def test_bad_images_raise_sample_error():
    with pytest.raises(SampleError, match="0 bytes"):
        load_rgb(b"")
    with pytest.raises(SampleError, match="undecodable"):
        load_rgb(b"\xff\xd8garbage")
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 64  # just over the guard, as a tiny PNG of one colour
    with pytest.raises(SampleError, match="decompression-bomb"):
        load_rgb(png_bytes(Image.new("1", (side, side))))


def test_decode_sample_caption_rules(tmp_path):
    from curate.io.shards import RawSample

    with pytest.raises(SampleError, match="missing caption"):
        decode_sample(RawSample("k", {"png": RED}, "s"))
    with pytest.raises(SampleError, match="empty caption"):
        decode_sample(RawSample("k", {"png": RED, "txt": b"  \n"}, "s"))
    s = decode_sample(RawSample("k", {"png": RED, "txt": b"caf\xe9"}, "s"))
    assert s.caption == "caf\ufffd" and "UTF-8" in s.notes[0]
    s = decode_sample(RawSample("k", {"png": RED, "txt": b"x", "json": b'{"uid": "NOT-A-UID"}'}, "s"))
    assert s.uid == content_uid(RED, "x") and "not 32 lowercase hex" in s.notes[0]


def test_expand_shards_dir_glob_brace(tmp_path):
    for i in range(3):
        make_tar(tmp_path / f"{i:05d}.tar", [("a.png", RED), ("a.txt", b"x")])
    assert len(expand_shards(str(tmp_path))) == 3
    assert len(expand_shards(str(tmp_path / "*.tar"))) == 3
    assert expand_shards(str(tmp_path / "{00000..00001}.tar")) == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    with pytest.raises(CurateError, match="does not exist"):
        expand_shards(str(tmp_path / "{00000..00004}.tar"))
    with pytest.raises(CurateError, match="share the output name"):
        unique_stems(["a/00000.tar", "b/00000.tar"])


def test_a_uid_with_a_trailing_newline_is_not_a_uid():
    from curate.io.uids import is_uid

    assert is_uid("0" * 32) and not is_uid("0" * 32 + "\n") and not is_uid("0" * 31) and not is_uid("A" * 32)
