"""WebDataset shards built byte by byte for the export tests (and the tests of other stages that export):
samples with a json uid, random corpora of every odd shape, and damaged or unusual tars."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile

from curate.io.shards import RawSample, base_plus_ext, sample_uid


def uid_of(i: int) -> str:
    return f"{i:032x}"


def make_shard(path, samples):
    """samples: list of (member name -> bytes) dicts, written in order."""
    with tarfile.open(path, "w") as tar:
        for members in samples:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def sample(key, i, extra=None):
    members = {f"{key}.jpg": f"image {i}".encode(), f"{key}.txt": f"caption {i}".encode(),
               f"{key}.json": json.dumps({"uid": uid_of(i), "key": key}).encode()}
    return {**members, **(extra or {})}


def random_sample(rng, i, key):
    """A sample of a random shape: json uid valid / invalid / absent, images of various extensions,
    captions (some not UTF-8), extra members, upper-case extensions, directories in keys."""
    members = {}
    image_ext = rng.choice(["jpg", "png", "webp", "jpeg", "JPG", None])
    if image_ext:
        members[f"{key}.{image_ext}"] = rng.randbytes(rng.choice([0, 100, 511, 512, 1500]))
    if rng.random() < 0.9:
        members[f"{key}.txt"] = rng.choice([f"caption {i}".encode(), b"caf\xe9 latin-1", b""])
    kind = rng.random()
    if kind < 0.6:
        meta = {"uid": uid_of(i), "key": key, "n": [1, 2.5, None, True]}
        members[f"{key}.json"] = json.dumps(meta).encode()
    elif kind < 0.7:
        members[f"{key}.json"] = rng.choice([b"{not json", b"[1, 2]", b'{"uid": "ABC"}', b"\xff\xfe",
                                             json.dumps({"uid": uid_of(i).upper()}).encode(),
                                             b'{"uid": "%s"} x' % uid_of(i).encode(),  # extra data
                                             "\ufeff{}".encode(), b' {"uid": "%s"}\n ' % uid_of(i).encode(),
                                             b'{"uid": "%s", "uid": 5}' % uid_of(i).encode(),  # last one wins
                                             b'{"uid": "%s\\n"}' % uid_of(i).encode(),  # "$" matches before "\n"
                                             b'{"a": NaN, "uid": "%s"}' % uid_of(i).encode(),
                                             # deeper than json's recursion limit, within orjson's 1024 levels
                                             b'{"uid": "%s", "a": %s}' % (uid_of(i).encode(), b"[" * 1010 + b"]" * 1010),
                                             b"[" * 3000 + b"]" * 3000])  # too deep for both readers
    if rng.random() < 0.2:
        members[f"{key}.cls"] = b"3"
    if rng.random() < 0.1:
        members[f"{key}.seg.png"] = b"segmentation"
    return members


def sample_uid_of(members):
    raw = RawSample("k", {base_plus_ext(n)[1].lower(): d for n, d in members.items()}, "s")
    return sample_uid(raw)


def write_random_corpus(root, seed, shards=3):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    all_uids, i = [], 0
    for s in range(shards):
        samples = []
        for _ in range(rng.randrange(1, 12)):
            key = rng.choice([f"s{s}k{i}", f"dir.x/s{s}k{i}", f"a/b/S{s}K{i}"])
            members = random_sample(rng, i if rng.random() > 0.1 else max(i - 1, 0), key)  # some repeats
            samples.append(members)
            uid = sample_uid_of(members)
            if uid:
                all_uids.append(uid)
            i += 1
        make_shard(root / f"{s:05d}.tar", samples)
    subset = [u for u in sorted(set(all_uids)) if rng.random() < 0.7] + [uid_of(10 ** 6)]
    return subset


def dirty_variants():
    """(name, shard bytes) that the fast path must leave to iter_shard; each otherwise a sound sample."""
    def tar_of(members, fmt=tarfile.GNU_FORMAT, **info_fields):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                for k, v in info_fields.items():
                    setattr(info, k, v)
                tar.addfile(info, io.BytesIO(data))
        return bytearray(buf.getvalue())

    good = [("k1.jpg", b"img1"), ("k1.txt", b"cap1"), ("k1.json", json.dumps({"uid": uid_of(1)}).encode()),
            ("k2.jpg", b"img2" * 300), ("k2.txt", b"cap2"), ("k2.json", json.dumps({"uid": uid_of(2)}).encode())]
    variants = {"plain": tar_of(good)}
    variants["gzip"] = bytearray(gzip.compress(bytes(variants["plain"])))
    variants["pax"] = tar_of(good, tarfile.PAX_FORMAT, pax_headers={"comment": "x"})
    variants["gnu long name"] = tar_of(good + [("k3/" + "x" * 120 + ".jpg", b"long")])
    variants["ustar prefix"] = tar_of(good + [("d" * 120 + "/" + "k3.jpg", b"prefix")], tarfile.USTAR_FORMAT)
    variants["duplicate ext"] = tar_of(good + [("k2.TXT", b"again")])
    variants["unsafe ext"] = tar_of(good + [("k2.p\u00e4th", b"odd")])
    variants["dunder key"] = tar_of([("__k0.jpg", b"x")] + good)
    variants["dot key"] = tar_of(good + [(".hidden.jpg", b"x")])
    variants["no ext"] = tar_of(good + [("README", b"x")])
    variants["long ext"] = tar_of(good + [("k2." + "e" * 70, b"x")])
    variants["control char"] = tar_of(good + [("k2.j\npg", b"x")])
    links = io.BytesIO()
    with tarfile.open(fileobj=links, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in good:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k2.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "k2.jpg"
        tar.addfile(link)
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    variants["symlink and directory"] = bytearray(links.getvalue())
    plain = variants["plain"]
    bad_checksum = bytearray(plain)
    bad_checksum[512 * 2 + 150] ^= 1
    variants["bad checksum"] = bad_checksum
    variants["truncated"] = plain[:512 * 9 + 100]
    variants["no end blocks"] = plain[:len(plain) - 10240 + 512 * 12]
    middle_zeros = bytearray(plain)
    middle_zeros[512 * 2:512 * 2] = bytes(1024)
    variants["zero blocks in the middle"] = middle_zeros
    trailing = bytearray(plain)
    trailing[-300:-290] = b"garbage!!!"
    variants["garbage after the end"] = trailing
    spaced = tar_of(good)
    spaced[124:136] = b"     %06o " % 4  # a size field in another spelling
    spaced[148:156] = b"%06o\0 " % (sum(spaced[:148]) + 256 + sum(spaced[156:512]))
    variants["size with leading spaces"] = spaced  # another spelling tarfile reads the same: fast path too
    signed = tar_of(good)
    signed[124:136] = b"+%010o\0" % 4  # tarfile reads it, the fast path does not take it
    signed[148:156] = b"%06o\0 " % (sum(signed[:148]) + 256 + sum(signed[156:512]))
    variants["size with a plus sign"] = signed
    nested = io.BytesIO()  # a member that is itself a tar: its headers carry the magic too
    with tarfile.open(fileobj=nested, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("inner.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"inner"))
    variants["a tar inside a member"] = tar_of(good + [("k2.tar", nested.getvalue())])
    v7 = tar_of(good)  # headers without the ustar magic (old v7 tars): tarfile reads them the same
    for block in range(0, len(v7) - 1024, 512):
        if v7[block + 257:block + 262] == b"ustar":
            v7[block + 257:block + 265] = bytes(8)
            v7[block + 148:block + 156] = b"%06o\0 " % (sum(v7[block:block + 148]) + 256 + sum(v7[block + 156:block + 512]))
    variants["no magic"] = v7
    one_v7 = tar_of(good)  # only the fourth header lost its magic: the chain from the magic breaks there
    block = 512 * 6
    assert one_v7[block + 257:block + 262] == b"ustar"
    one_v7[block + 257:block + 265] = bytes(8)
    one_v7[block + 148:block + 156] = b"%06o\0 " % (sum(one_v7[block:block + 148]) + 256 + sum(one_v7[block + 156:block + 512]))
    variants["one header without magic"] = one_v7
    variants["empty"] = bytearray()
    variants["not a tar"] = bytearray(b"not a tar at all " * 100)
    return variants
