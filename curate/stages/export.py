"""`curate export`: copy the samples of a subset (a DataComp `uids.npy`) into new WebDataset tar shards.

- Members are copied byte for byte (no decoding): every member of a kept sample (jpg, txt, json, ...),
  in its input order; samples in input order (shards in `expand_shards` order, samples in tar order).
- Output: OUT_DIR/00000.tar, 00001.tar, ... with `shard_size` samples each (the last may be smaller).
  Output keys are the running index of the sample in the export, 9 digits (`000000042.jpg`): input keys
  are never used in output names, so a member called `../x` or `/abs/x` cannot reach outside OUT_DIR or
  surprise a later extractor. The sample's uid travels with it (its `.json` uid, or its unchanged image and
  caption bytes for the content uid). Member extensions outside `[a-z0-9._-]` are dropped and recorded.
- Tar headers (GNU format) are deterministic (mtime 0, uid/gid 0, mode 0644, no user names): same input,
  same bytes.
- A subset uid found twice is exported once (the first occurrence); the repeat is recorded.
- Records: `missing_uids.npy` (subset uids not found in the shards, DataComp layout), `export.errors.parquet`
  (unreadable members, corrupt shards, samples without a uid, repeats), and `export_manifest.json`, written
  first with `complete: false` and last with the report. A shard that cannot be opened or read at all (I/O,
  not bad data) stops the export with an error naming it; the finished tars are kept and a rerun resumes.
- Resume: every tar is written under a temp name and renamed, so a tar under its final name is complete.
  A rerun with the same shards, subset and shard size re-reads the input but does not rewrite finished
  tars; a rerun after a complete export is a no-op. Another export's directory is refused.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from curate.errors import CurateError
from curate.io.atomic import atomic_path, write_text_atomic
from curate.io.shards import RawSample, ShardReadError, expand_shards, iter_shard, sample_uid
from curate.io.tables import ERRORS_SUFFIX, write_table_atomic
from curate.io.uids import DATACOMP_DTYPE
from curate.stages.filter import sorted_uid_pairs

MANIFEST = "export_manifest.json"
MISSING = "missing_uids.npy"
ERRORS = f"export{ERRORS_SUFFIX}"
KEY_DIGITS = 9
SAFE_EXT = re.compile(r"[a-z0-9_][a-z0-9._-]{0,63}")
ERRORS_SCHEMA = pa.schema([("shard", pa.string()), ("key", pa.string()), ("uid", pa.string()),
                           ("reason", pa.string())])


@dataclass
class ExportReport:
    written: int = 0
    subset: int = 0
    missing: int = 0
    problems: int = 0
    input_shards: int = 0
    tars_reused: int = 0  # finished tars of an interrupted run, not rewritten
    shards: list[dict] = field(default_factory=list)  # [{"name": "00000.tar", "samples": n}, ...]
    out_dir: str = ""
    noop: bool = False  # the export was already complete


class SubsetIndex:
    """The subset's uids as sorted (high, low) uint64 halves: 16 bytes per uid, binary search per sample."""

    def __init__(self, pairs: np.ndarray):
        pairs = sorted_uid_pairs(pairs["f0"], pairs["f1"])
        if len(pairs) > 1:  # a repeated uid in the file would otherwise be reported missing
            pairs = pairs[np.concatenate([[True], pairs[1:] != pairs[:-1]])]
        self.high, self.low = pairs["f0"].copy(), pairs["f1"].copy()
        self.found = np.zeros(len(pairs), dtype=bool)

    def __len__(self) -> int:
        return len(self.high)

    def position(self, uid: str) -> int:
        """Index of `uid` in the subset, or -1."""
        high, low = np.uint64(int(uid[:16], 16)), np.uint64(int(uid[16:], 16))
        i = int(np.searchsorted(self.high, high))
        while i < len(self.high) and self.high[i] == high:
            if self.low[i] == low:
                return i
            i += 1
        return -1

    def missing_pairs(self) -> np.ndarray:
        pairs = np.empty(int((~self.found).sum()), dtype=DATACOMP_DTYPE)
        pairs["f0"], pairs["f1"] = self.high[~self.found], self.low[~self.found]
        return pairs


def subset_file(subset: str | Path) -> Path:
    path = Path(subset)
    if path.is_dir():
        path = path / "uids.npy"
    if not path.is_file():
        raise CurateError(f"{path}: no subset uid file; give the --out directory of `curate filter` "
                          "or a DataComp .npy subset")
    return path


