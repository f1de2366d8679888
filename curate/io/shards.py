"""WebDataset tar shards: expand shard specs, stream samples, decode them, and record every skip.

We follow webdataset's conventions (brace patterns, `base_plus_ext` key/extension split, consecutive
members with one key form a sample) but iterate the tar ourselves so that nothing is dropped silently:
link, device and directory members, duplicate members, damaged stretches (skipped up to the next valid
header) and a corrupt or truncated tail are reported to `on_problem(key, reason)`, and every good sample
around the damage is still yielded. A shard that cannot be opened or read raises `ShardReadError`.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import re
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import fsspec
import numpy as np
import orjson
from braceexpand import braceexpand
from PIL import Image

from curate.errors import CurateError
from curate.io.uids import content_uid, is_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
SHARD_SUFFIX = ".tar"
# PIL's decompression-bomb guard: above this many pixels an image is refused (PIL raises at 2x; we refuse at 1x).
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
# A member larger than this is not read into memory (a bogus size field, or a file that is no sample member).
MAX_MEMBER_BYTES = 1 << 30

ProblemFn = Callable[[str, str], None]
# webdataset's key/extension split (webdataset.tariterators.base_plus_ext), restated because importing
# webdataset imports torch: seconds of start-up for `curate export`, which never needs torch.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(name: str) -> tuple[str | None, str | None]:
    """`dir/key.seg.jpg` -> (`dir/key`, `seg.jpg`): the sample key and everything after its first dot."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


class SampleError(Exception):
    """A sample that cannot be used; the message is the recorded skip reason."""


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]
    shard: str
    index: int = 0  # position of the sample in its shard
    uid: str | None = None  # set by a reader that already looked it up (sample_uid)


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
    uid_from_content: bool = False  # no valid `uid` in the .json: the uid was derived from image + caption


# ---------------------------------------------------------------- shard lists

EMPTY_SHARD = "empty file (0 bytes): the shard holds no samples; was its download or copy cut short?"
PIPE_PREFIX = "pipe:"  # webdataset's convention: `pipe:COMMAND` reads the shard from the command's stdout


