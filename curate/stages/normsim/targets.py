"""The target a pool is scored against (curate.io.targets reads the files), and the one that is not a file:
`imagenet-text`, the 1000 ImageNet class names through open_clip's zero-shot prompt templates, embedded with the
pool's teacher's text tower, templates averaged per class and renormalised as in CLIP zero-shot (cached per
teacher under the cache directory)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from curate.errors import CurateError
from curate.io.atomic import atomic_path
from curate.io.tables import TeacherInfo
from curate.io.targets import IMAGENET_TEXT, TEXT_PROMPTS, Target, normalise_rows, open_target, target_cache_dir
from curate.stages.normsim import TEMPLATE_SETS


def normsim_target(spec: str | Path, pool_teacher: TeacherInfo | None, device: str = "cpu",
                   cache_dir: str | Path | None = None, templates: str = "openai") -> Target:
    """The target named by `spec`: `imagenet-text` embedded here, any other read by curate.io.targets.open_target
    (whose docstring lists the forms). `pool_teacher` (when given) fixes the expected dimension, and the teacher
    that must have made (or will make) the target."""
    if str(spec) != IMAGENET_TEXT:
        return open_target(spec, pool_teacher)
    if pool_teacher is None:
        raise CurateError("--target imagenet-text needs the pool's teacher to embed the class prompts")
    matrix = imagenet_text_target(pool_teacher, device=device, cache_dir=cache_dir, templates=templates)
    return Target(matrix, TEXT_PROMPTS, IMAGENET_TEXT, IMAGENET_TEXT, 0)


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


def imagenet_text_target(teacher: TeacherInfo, device: str = "cpu", cache_dir: str | Path | None = None,
                         templates: str = "openai") -> np.ndarray:
    """(1000, D) zero-shot class embeddings of ImageNet-1k with `teacher`'s text tower (cached per teacher)."""
    cache = Path(cache_dir) if cache_dir is not None else target_cache_dir()
    path = cache / "targets" / f"imagenet-text-{templates}-{_teacher_key(teacher, templates)}.npy"
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

    try:
        model = load_teacher(teacher.model, teacher.pretrained, device=device)
    except CurateError as exc:  # its advice names `--pretrained`, an option `normsim` does not have
        reason = str(exc).split("; ")[0].removeprefix("--pretrained ")
        raise CurateError(f"--target imagenet-text embeds the class prompts with the pool's own teacher "
                          f"{teacher.model}/{teacher.pretrained}, which cannot be loaded here ({reason}); normsim "
                          "takes no other checkpoint: give an image target instead (`curate embed DIR --images-only "
                          "--out in1k_emb` with that teacher, then --target in1k_emb; or .npy/.pt image "
                          "features)") from None
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