def load_subset(path: Path) -> np.ndarray:
    """A DataComp subset file: structured `u8,u8` (high, low); any other dtype is a clear error."""
    try:
        pairs = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CurateError(f"{path}: cannot read as a .npy uid file ({exc})") from None
    if pairs.dtype != DATACOMP_DTYPE or pairs.ndim != 1:
        raise CurateError(f"{path}: uid file has dtype {pairs.dtype} and shape {pairs.shape}, expected a 1-D "
                          "array of DataComp's structured 'u8,u8' (high and low 64 bits of the 128-bit uid); "
                          "write it with `curate filter`")
    return pairs


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def kept_samples(urls: list[str], subset: SubsetIndex, problems: list[tuple]) -> Iterator[RawSample]:
    """The input samples whose uid is in the subset, in input order, each uid once."""
    for url in urls:
        try:
            yield from _kept_of_shard(url, subset, problems)
        except ShardReadError as exc:  # not bad data but an unreadable shard: stop, so that a rerun can resume
            raise CurateError(f"{exc}; export stopped at this shard (the tars written so far are complete and "
                              "kept): make the shard readable and rerun to resume") from None


def _kept_of_shard(url: str, subset: SubsetIndex, problems: list[tuple]) -> Iterator[RawSample]:
    """The kept samples of one shard (see kept_samples)."""
    for raw in iter_shard(url, lambda key, reason, url=url: problems.append((url, key, None, reason))):
        uid = sample_uid(raw)
        if uid is None:
            problems.append((url, raw.key, None, "no uid: no valid json uid and no image + caption"))
            continue
        position = subset.position(uid)
        if position < 0:
            continue
        if subset.found[position]:
            problems.append((url, raw.key, uid, "uid already exported from an earlier sample; repeat skipped"))
            continue
        subset.found[position] = True
        yield raw


def _add_sample(tar: tarfile.TarFile, key: str, raw: RawSample, problems: list[tuple]) -> None:
    for ext, data in raw.members.items():
        if not SAFE_EXT.fullmatch(ext):
            problems.append((raw.shard, raw.key, None, f"member extension {ext[:80]!r} is not [a-z0-9._-]; not exported"))
            continue
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def _check_out_dir(out: Path, config: dict) -> dict | None:
    """The manifest of an earlier run of this same export (None when there is none); else an error."""
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise CurateError(f"{manifest_path}: unreadable ({exc}); delete {out} and export again") from None
        if manifest.get("config") != config:
            raise CurateError(f"{out}: holds an export of other shards, another subset or shard size "
                              f"(see {MANIFEST}); choose a new --out or delete it")
        return manifest
    if any(out.glob("*.tar")):
        raise CurateError(f"{out}: already holds .tar files that `curate export` did not write; "
                          "choose an empty --out directory")
    return None


def export_subset(shards_spec, subset: str | Path, out_dir: str | Path, shard_size: int = 10_000) -> ExportReport:
    """Write the subset's samples into OUT_DIR/NNNNN.tar (see the module docstring)."""
    if shard_size < 1:
        raise CurateError(f"--shard-size {shard_size}: must be >= 1")
    uid_file = subset_file(subset)
    pairs = load_subset(uid_file)
    urls = expand_shards(shards_spec)
    out = Path(out_dir)
    config = {"shards": urls, "subset_sha256": _file_sha256(uid_file), "shard_size": shard_size}
    out.mkdir(parents=True, exist_ok=True)
    earlier = _check_out_dir(out, config)
    if earlier is not None and earlier.get("complete"):
        return ExportReport(**{**earlier["report"], "noop": True})
    if earlier is None:
        write_text_atomic(out / MANIFEST, json.dumps({"complete": False, "config": config}, indent=2) + "\n")

    index = SubsetIndex(pairs)
    problems: list[tuple] = []
    report = ExportReport(subset=len(index), input_shards=len(urls), out_dir=str(out))
    samples = kept_samples(urls, index, problems)
    for shard_number in itertools.count():
        first = next(samples, None)
        if first is None:
            break
        group = itertools.chain([first], itertools.islice(samples, shard_size - 1))
        path = out / f"{shard_number:05d}.tar"
        start = report.written
        if path.exists():  # finished by an interrupted run of this same export: identical bytes
            report.written += sum(1 for _ in group)
            report.tars_reused += 1
        else:
            with atomic_path(path) as tmp:
                with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
                    for raw in group:
                        _add_sample(tar, f"{report.written:0{KEY_DIGITS}d}", raw, problems)
                        report.written += 1
        report.shards.append({"name": path.name, "samples": report.written - start})

    with atomic_path(out / MISSING) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, index.missing_pairs())
    report.missing = int((~index.found).sum())
    report.problems = len(problems)
    errors_path = out / ERRORS
    if problems:
        rows = [dict(zip(ERRORS_SCHEMA.names, p)) for p in problems]
        write_table_atomic(pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA), errors_path, meta={"stage": "export"})
    elif errors_path.exists():
        errors_path.unlink()
    write_text_atomic(out / MANIFEST, json.dumps({"complete": True, "config": config, "report": asdict(report)},
                                                 indent=2) + "\n")
    return report
