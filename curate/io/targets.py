"""NormSim targets: the embeddings X that a pool is compared against.

The paper's ImageNet-1k target is the image embeddings of ImageNet's training images (Wang et al. 2024; its
reference code loads DataComp's released `in1k_clip_vit_l14_{0..4}.pt`). `--target` accepts:
* an embedding directory made by `curate embed` (image-only tables of `curate embed --images-only`
  included): its `image_embedding` column, which must come from the pool's teacher;
* a `.npy` file holding an (M, D) float matrix;
* a `.pt` file (read with torch.load(weights_only=True)) holding an (M, D) tensor, or a dict with one under
  `image_features` (the layout of the reference's released IN-1k files), `image_embedding` or `embedding`;
* a `.parquet` file with a vector column `image_embedding` or `embedding` (a list of floats, as `curate embed`
  and other tools write, or the binary float16 vectors of curate 0.1);
* a directory of such `.npy` / `.pt` / `.parquet` files (e.g. the five `in1k_clip_vit_l14_*.pt`): their rows
  concatenated in natural name order (…_2 before …_10);
* `imagenet-text`: not images, but the 1000 ImageNet class names through the pool's teacher's text tower; a
  model runs to make it, so it is built by curate/stages/normsim/targets.py, not read here;
* `none`: no target, only with `--p 2d` (the pool is its own target).
Every target is returned L2-normalised as float32; rows that are not finite or have zero norm are an error.
A square symmetric matrix of trace 1 (the second moment of unit vectors, such as the reference's
`variance_imagenet_1k.pt`) is refused: the target is the embeddings themselves.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.tables import (LEGACY_ERRORS_SUFFIX, EmbeddingPool, TeacherInfo, is_vector_type, read_meta,
                              vectors_to_numpy)

IMAGENET_TEXT = "imagenet-text"
BUILTIN_TARGETS = (IMAGENET_TEXT, "none")
PARQUET_COLUMNS = ("image_embedding", "embedding")
PT_KEYS = ("image_features", "image_embedding", "embedding")  # image_features: DataComp / reference IN-1k files
MATRIX_SUFFIXES = (".npy", ".pt", ".parquet")
IMAGE_EMBEDDINGS, TEXT_PROMPTS = "image_embeddings", "text_prompts"  # the target kinds recorded in metadata


def imagenet_help(where: str = "--target imagenet", image: str = "--target in1k_emb",
                  text: str = "--target imagenet-text") -> str:
    """The one-line answer to the retired `imagenet` target (CLI spelling by default, a recipe's on request)."""
    return (f"{where}: the paper's ImageNet target is the image embeddings of ImageNet's training images; embed "
            f"your ImageNet train folder with `curate embed DIR --images-only --out in1k_emb` and pass `{image}` "
            f"(or use `{text}` for the 1000 class prompts through the teacher's text tower)")


@dataclass(frozen=True)
class Target:
    """A loaded target: the (M, D) float32 L2-normalised matrix and where it came from."""

    matrix: np.ndarray
    kind: str        # IMAGE_EMBEDDINGS or TEXT_PROMPTS
    format: str      # embedding_dir, npy, pt, parquet, files_dir or imagenet-text
    source: str      # the resolved path, or imagenet-text
    files: int       # files read (0 for imagenet-text)

    def meta(self) -> dict:
        """What a score table records about its target (target_sha256: the normalised float32 matrix)."""
        return {"target_kind": self.kind, "target_format": self.format, "target_path": self.source,
                "target_files": self.files, "target_rows": int(len(self.matrix)),
                "target_sha256": matrix_digest(self.matrix)}


def matrix_digest(matrix: np.ndarray) -> str:
    """The first 16 hex digits of the sha256 of a target matrix's bytes (its identity in metadata and layouts)."""
    return hashlib.sha256(np.ascontiguousarray(matrix).tobytes()).hexdigest()[:16]


def target_cache_dir() -> Path:
    """Where built targets (imagenet-text) are cached: $CURATE_CACHE, else ~/.cache/curate."""
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate")


def load_target(spec: str | Path, pool_teacher: TeacherInfo | None) -> np.ndarray:
    """The target embeddings read from `spec` as an (M, D) float32 L2-normalised matrix (see module docstring)."""
    return open_target(spec, pool_teacher).matrix


def open_target(spec: str | Path, pool_teacher: TeacherInfo | None) -> Target:
    """The target read from `spec` with its kind and source (see module docstring).

    `pool_teacher` (when given) fixes the expected dimension, and for embedding directories the teacher that
    must have made the target.
    """
    text = str(spec)
    if text == "none":
        raise CurateError("--target none has no embeddings: it is only valid with --p 2d (the pool is its own target)")
    if text == IMAGENET_TEXT:  # a programming error, not a user's: normsim's targets build it
        raise CurateError("--target imagenet-text is embedded with the teacher, not read from a file: open it "
                          "with curate.stages.normsim.targets.normsim_target")
    path = Path(text)
    if text == "imagenet" and not path.exists():
        raise CurateError(imagenet_help())
    if path.is_dir():
        matrix, fmt, files = _from_directory(path, pool_teacher)
    elif path.is_file() and path.suffix in MATRIX_SUFFIXES:
        matrix, fmt, files = _from_file(path, pool_teacher), path.suffix[1:], 1
    elif not path.exists():
        raise CurateError(f"{path}: target not found; give an embedding directory, a .npy, .pt or .parquet matrix "
                          "(or a directory of them), `imagenet-text`, or `none` with --p 2d")
    else:
        raise CurateError(f"{path}: unsupported target file; use a .npy, .pt or .parquet matrix or an embedding "
                          "directory")
    if pool_teacher is not None and matrix.shape[1] != pool_teacher.embed_dim:
        raise CurateError(f"{path}: target embeddings have dimension {matrix.shape[1]} but the pool's have "
                          f"{pool_teacher.embed_dim}; embed the target with the pool's teacher "
                          f"({pool_teacher.model}/{pool_teacher.pretrained})")
    return Target(normalise_rows(matrix, str(path)), IMAGE_EMBEDDINGS, fmt, str(path.resolve()), files)


def normalise_rows(matrix: np.ndarray, name: str, block_rows: int = 1 << 16) -> np.ndarray:
    """L2-normalise rows as float32; an empty matrix, non-finite or zero-norm rows are errors naming `name`.

    Row blocks keep the float64 temporaries small (the 1.28 M x 768 ImageNet target would need 7.9 GB for
    each whole-matrix one); every row's arithmetic is the same as on the whole matrix."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise CurateError(f"{name}: expected a non-empty (M, D) matrix of target embeddings, got shape {matrix.shape}")
    blocks = [slice(start, start + block_rows) for start in range(0, len(matrix), block_rows)]
    norms = np.concatenate([np.linalg.norm(matrix[rows].astype(np.float64), axis=1) for rows in blocks])
    bad = np.concatenate([~np.isfinite(matrix[rows]).all(axis=1) for rows in blocks]) | (norms == 0)
    if bad.any():
        raise CurateError(f"{name}: {int(bad.sum())} target rows are not finite or have zero norm "
                          f"(first at row {int(np.flatnonzero(bad)[0])}); remove them")
    out = np.empty_like(matrix)
    for rows in blocks:
        out[rows] = matrix[rows] / norms[rows, None]
    return out


def _from_directory(path: Path, pool_teacher: TeacherInfo | None) -> tuple[np.ndarray, str, int]:
    """(matrix, format, files) of a directory: a `curate embed` output (every table with its teacher record,
    nothing else), or else the rows of its .npy / .pt / .parquet files in natural name order."""
    files = sorted((f for f in path.iterdir() if f.is_file() and f.suffix in MATRIX_SUFFIXES
                    and not f.name.startswith(".") and not f.name.endswith(LEGACY_ERRORS_SUFFIX)), key=natural_key)
    if not files:
        raise CurateError(f"{path}: no target files in this directory (an embedding directory from `curate embed`, "
                          "or .npy / .pt / .parquet matrices)")
    if all(f.suffix == ".parquet" and "teacher" in read_meta(f) for f in files):
        return _from_embedding_dir(path, pool_teacher), "embedding_dir", len(files)
    parts = [_from_file(f, pool_teacher) for f in files]  # as stored (fp16 stays fp16 until the one copy below)
    widths = {part.shape[1] for part in parts}
    if len(widths) > 1:
        raise CurateError(f"{path}: its files hold embeddings of different widths {sorted(widths)}; a target is "
                          "one teacher's embeddings")
    matrix = np.empty((sum(len(part) for part in parts), widths.pop()), np.float32)
    row = 0
    for part in parts:
        matrix[row:row + len(part)] = part
        row += len(part)
    return matrix, "files_dir", len(files)


def natural_key(path: Path) -> list:
    """Sort key putting `name_2` before `name_10` (the reference's `in1k_clip_vit_l14_{0..4}.pt` order)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _from_file(path: Path, pool_teacher: TeacherInfo | None) -> np.ndarray:
    loader = {".npy": _from_npy, ".pt": _from_pt}.get(path.suffix)
    matrix = loader(path) if loader else _from_parquet(path, pool_teacher)
    _refuse_second_moment(matrix, path)
    return matrix


def _refuse_second_moment(matrix: np.ndarray, path: Path) -> None:
    """A symmetric (D, D) matrix of trace 1 is the second moment (1/N) Σ x xᵀ of unit vectors (the reference's
    `variance_*.pt`), not D embeddings: used as rows it would score silently wrong."""
    square = matrix.shape[0] == matrix.shape[1] and matrix.shape[0] > 1
    if square and np.allclose(matrix, matrix.T) and abs(float(np.trace(matrix.astype(np.float64))) - 1.0) < 1e-2:
        raise CurateError(f"{path}: a symmetric {matrix.shape[0]}x{matrix.shape[1]} matrix looks like a second "
                          "moment (variance) matrix, not embeddings; pass the target's embeddings themselves "
                          "(e.g. the in1k_clip_vit_l14_*.pt feature files)")


def _from_embedding_dir(path: Path, pool_teacher: TeacherInfo | None) -> np.ndarray:
    target_pool = EmbeddingPool(path)
    if pool_teacher is not None and target_pool.teacher != pool_teacher:
        t = target_pool.teacher
        raise CurateError(f"{path}: target was embedded with {t.model}/{t.pretrained} (dim {t.embed_dim}), the pool with "
                          f"{pool_teacher.model}/{pool_teacher.pretrained} (dim {pool_teacher.embed_dim}); "
                          "embed the target with the pool's teacher")
    parts = [chunk["image_embedding"] for _, chunk in target_pool.iter_chunks(["image_embedding"], dtype=np.float32)]
    return np.concatenate(parts) if parts else np.empty((0, target_pool.dim), np.float32)


def _from_npy(path: Path) -> np.ndarray:
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CurateError(f"{path}: cannot read as a .npy matrix ({exc})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise CurateError(f"{path}: expected a 2-D numeric (M, D) matrix, got dtype {matrix.dtype} shape {matrix.shape}")
    return matrix


def _from_pt(path: Path) -> np.ndarray:
    """An (M, D) tensor, or a dict holding one under PT_KEYS, from torch.load(weights_only=True)."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler raises many types for bad or unsafe bytes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CurateError(f"{path}: not a tensor file that torch.load(weights_only=True) reads ({first}); save the "
                          "embeddings as a tensor, or a dict of tensors, with torch.save") from None
    if isinstance(data, dict):
        key = next((k for k in PT_KEYS if k in data), None)
        if key is None:
            raise CurateError(f"{path}: a dict without the embeddings under {', '.join(PT_KEYS)} (has "
                              f"{', '.join(map(str, list(data)[:8]))})")
        data = data[key]
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or not data.is_floating_point():
        what = f"a {data.ndim}-D {data.dtype} tensor" if isinstance(data, torch.Tensor) else type(data).__name__
        raise CurateError(f"{path}: expected a 2-D float (M, D) tensor of embeddings, got {what}")
    return data.numpy() if data.dtype in (torch.float16, torch.float32, torch.float64) else data.float().numpy()


def _from_parquet(path: Path, pool_teacher: TeacherInfo | None) -> np.ndarray:
    meta = read_meta(path)
    if pool_teacher is not None and "teacher" in meta:
        t = TeacherInfo.from_dict(meta["teacher"])
        if t != pool_teacher:
            raise CurateError(f"{path}: target was embedded with {t.model}/{t.pretrained}, the pool with "
                              f"{pool_teacher.model}/{pool_teacher.pretrained}; embed the target with the pool's teacher")
    schema = pq.read_schema(path)
    column = next((c for c in PARQUET_COLUMNS if c in schema.names), None)
    if column is None:
        raise CurateError(f"{path}: no `image_embedding` or `embedding` column (has {', '.join(schema.names)})")
    field_type = schema.field(column).type
    if not is_vector_type(field_type):
        raise CurateError(f"{path}: column `{column}` must hold vectors (a list of floats, as `curate embed` "
                          f"writes), got {field_type}")
    return vectors_to_numpy(pq.read_table(path, columns=[column]).column(column), np.float32, path)
