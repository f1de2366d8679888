"""`curate export`: copy the samples of a subset (a DataComp `uids.npy`) into new WebDataset tar shards.

- Members are copied byte for byte (no decoding): every member of a kept sample (jpg, txt, json, ...),
  in its input order; samples in input order (shards in `expand_shards` order, samples in tar order).
- Output: OUT_DIR/00000.tar, 00001.tar, ... with `shard_size` samples each (the last may be smaller).
  Output keys are the running index of the sample in the export, 9 digits (`000000042.jpg`): input keys
  are never used in output names, so a member called `../x` or `/abs/x` cannot reach outside OUT_DIR or
  surprise a later extractor. The sample's uid travels in its `.json` `uid` field, where DataComp's tools
  look for it: a sample whose uid came from content (no valid json uid, as in img2dataset's shards) gets the
  field written into its `.json` (one is added when it has none); every other member, and the `.json` of a
  sample that holds its uid already, is copied byte for byte. Member extensions outside `[a-z0-9._-]` are
  dropped and recorded.
- Tar headers (GNU format) are deterministic (mtime 0, uid/gid 0, mode 0644, no user names): same input,
  same bytes.
- A subset uid found twice is exported once (the first occurrence); the repeat is recorded.
- Records: `missing_uids.npy` (subset uids not found in the shards, DataComp layout), `_errors/export.parquet`
  (unreadable members, corrupt shards, samples without a uid, repeats, invalid .json replaced), `sizes.json`
  (samples per output tar, the shard table that open_clip and DataComp's resharder read) and
  `export_manifest.json`, written first with `complete: false` and last with the report. A shard that cannot be opened or read at all (I/O,
  not bad data) stops the export with an error naming it; the finished tars are kept and a rerun resumes.
- Speed: shards (local files, or fsspec URLs: s3://, gs://, http://, ...) are read in pieces of
  PIECE_BYTES (4 MiB) by a reader thread; each piece is scanned (`curate.io.tar_blocks.scan_plain_tar`,
  vectorised over the headers), its complete samples' uids looked up, new headers patched in and its kept
  samples written as block ranges by a writer thread, all while the piece is in the CPU cache, with no
  per-member Python work. A sample still open at a piece's end is carried into the next piece. As long as
  the shard is plain (clean headers, nothing iter_shard would report) it stays on this path; at the first
  piece that is not (compressed, damaged, odd names or member types, an unexportable extension, a file that
  changed while read), the shard goes on in `iter_shard` from the first sample not yet committed. Both
  paths give the same bytes and records. Memory: READ_AHEAD + 2 + WRITE_BEHIND piece buffers (5 × 5 MiB),
  plus one for a sample larger than CARRY_BYTES.
- Resume: every tar is written under a temp name and renamed, so a tar under its final name is complete.
  A rerun with the same shards, subset and shard size re-reads the input but does not rewrite finished
  tars; a rerun after a complete export is a no-op. Another export's directory is refused.

Files: this module holds the options and the report (light: the command line imports it); entry.py checks the
subset and the output directory and chooses the path (`run`); local.py is the one-process export (reader and
writer threads); tasks.py the same outputs as two passes of map tasks around a small reduce; common.py what
both use (the subset index, the pieces of the fast path, the sample writers, the records).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from curate.config import option, positive

RUN_OPTIONS = ("executor", "workers", "tasks", "retries", "ray_address")


@dataclass(frozen=True)
class ExportConfig:
    shard_size: int = option(10_000, "Samples per output shard.", "--shard-size", check=positive)
    # the reference the fast path is tested and measured against, not a user's choice
    fast: bool = option(True, "Read plain shards in pieces (False: every shard through iter_shard).", cli=False,
                        recipe=False)


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
