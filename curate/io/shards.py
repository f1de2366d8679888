"""WebDataset tar shards: expand shard specs, stream samples, decode them, and record every skip.

We follow webdataset's conventions (brace patterns, `base_plus_ext` key/extension split, consecutive
members with one key form a sample) but iterate the tar ourselves so that nothing is dropped silently:
link, device and directory members, duplicate members and a corrupt or truncated tail are reported to
`on_problem(key, reason)`, and the good samples before the damage are still yielded.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from curate.errors import CurateError
from curate.io.uids import content_uid, is_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
SHARD_SUFFIX = ".tar"
# PIL's decompression-bomb guard: above this many pixels an image is refused (PIL raises at 2x; we refuse at 1x).
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

ProblemFn = Callable[[str, str], None]


class SampleError(Exception):
    """A sample that cannot be used; the message is the recorded skip reason."""


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]
    shard: str
    index: int = 0  # position of the sample in its shard


@dataclass
class DecodedSample:
    key: str
    uid: str
    image: Image.Image
    image_bytes: bytes
    caption: str
    meta: dict
    json_text: str | None
    notes: list[str] = field(default_factory=list)  # recorded, sample kept (e.g. caption decoded with replacement)


# ---------------------------------------------------------------- shard lists

def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """A directory, glob, brace pattern (`data/{00000..00099}.tar`), fsspec URL, or a list of them -> shard URLs."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    urls: list[str] = []
    for s in specs:
        s = str(s)
        for item in braceexpand(s):
            if "://" in item:
                fs, _, paths = fsspec.get_fs_token_paths(item)
                found = sorted(paths) if any(c in item for c in "*?[") else [item]
                protocol = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
                urls += [p if "://" in p else f"{protocol}://{p}" for p in found]
            elif Path(item).is_dir():
                urls += sorted(str(p) for p in Path(item).glob(f"*{SHARD_SUFFIX}"))
            elif any(c in item for c in "*?["):
                urls += sorted(glob.glob(item))
            else:
                urls.append(item)
    if not urls:
        raise CurateError(f"{spec}: no tar shards found (give a directory, a glob or a brace pattern)")
    missing = [u for u in urls if "://" not in u and not Path(u).exists()]
    if missing:
        raise CurateError(f"{missing[0]}: shard does not exist ({len(missing)} missing of {len(urls)})")
    return urls


