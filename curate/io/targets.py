"""NormSim targets: the image embeddings X that a pool is compared against.

`--target` accepts:
* an embedding directory made by `curate embed` (its `image_embedding` column; same teacher as the pool),
* a `.npy` file holding an (M, D) float matrix,
* a `.parquet` file with a vector column `image_embedding` or `embedding` (fixed_size_list of floats,
  or binary float16 vectors as `curate embed` writes),
* `imagenet`: ImageNet-1k class names through open_clip's zero-shot prompt templates, embedded with the
  pool's teacher's text tower, templates averaged per class and renormalised as in CLIP zero-shot
  (cached per teacher under the cache directory),
* `none`: no target, only with `--p 2d` (the pool is its own target).
Every target is returned L2-normalised as float32; rows that are not finite or have zero norm are an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import EmbeddingPool, TeacherInfo, is_vector_type, read_meta, vectors_to_numpy

BUILTIN_TARGETS = ("imagenet", "none")
TEMPLATE_SETS = ("openai", "simple")
PARQUET_COLUMNS = ("image_embedding", "embedding")


def default_cache_dir() -> Path:
    """$CURATE_CACHE, else ~/.cache/curate."""
    return Path(os.environ.get("CURATE_CACHE") or Path.home() / ".cache" / "curate")


def load_target(spec: str | Path, pool_teacher: TeacherInfo | None, device: str = "cpu",
                cache_dir: str | Path | None = None, templates: str = "openai") -> np.ndarray:
    """The target embeddings named by `spec` as an (M, D) float32 L2-normalised matrix (see module docstring).

    `pool_teacher` (when given) fixes the expected dimension, and for embedding directories and imagenet
    the teacher that must have made (or will make) the target.
    """
    text = str(spec)
    if text == "none":
        raise CurateError("--target none has no embeddings: it is only valid with --p 2d (the pool is its own target)")
    if text == "imagenet":
        if pool_teacher is None:
            raise CurateError("--target imagenet needs the pool's teacher to embed the class prompts")
        return imagenet_target(pool_teacher, device=device, cache_dir=cache_dir, templates=templates)
    path = Path(text)
    if path.is_dir():
        matrix = _from_embedding_dir(path, pool_teacher)
    elif path.suffix == ".npy" and path.is_file():
        matrix = _from_npy(path)
    elif path.suffix == ".parquet" and path.is_file():
        matrix = _from_parquet(path, pool_teacher)
    elif not path.exists():
        raise CurateError(f"{path}: target not found; give an embedding directory, a .npy or .parquet matrix, "
                          "`imagenet`, or `none` with --p 2d")
    else:
        raise CurateError(f"{path}: unsupported target file; use a .npy or .parquet matrix or an embedding directory")
    if pool_teacher is not None and matrix.shape[1] != pool_teacher.embed_dim:
        raise CurateError(f"{path}: target embeddings have dimension {matrix.shape[1]} but the pool's have "
                          f"{pool_teacher.embed_dim}; embed the target with the pool's teacher "
                          f"({pool_teacher.model}/{pool_teacher.pretrained})")
    return normalise_rows(matrix, str(path))


def normalise_rows(matrix: np.ndarray, name: str) -> np.ndarray:
    """L2-normalise rows as float32; an empty matrix, non-finite or zero-norm rows are errors naming `name`."""
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise CurateError(f"{name}: expected a non-empty (M, D) matrix of target embeddings, got shape {matrix.shape}")
    bad = ~np.isfinite(matrix).all(axis=1)
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    bad |= norms == 0
    if bad.any():
        raise CurateError(f"{name}: {int(bad.sum())} target rows are not finite or have zero norm "
                          f"(first at row {int(np.flatnonzero(bad)[0])}); remove them")
    return (matrix / norms[:, None]).astype(np.float32)


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
        raise CurateError(f"{path}: column `{column}` must be a fixed_size_list of floats or binary float16 "
                          f"vectors (as `curate embed` writes), got {field_type}")
    return vectors_to_numpy(pq.read_table(path, columns=[column]).column(column), np.float32, path)


# ---------------------------------------------------------------- imagenet

def imagenet_prompts(templates: str = "openai") -> tuple[list[str], list]:
    """ImageNet-1k class names and the prompt templates (open_clip's zero-shot metadata)."""
    from open_clip import zero_shot_metadata as z

    if templates not in TEMPLATE_SETS:
        raise CurateError(f"unknown template set {templates!r}; use one of {', '.join(TEMPLATE_SETS)}")
    chosen = z.OPENAI_IMAGENET_TEMPLATES if templates == "openai" else z.SIMPLE_IMAGENET_TEMPLATES
    return list(z.IMAGENET_CLASSNAMES), list(chosen)


def _teacher_key(teacher: TeacherInfo, templates: str) -> str:
    """Cache key: the teacher, and the checkpoint file's size and mtime when `pretrained` is a local file."""
    parts = {"teacher": teacher.to_dict(), "templates": templates}
    checkpoint = Path(teacher.pretrained)
    if teacher.pretrained not in ("", "none") and checkpoint.is_file():
        st = checkpoint.stat()
        parts["checkpoint"] = [str(checkpoint.resolve()), st.st_size, st.st_mtime_ns]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def imagenet_target(teacher: TeacherInfo, device: str = "cpu", cache_dir: str | Path | None = None,
                    templates: str = "openai") -> np.ndarray:
    """(1000, D) zero-shot class embeddings of ImageNet-1k with `teacher`'s text tower (cached per teacher)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "targets" / f"imagenet-{templates}-{_teacher_key(teacher, templates)}.npy"
    if path.exists():
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (1000, teacher.embed_dim) and np.isfinite(cached).all():
            return cached.astype(np.float32, copy=False)
    classnames, prompt_templates = imagenet_prompts(templates)
    matrix = embed_class_prompts(teacher, classnames, prompt_templates, device)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, matrix)
    return matrix


def embed_class_prompts(teacher: TeacherInfo, classnames: list[str], templates: list, device: str = "cpu",
                        batch_size: int = 1000) -> np.ndarray:
    """CLIP zero-shot class embeddings: mean over templates of the normalised text embeddings, renormalised."""
    import torch

    from curate.models import load_teacher

    model = load_teacher(teacher.model, teacher.pretrained, device=device)
    info = getattr(model, "info", None)
    if info is not None and (info.embed_dim != teacher.embed_dim
                             or not math.isclose(info.logit_scale, teacher.logit_scale, rel_tol=1e-5)):
        raise CurateError(f"teacher {teacher.model}/{teacher.pretrained} now loads with dim {info.embed_dim} and "
                          f"logit_scale {info.logit_scale:g}, but the pool was embedded with dim {teacher.embed_dim} "
                          f"and logit_scale {teacher.logit_scale:g}; use the checkpoint that made the pool")
    model_device = getattr(model, "device", torch.device(device))
    prompts = [template(name) for name in classnames for template in templates]
    parts = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            tokens = model.tokenizer(prompts[start:start + batch_size])
            if isinstance(tokens, torch.Tensor):
                tokens = tokens.to(model_device)
            emb = model.encode_text(tokens)
            emb = emb.float().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb, np.float32)
            parts.append(emb)
    per_prompt = normalise_rows(np.concatenate(parts), f"{teacher.model} text embeddings")
    per_class = per_prompt.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return normalise_rows(per_class, f"{teacher.model} ImageNet class embeddings")
