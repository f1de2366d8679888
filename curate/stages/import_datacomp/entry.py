"""`curate import datacomp`'s entry: convert each metadata shard and its .npz into an embedding table (`run`)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import check_config
from curate.errors import CurateError
from curate.io.tables import TeacherInfo, build_embedding_table, errors_path, table_files, write_table_atomic
from curate.io.uids import UID_RE
from curate.run.markers import Markers
from curate.stages.import_datacomp import ImportDatacompConfig, ImportDatacompResult

STAGE = "import"
ARCHS = {
    "l14": TeacherInfo(model="ViT-L-14", pretrained="openai", embed_dim=768, logit_scale=100.0),
    "b32": TeacherInfo(model="ViT-B-32", pretrained="openai", embed_dim=512, logit_scale=100.0),
}
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("reason", pa.string()), ("kind", pa.string())])


def metadata_files(metadata_dir: Path) -> list[Path]:
    if not metadata_dir.is_dir():
        raise CurateError(f"{metadata_dir}: not a directory; give DataComp's metadata directory "
                          "(NNNNNNNN.parquet next to NNNNNNNN.npz)")
    files = table_files(metadata_dir)
    if not files:
        raise CurateError(f"{metadata_dir}: no *.parquet metadata files")
    return files


def load_embeddings(npz_path: Path, arch: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The (image, text) arrays of one shard's `.npz`, checked against the parquet's row count."""
    if not npz_path.is_file():
        raise CurateError(f"{npz_path}: missing; DataComp keeps each shard's embeddings in a .npz beside its .parquet")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            names = list(npz.files)
            wanted = [f"{arch}_img", f"{arch}_txt"]
            absent = [w for w in wanted if w not in names]
            if absent:
                raise CurateError(f"{npz_path}: no array {', '.join(absent)} (it has {', '.join(names) or 'none'}); "
                                  f"is --arch {arch} right?")
            image, text = npz[wanted[0]], npz[wanted[1]]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CurateError(f"{npz_path}: not a readable .npz ({exc})") from None
    dim = ARCHS[arch].embed_dim
    for name, array in (("img", image), ("txt", text)):
        if array.ndim != 2 or array.shape[1] != dim:
            raise CurateError(f"{npz_path}: {arch}_{name} has shape {array.shape}, expected ({rows}, {dim})")
        if array.shape[0] != rows:
            raise CurateError(f"{npz_path}: {arch}_{name} has {array.shape[0]} rows but {npz_path.with_suffix('.parquet').name} "
                              f"has {rows}; the files must come from the same DataComp shard")
    return image, text


def normalised_and_usable(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalise in float32; returns (normalised, usable) where unusable rows are non-finite or zero."""
    matrix = matrix.astype(np.float32)
    norms = np.linalg.norm(matrix, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    matrix[usable] /= norms[usable, None]
    return matrix, usable


def import_shard(parquet_path: Path, arch: str, out_dir: Path) -> tuple[int, int]:
    """Convert one metadata shard; returns (rows written, rows skipped)."""
    try:
        table = pq.read_table(parquet_path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise CurateError(f"{parquet_path}: not a readable Parquet file ({exc})") from None
    names = table.schema.names
    if "uid" not in names:
        raise CurateError(f"{parquet_path}: no `uid` column (columns: {', '.join(names)}); is this DataComp metadata?")
    caption_column = "text" if "text" in names else "caption" if "caption" in names else None
    if caption_column is None:
        raise CurateError(f"{parquet_path}: no `text` (caption) column (columns: {', '.join(names)})")
    image, text = load_embeddings(parquet_path.with_suffix(".npz"), arch, table.num_rows)
    uids = [u if u is None else str(u) for u in table.column("uid").to_pylist()]
    raw_keys = table.column("key").to_pylist() if "key" in names else uids
    keys = [str(k) if k is not None else "" for k in raw_keys]
    captions = [c or "" for c in table.column(caption_column).to_pylist()]
    image, image_ok = normalised_and_usable(image)
    text, text_ok = normalised_and_usable(text)
    problems = []
    keep = np.zeros(table.num_rows, dtype=bool)
    for row, uid in enumerate(uids):
        reason = ("uid is not 32 lowercase hex" if uid is None or not UID_RE.fullmatch(uid) else
                  "image embedding is NaN, infinite or zero" if not image_ok[row] else
                  "text embedding is NaN, infinite or zero" if not text_ok[row] else None)
        if reason:
            problems.append((keys[row], uid, reason, "skipped"))
        else:
            keep[row] = True
    rows = np.flatnonzero(keep)
    teacher = ARCHS[arch]
    out = build_embedding_table([uids[i] for i in rows], [keys[i] for i in rows], [captions[i] for i in rows],
                                image[rows], text[rows], dim=teacher.embed_dim)
    stem = parquet_path.stem
    record = errors_path(out_dir, stem)
    if problems:
        errors = pa.Table.from_pylist([dict(zip(ERRORS_SCHEMA.names, p)) for p in problems], schema=ERRORS_SCHEMA)
        write_table_atomic(errors, record, meta={"shard": str(parquet_path), "stage": STAGE})
    elif record.exists():
        record.unlink()
    write_table_atomic(out, out_dir / f"{stem}.parquet",
                       meta={"teacher": teacher.to_dict(), "shard": str(parquet_path), "source": "datacomp",
                             "arch": arch, "counts": {"read": table.num_rows, "embedded": len(rows),
                                                      "skipped": len(problems)}})
    return len(rows), len(problems)


def run(metadata_dir: str | Path, out_dir: str | Path, cfg: ImportDatacompConfig = ImportDatacompConfig(),
        progress=None) -> ImportDatacompResult:
    """Convert every not-yet-done metadata shard of `metadata_dir` into `out_dir`. `progress(n)`: n more rows
    read."""
    check_config(cfg)
    arch = cfg.arch
    files = metadata_files(Path(metadata_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markers = Markers(out, STAGE)
    report = ImportDatacompResult(shards=len(files), out_dir=str(out))
    for f in files:
        report.files.append(str(out / f"{f.stem}.parquet"))
        if markers.is_done(f.stem):
            done = markers.info(f.stem)
            if done.get("arch") != arch:
                raise CurateError(f"{out}: shard {f.stem} was imported with --arch {done.get('arch')}; "
                                  f"use another --out for --arch {arch}")
            report.skipped_done += 1
            continue
        rows, skipped = import_shard(f, arch, out)
        markers.mark(f.stem, {"arch": arch, "source": str(f), "rows": rows, "skipped": skipped})
        report.imported += 1
        report.rows += rows
        report.skipped_rows += skipped
        if progress is not None:
            progress(rows + skipped)
    return report