def shard_stem(url: str) -> str:
    """`.../00012.tar` -> `00012`: the name of every per-shard output."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(SHARD_SUFFIX)] if name.endswith(SHARD_SUFFIX) else name


def unique_stems(urls: Sequence[str]) -> list[str]:
    stems = [shard_stem(u) for u in urls]
    seen: dict[str, str] = {}
    for u, s in zip(urls, stems):
        if s in seen:
            raise CurateError(f"two shards share the output name {s!r}: {seen[s]} and {u}; rename one of them")
        seen[s] = u
    return stems


# ---------------------------------------------------------------- streaming

def iter_shard(url: str, on_problem: ProblemFn) -> Iterator[RawSample]:
    """Stream the samples of one shard. Problems go to `on_problem(key, reason)`; never raises for bad data."""
    try:
        f = fsspec.open(url, "rb").open()
    except (OSError, ValueError) as exc:
        on_problem("", f"cannot open shard: {exc}")
        return
    with f:
        tail = _TailReader(f)
        key, members, index = None, {}, 0
        try:
            stream = tarfile.open(fileobj=tail, mode="r|*")
            for info in stream:
                name = info.name
                if not info.isreg():
                    kind = ("symlink" if info.issym() else "hard link" if info.islnk() else
                            "directory" if info.isdir() else "device or special file")
                    if not info.isdir():
                        on_problem(name, f"tar member {name!r} is a {kind}; not read")
                    continue
                base, ext = base_plus_ext(name)
                if base is None or base.rsplit("/", 1)[-1].startswith("__"):
                    on_problem(name, f"tar member {name!r} has no KEY.EXT name; not read")
                    continue
                ext = ext.lower()
                if base != key:
                    if key is not None:
                        yield RawSample(key, members, url, index)
                        index += 1
                    key, members = base, {}
                data = stream.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {name!r} is truncated")
                if ext in members:
                    on_problem(base, f"duplicate member {name!r} in one sample; kept the first")
                    continue
                members[ext] = data
            end_offset = stream.offset
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            # a damaged tail: keep what was read completely, record where it broke
            where = f"after key {key!r}" if key is not None else "at the start"
            on_problem(key or "", f"corrupt or truncated tar {where}: {exc}; the rest of the shard is not read")
            key = None  # the sample being read when the damage hit may be incomplete
            end_offset = None
        if key is not None:
            yield RawSample(key, members, url, index)
        if end_offset is not None:
            # members were all read whole; a damaged end only means something after them was lost
            damage = tail.end_problem(end_offset)
            if damage:
                on_problem(key or "", f"corrupt or truncated tar: {damage}; samples before it are kept")


class _TailReader(io.RawIOBase):
    """Counts bytes and keeps the last ones read, so the end of the archive can be checked.

    tarfile stops silently when a file is cut inside a header; a sound plain tar ends with at least two
    zero blocks after the last member, so anything else there means truncation or garbage.
    """

    KEEP = 1 << 16

    def __init__(self, raw):
        self.raw, self.total, self.buf = raw, 0, bytearray()
        self.gzip = None

    def readable(self):
        return True

    def readinto(self, b):
        data = self.raw.read(len(b))
        if self.gzip is None and data:
            self.gzip = data[:2] == b"\x1f\x8b"
        n = len(data)
        b[:n] = data
        self.total += n
        self.buf += data
        if len(self.buf) > 2 * self.KEEP:
            del self.buf[: len(self.buf) - self.KEEP]
        return n

    def end_problem(self, end_offset: int) -> str | None:
        if self.gzip:
            return None  # offsets are in the decompressed stream; gzip's own CRC catches truncation
        while self.read(self.KEEP):  # drain: a sound tar has only zero padding left
            pass
        if self.total == 0:
            return "empty file (0 bytes)"
        rest = self.total - end_offset
        if rest < 1024:
            return f"truncated: archive ends at byte {self.total} without the end-of-archive blocks"
        start = len(self.buf) - rest
        if start < 0 or any(self.buf[start:]):
            return f"unexpected non-zero data after the last complete member (byte {end_offset})"
        return None


def raw_caption(raw: RawSample) -> tuple[str | None, list[str]]:
    """The caption text (None when missing) and notes about its decoding."""
    data = raw.members.get(CAPTION_EXT)
    if data is None:
        return None, []
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), ["caption is not valid UTF-8; decoded with replacement characters"]


def raw_image_bytes(raw: RawSample) -> bytes | None:
    for ext in IMAGE_EXTS:
        if ext in raw.members:
            return raw.members[ext]
    return None


def raw_json(raw: RawSample) -> tuple[dict, str | None, list[str]]:
    data = raw.members.get("json")
    if data is None:
        return {}, None, []
    try:
        text = data.decode("utf-8")
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        return meta, text, []
    except (UnicodeDecodeError, ValueError) as exc:
        return {}, None, [f"invalid .json ({exc}); ignored"]


def sample_uid(raw: RawSample) -> str | None:
    """The uid rule without decoding the image: json `uid` if valid, else sha256(image + NUL + caption)[:32]."""
    meta, _, _ = raw_json(raw)
    if is_uid(meta.get("uid")):
        return meta["uid"]
    image, (caption, _) = raw_image_bytes(raw), raw_caption(raw)
    if image is None or caption is None:
        return None
    return content_uid(image, caption)


def decode_sample(raw: RawSample, draft_size: int | None = None) -> DecodedSample:
    """Raw members -> RGB image + caption + uid, or SampleError naming why it cannot be used."""
    image_bytes = raw_image_bytes(raw)
    if image_bytes is None:
        raise SampleError(f"no image member (expected one of .{', .'.join(IMAGE_EXTS)})")
    caption, notes = raw_caption(raw)
    if caption is None:
        raise SampleError("missing caption (.txt)")
    if not caption.strip():
        raise SampleError("empty caption")
    meta, json_text, json_notes = raw_json(raw)
    notes += json_notes
    uid = meta.get("uid")
    if not is_uid(uid):
        if uid is not None:
            notes.append(f"json uid {str(uid)[:40]!r} is not 32 lowercase hex; uid taken from content")
        uid = content_uid(image_bytes, caption)
    image = load_rgb(image_bytes, draft_size)
    return DecodedSample(raw.key, uid, image, image_bytes, caption, meta, json_text, notes)


def load_rgb(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode any PIL-readable image to 8-bit RGB: CMYK, palette, alpha (on white) and 16-bit handled."""
    if not data:
        raise SampleError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # decode JPEG at reduced scale: much faster for big images
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError(f"image refused by the decompression-bomb guard ({exc})") from None
    except Exception as exc:  # PIL raises many types for bad bytes
        raise SampleError(f"undecodable image ({type(exc).__name__}: {exc})") from None
    if img.width < 1 or img.height < 1:
        raise SampleError(f"image has empty size {img.size}")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img