def is_pipe(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """A directory, glob, brace pattern (`data/{00000..00099}.tar`), fsspec URL, `pipe:COMMAND` (as webdataset
    reads it: the shard is the command's standard output), or a list of them -> shard URLs."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    urls: list[str] = []
    for s in specs:
        s = str(s)
        for item in braceexpand(s):
            if is_pipe(item):
                urls.append(item)
            elif "://" in item:
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
    missing = [u for u in urls if "://" not in u and not is_pipe(u) and not Path(u).exists()]
    if missing:
        raise CurateError(f"{missing[0]}: shard does not exist ({len(missing)} missing of {len(urls)})")
    return urls


def image_folder_units(directory: str | Path) -> list[str] | None:
    """An ImageFolder (`DIR/CLASS/*.jpg`, as torchvision reads it): its class folders, sorted; a folder of
    images without class folders: [DIR]. None when `directory` holds tar shards or no images at all."""
    root = Path(directory)
    if not root.is_dir() or any(root.glob(f"*{SHARD_SUFFIX}")):
        return None
    classes = sorted(str(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
                     and any(is_image_name(f.name) for f in p.iterdir()))
    if classes:
        return classes
    return [str(root)] if any(is_image_name(p.name) for p in root.iterdir()) else None


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and "." in name


def iter_image_folder(directory: str | Path, on_problem: ProblemFn) -> Iterator[RawSample]:
    """The images of one folder as samples (key `FOLDER/NAME` without extension; member = the image's
    extension, lower case), in name order; files that cannot be read are reported to `on_problem`."""
    folder = Path(directory)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and is_image_name(p.name))
    for index, name in enumerate(names):
        stem, ext = name.rsplit(".", 1)
        key = f"{folder.name}/{stem}"
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            on_problem(key, f"cannot read {folder / name} ({exc})")
            continue
        yield RawSample(key, {ext.lower(): data}, str(folder), index)


def shard_stem(url: str) -> str:
    """`.../00012.tar` -> `00012`: the name of every per-shard output. For `pipe:COMMAND`, the last `NAME.tar`
    the command names (`pipe:curl -s https://host/00012.tar` -> `00012`)."""
    if is_pipe(url):
        names = re.findall(r"([A-Za-z0-9_.-]+)\.tar\b", url)
        if not names:
            raise CurateError(f"{url}: name the shard in the command (e.g. `pipe:curl -s URL/00012.tar`): its "
                              "outputs are named after the last NAME.tar in it")
        return names[-1]
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

class ShardReadError(CurateError):
    """The shard itself cannot be read (open or I/O failure): the shard fails and is retried, unlike bad data."""


def iter_shard(url: str, on_problem: ProblemFn) -> Iterator[RawSample]:
    """Stream the samples of one shard. Bad data goes to `on_problem(key, reason)` and never raises.

    A damaged stretch of the archive (an invalid header, garbage) is skipped block by block and reading
    resumes at the next valid member header, so the good samples after the damage are kept too. Only a
    shard that cannot be opened or read at all (I/O error) raises `ShardReadError`.
    """
    yield from _iter_tar(url, on_problem)


def _iter_tar(url: str, on_problem: ProblemFn, compressed_error: str | None = None) -> Iterator[RawSample]:
    """`compressed_error`: set on the second pass over a shard that looked compressed but did not decompress."""
    try:
        raw = PipeFile(url[len(PIPE_PREFIX):]) if is_pipe(url) else fsspec.open(url, "rb").open()
    except Exception as exc:  # noqa: BLE001 - fsspec back ends raise many types
        raise ShardReadError(f"{url}: cannot open shard ({type(exc).__name__}: {exc})") from None
    with raw:
        source, compressed = _decompressed(_GuardedReader(raw, url), plain=compressed_error is not None)
        tail = _TailReader(source)
        key, members, index = None, {}, 0
        member_end = 0  # where the next header should start: the end of the last member's data
        found_member = False
        try:
            stream = tarfile.open(fileobj=tail, mode="r|", ignore_zeros=True)
            for info in stream:
                skipped = tail.skipped_kind(member_end, info.offset) if info.offset > member_end else None
                if skipped == "zeros":  # legitimate between concatenated archives, but also how lost data looks
                    on_problem(key or "", f"{info.offset - member_end} zero bytes skipped before member {info.name!r} "
                                          "(end blocks of a concatenated archive, or zeroed-out data)")
                elif skipped:
                    on_problem(key or "", f"corrupt tar data (bytes {member_end}-{info.offset}) skipped; reading "
                                          f"resumed at member {info.name!r}; the samples around it may be incomplete")
                found_member = True
                member_end = info.offset_data + (-(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                                                 if info.isreg() else 0)
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
                if info.size > MAX_MEMBER_BYTES:
                    on_problem(name, f"tar member {name!r} is {info.size:,} bytes, over the {MAX_MEMBER_BYTES:,}-byte "
                                     "limit per member; not read")
                    continue
                data = stream.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {name!r} is truncated")
                if ext in members:
                    on_problem(base, f"duplicate member {name!r} in one sample; kept the first")
                    continue
                members[ext] = data
            damaged = None
        except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
            damaged = exc
        if tail.total == 0 and not compressed:  # not damage: a file with nothing in it (an interrupted copy?)
            on_problem("", EMPTY_SHARD)
            return
        if damaged is not None and compressed and tail.total == 0:
            # not compressed after all (a damaged plain tar can start with a magic number): read it as it is
            yield from _iter_tar(url, on_problem, compressed_error=f"{type(damaged).__name__}: {damaged}")
            return
        if compressed_error and not found_member:  # neither compressed nor plain: say what the first pass found
            on_problem("", f"corrupt compressed shard ({compressed_error}); nothing could be read")
            return
        if damaged is not None:
            # the archive breaks off: keep what was read completely, record where it broke
            where = f"after key {key!r}" if key is not None else "at the start"
            on_problem(key or "", f"corrupt or truncated tar {where}: {damaged}; the rest of the shard is not read")
            return  # the sample being read when the damage hit may be incomplete: not yielded
        # members were all read whole; a damaged end means something after them was lost
        damage, last_complete = tail.end_problem(member_end, found_member, key)
        if key is not None and last_complete:
            yield RawSample(key, members, url, index)
        if damage:
            kept = "samples before it are kept" if last_complete or key is None else \
                f"the last sample {key!r} may be incomplete and is not read"
            on_problem(key or "", f"corrupt or truncated tar: {damage}; {kept}")


def _decompressed(source: io.RawIOBase, plain: bool = False) -> tuple[io.RawIOBase, bool]:
    """(the tar byte stream, whether it is decompressed): gzip/bz2/xz shards are decompressed here, so that
    every offset is a tar offset. A first block that is a valid tar header means a plain tar, whatever its
    first bytes (a member may be called `BZh9...`)."""
    reader = io.BufferedReader(source, buffer_size=1 << 16)
    if plain:
        return reader, False
    head = reader.peek(tarfile.BLOCKSIZE)
    if len(head) >= tarfile.BLOCKSIZE:
        try:
            tarfile.TarInfo.frombuf(head[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
            return reader, False
        except tarfile.HeaderError:
            pass
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=reader, mode="rb"), True
    if head.startswith(b"BZh"):
        return bz2.BZ2File(reader, mode="rb"), True
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(reader, mode="rb"), True
    return reader, False


class PipeFile(io.RawIOBase):
    """The standard output of a shell command, read as a file; a command that exits non-zero is an I/O error
    at the end of its output (naming the exit status and the end of its standard error)."""

    def __init__(self, command: str):
        import subprocess

        self.command = command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self):
        return True

    def readinto(self, b):
        n = self.proc.stdout.readinto(b)
        if not n:
            self._check_exit()
        return n

    def read(self, size=-1):
        data = self.proc.stdout.read(size) if size is not None and size >= 0 else self.proc.stdout.read()
        if not data:
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        code = self.proc.wait()
        if code != 0:
            error = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            raise OSError(f"command `{self.command}` exited with status {code}"
                          + (f": {error[-1][:200]}" if error else ""))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        super().close()


class _GuardedReader(io.RawIOBase):
    """Turns an I/O failure of the underlying file (not bad data) into ShardReadError, so the shard fails."""

    def __init__(self, raw, url: str):
        self.raw, self.url = raw, url

    def readable(self):
        return True

    def readinto(self, b):
        try:
            data = self.raw.read(len(b))
        except Exception as exc:  # noqa: BLE001 - fsspec back ends raise many types
            raise ShardReadError(f"{self.url}: read failed ({type(exc).__name__}: {exc})") from None
        n = len(data)
        b[:n] = data
        return n


class _TailReader(io.RawIOBase):
    """Counts bytes and keeps the last ones read, so skipped stretches and the archive's end can be checked.

    tarfile (with ignore_zeros) skips zero blocks and invalid headers silently. Zero blocks are normal (the
    end-of-archive marker, concatenated archives), anything else skipped means damage. A sound tar ends
    with at least two zero blocks after the last member, so anything else there means truncation or garbage.
    """

    KEEP = 1 << 16

    def __init__(self, source):
        self.source, self.total, self.buf = source, 0, bytearray()

    def readable(self):
        return True

    def readinto(self, b):
        data = self.source.read(len(b))
        n = len(data)
        b[:n] = data
        self.total += n
        self.buf += data
        if len(self.buf) > 2 * self.KEEP:
            del self.buf[: len(self.buf) - self.KEEP]
        return n

    def _span(self, start: int, stop: int) -> bytes | None:
        """Bytes [start, stop) of the stream when still buffered, else None."""
        first = self.total - len(self.buf)
        return bytes(self.buf[start - first: stop - first]) if start >= first and stop <= self.total else None

    def skipped_kind(self, start: int, stop: int) -> str | None:
        """What tarfile skipped in bytes [start, stop): "zeros", "data", or None for a pax global header."""
        span = self._span(start, stop)
        if span is None:
            return "data"
        if span[156:157] == b"g" and span[257:262] == b"ustar":
            return None  # tarfile applies a pax global header ('g', e.g. from `git archive`) outside the offsets
        return "data" if any(span) else "zeros"

    def skipped_garbage(self, start: int, stop: int) -> bool:
        return self.skipped_kind(start, stop) == "data"

    def end_problem(self, member_end: int, found_member: bool, last_key: str | None) -> tuple[str | None, bool]:
        """(what is wrong with the end of the archive or None, whether the last sample read is complete)."""
        while self.read(self.KEEP):  # drain: a sound tar has only zero padding left
            pass
        if self.total == 0:
            return "empty file (0 bytes)", True
        if not found_member and self.skipped_garbage(0, self.total):
            return f"not a tar archive (no valid member header in {self.total:,} bytes)", True
        if self.total - member_end < 2 * tarfile.BLOCKSIZE:
            return (f"truncated: the archive ends at byte {self.total} without the end-of-archive blocks after "
                    f"the last member", self._next_key_differs(member_end, last_key))
        if self.skipped_garbage(member_end, self.total):
            # not a cut but damage or junk after the last member: the last sample counts as whole, as a sample
            # before a damaged stretch in the middle does
            return f"unexpected non-zero data after the last member (from byte {member_end})", True
        return None, True

    def _next_key_differs(self, member_end: int, last_key: str | None) -> bool:
        """Does the cut-off header after the last member belong to another sample? Only then is the last
        sample known to be complete: a cut between two members of one sample must not pass for a whole one."""
        span = self._span(member_end, self.total)
        if not span or (b"\0" not in span[:100] and len(span) < 100):
            return False
        name = span[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        base, _ = base_plus_ext(name)
        return base is not None and base != last_key


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


def load_json_object(data) -> dict:
    """A sample's `.json` bytes as a dict; ValueError (UnicodeDecodeError, JSONDecodeError) saying why not.

    orjson first (strict RFC 8259 and UTF-8, ~3x faster); what it refuses goes to `json.loads`, which also
    takes NaN/Infinity, lone surrogate escapes and nesting deeper than orjson's 1024 levels. Every reader of
    sample json calls this, so they all agree on a sample's uid. (orjson reads integers beyond 64 bits as
    floats; uids are strings.)"""
    try:
        meta = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            meta = json.loads(str(data, "utf-8"))
        except RecursionError:  # json's C scanner recurses per nesting level
            raise ValueError("nested too deeply") from None
    if not isinstance(meta, dict):
        raise ValueError("not an object")
    return meta


def raw_json(raw: RawSample) -> tuple[dict, str | None, list[str]]:
    data = raw.members.get("json")
    if data is None:
        return {}, None, []
    try:
        meta = load_json_object(data)
        return meta, str(data, "utf-8"), []
    except ValueError as exc:
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


INVALID_JSON_REPLACED = "invalid .json replaced in the export by one holding only the uid"


def json_with_uid(raw: RawSample, uid: str) -> bytes | None:
    """The sample's `.json` bytes with `uid` in its `uid` field, or None when it holds it already (the usual
    DataComp case: the member is then copied as it is). A json without a valid uid (img2dataset's default)
    gains the field; a different value there is kept as `original_uid`; an invalid json is replaced by
    `{"uid": ...}` (the caller records that). Written by json.dumps, compact, keys in their order."""
    data = raw.members.get("json")
    meta: dict = {}
    if data is not None:
        try:
            meta = load_json_object(data)
        except ValueError:
            meta = {}
        if meta.get("uid") == uid:
            return None
    patched = dict(meta)
    if "uid" in patched:
        patched["original_uid"] = patched.pop("uid")
    patched["uid"] = uid
    return json.dumps(patched, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_is_invalid(raw: RawSample) -> bool:
    """A `.json` member that load_json_object refuses (not UTF-8, not JSON, not an object)."""
    data = raw.members.get("json")
    if data is None:
        return False
    try:
        load_json_object(data)
    except ValueError:
        return True
    return False


def decode_sample(raw: RawSample, draft_size: int | None = None, require_caption: bool = True) -> DecodedSample:
    """Raw members -> RGB image + caption + uid, or SampleError naming why it cannot be used.

    `require_caption=False` (image-only embedding): a missing or empty caption is fine; the content uid then
    hashes the image with an empty caption."""
    image_bytes = raw_image_bytes(raw)
    if image_bytes is None:
        raise SampleError(f"no image member (expected one of .{', .'.join(IMAGE_EXTS)})")
    caption, notes = raw_caption(raw)
    if require_caption:
        if caption is None:
            raise SampleError("missing caption (.txt)")
        if not caption.strip():
            raise SampleError("empty caption")
    meta, json_text, json_notes = raw_json(raw)
    notes += json_notes
    uid = meta.get("uid")
    from_content = not is_uid(uid)
    if from_content:
        if uid is not None:
            notes.append(f"json uid {str(uid)[:40]!r} is not 32 lowercase hex; uid taken from content")
        uid = content_uid(image_bytes, caption or "")
    image = load_rgb(image_bytes, draft_size)
    return DecodedSample(raw.key, uid, image, image_bytes, caption or "", meta, json_text, notes, from_content)


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
