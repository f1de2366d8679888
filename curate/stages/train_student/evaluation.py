"""Evaluating a student: zero-shot top-1 on a synth target set and retrieval on a held-out split, of a model in
memory or of a saved checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from curate.errors import CurateError
from curate.io.shards import SampleError, decode_sample, expand_shards, iter_shard
from curate.stages.train_student import EVAL_BATCH
from curate.stages.train_student.data import load_pairs


@dataclass
class EvalData:
    """Decoded evaluation inputs, reusable across students of one architecture."""

    heldout_images: torch.Tensor | None = None
    heldout_tokens: torch.Tensor | None = None
    heldout_labels: np.ndarray | None = None      # multi-hot attribute labels (for PMRP), when present
    heldout_source: str | None = None
    target_images: torch.Tensor | None = None
    target_labels: np.ndarray | None = None       # class index per target image
    class_names: list[str] = field(default_factory=list)
    prompt_tokens: torch.Tensor | None = None     # [C*T, L], class-major
    templates: list[str] = field(default_factory=list)
    target_source: str | None = None


def read_classes(target_dir: str | Path) -> dict:
    path = Path(target_dir) / "classes.json"
    try:
        doc = json.loads(path.read_text())
        classes, templates = list(doc["classes"]), list(doc["templates"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CurateError(f"{path}: cannot read the zero-shot task ({exc}); a synth corpus has it in OUT/target/ "
                          "(`curate synth --target-samples N`)") from None
    if not classes or not templates or not all("{}" in t for t in templates):
        raise CurateError(f"{path}: needs non-empty `classes` and `templates` with a {{}} for the class name")
    return {"classes": classes, "templates": templates, "label_field": doc.get("label_field", "label")}


def load_eval_data(preprocess: Callable, tokenizer: Callable, heldout: str | None = None,
                   target: str | None = None, max_heldout: int | None = None) -> EvalData:
    data = EvalData()
    if heldout is not None:
        pairs = load_pairs(heldout, preprocess, tokenizer)
        if len(pairs.uids) < 2:
            raise CurateError(f"{heldout}: fewer than 2 usable held-out pairs; retrieval needs a gallery")
        n = len(pairs.uids) if max_heldout is None else min(max_heldout, len(pairs.uids))
        data.heldout_images, data.heldout_tokens = pairs.images[:n], pairs.tokens[:n]
        labels = pairs.label_matrix()
        data.heldout_labels = None if labels is None else labels[:n]
        data.heldout_source = str(heldout)
    if target is not None:
        task = read_classes(target)
        images, labels = [], []
        field_name = task["label_field"]
        for url in expand_shards(target):
            for raw in iter_shard(url, lambda key, reason: None):
                try:
                    sample = decode_sample(raw)
                except SampleError:
                    continue
                label = sample.meta.get(field_name) if isinstance(sample.meta, dict) else None
                if not isinstance(label, int) or not 0 <= label < len(task["classes"]):
                    continue
                images.append(preprocess(sample.image))
                labels.append(label)
        if not images:
            raise CurateError(f"{target}: no target images with a valid `{field_name}` class index")
        data.target_images = torch.stack(images)
        data.target_labels = np.asarray(labels, dtype=np.int64)
        data.class_names, data.templates = task["classes"], task["templates"]
        data.prompt_tokens = tokenizer([t.format(c) for c in task["classes"] for t in task["templates"]])
        data.target_source = str(target)
    return data


def _heads_from_state(heads_state: dict | None, dim: int, hidden: int):
    if heads_state is None:
        return None
    from curate.metrics.pcme import PCMEHeads

    heads = PCMEHeads(dim, hidden)
    heads.load_state_dict(heads_state)
    return heads.eval()


@torch.inference_mode()
def _encode(model: torch.nn.Module, heads, device: torch.device, images: torch.Tensor | None = None,
            tokens: torch.Tensor | None = None) -> np.ndarray:
    """Normalised student embeddings (PCME students: normalised head means μ), float32 numpy."""
    tensor = images if images is not None else tokens
    parts = []
    for start in range(0, len(tensor), EVAL_BATCH):
        chunk = tensor[start:start + EVAL_BATCH].to(device)
        if images is not None:
            emb = model.encode_image(chunk, normalize=True)
            if heads is not None:
                emb = heads.img(emb)[0]
        else:
            emb = model.encode_text(chunk, normalize=True)
            if heads is not None:
                emb = heads.txt(emb)[0]
        parts.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(parts).numpy()


def zero_shot_accuracy(image_emb: np.ndarray, labels: np.ndarray, prompt_emb: np.ndarray, n_classes: int) -> dict:
    """CLIP zero-shot (Radford et al. 2021, Sec. 3.1.4): class embedding = normalised mean of the normalised
    prompt embeddings over templates; prediction = argmax cosine; top-1 accuracy in percent."""
    per_class = prompt_emb.reshape(n_classes, -1, prompt_emb.shape[-1]).mean(axis=1)
    per_class /= np.linalg.norm(per_class, axis=1, keepdims=True).clip(1e-12)
    predicted = np.argmax(image_emb @ per_class.T, axis=1)
    correct = predicted == labels
    per_class_acc = [100.0 * float(correct[labels == c].mean()) if (labels == c).any() else None
                     for c in range(n_classes)]
    return {"top1": 100.0 * float(correct.mean()), "n": int(len(labels)), "per_class_top1": per_class_acc,
            "chance": 100.0 / n_classes}


def evaluate_model(model: torch.nn.Module, heads_state: dict | None, data: EvalData, device: str = "cpu",
                   pcme_hidden: int | None = None) -> dict:
    """Zero-shot accuracy and held-out retrieval of an in-memory student (see the module docstring)."""
    from curate.metrics.retrieval import retrieval_metrics

    dev = torch.device(device)
    model = model.to(dev).eval()
    dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None else None
    heads = None
    if heads_state is not None:
        hidden = pcme_hidden or int(heads_state["img.var_hidden.weight"].shape[0])
        heads = _heads_from_state(heads_state, int(heads_state["img.mean.weight"].shape[0]), hidden)
        heads = heads.to(dev)
    result: dict = {"embedding": "pcme_mean" if heads is not None else "tower", "embed_dim": dim}
    if data.target_images is not None:
        img = _encode(model, heads, dev, images=data.target_images)
        prompts = _encode(model, heads, dev, tokens=data.prompt_tokens)
        zs = zero_shot_accuracy(img, data.target_labels, prompts, len(data.class_names))
        result["zero_shot"] = {**zs, "classes": data.class_names, "templates": len(data.templates),
                               "source": data.target_source}
    if data.heldout_images is not None:
        img = _encode(model, heads, dev, images=data.heldout_images)
        txt = _encode(model, heads, dev, tokens=data.heldout_tokens)
        labels = data.heldout_labels
        ret = retrieval_metrics(img, txt, np.arange(len(txt)), labels_img=labels, labels_txt=labels)
        ret["r1_mean"] = 0.5 * (ret["i2t"]["R@1"] + ret["t2i"]["R@1"])
        ret["source"] = data.heldout_source
        result["retrieval"] = ret
    return result


def load_student(ckpt: str | Path, device: str = "cpu"):
    """(model, heads_state, checkpoint metadata) of a `curate train` checkpoint (torch.load weights_only)."""
    from curate.models.teacher import CHECKPOINT_FORMAT, load_teacher, read_checkpoint

    checkpoint = read_checkpoint(ckpt)
    meta = checkpoint.get("curate") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or "student" not in meta:
        raise CurateError(f"{ckpt}: not a student checkpoint from `curate train`")
    teacher = load_teacher(meta["model"], str(ckpt), device=device)
    heads = meta.get("pcme_heads")
    return teacher, (heads["state_dict"] if isinstance(heads, dict) else None), meta


def evaluate_student(ckpt: str | Path, heldout_shards: str | None, target_dir: str | None,
                     device: str = "cpu", max_heldout: int | None = None) -> dict:
    """Zero-shot top-1 on `target_dir` (a synth target set with classes.json) and retrieval R@1 on
    `heldout_shards` of a saved student; either may be None to skip it."""
    import open_clip

    teacher, heads_state, meta = load_student(ckpt, device)
    tokenizer = open_clip.get_tokenizer(meta["model"], context_length=teacher.context_length)
    data = load_eval_data(teacher.preprocess, tokenizer, heldout_shards, target_dir, max_heldout)
    result = evaluate_model(teacher.model, heads_state, data, device)
    result["checkpoint"] = str(ckpt)
    result["budget"] = meta.get("budget")
    return result


def summary_numbers(result: dict) -> dict:
    """The two headline numbers of an evaluation: zero-shot top-1 and mean retrieval R@1 (percent)."""
    zs = result.get("zero_shot", {}).get("top1")
    r1 = result.get("retrieval", {}).get("r1_mean")
    return {"zero_shot_top1": zs, "retrieval_r1": r1,
            "r1_i2t": result.get("retrieval", {}).get("i2t", {}).get("R@1"),
            "r1_t2i": result.get("retrieval", {}).get("t2i", {}).get("R@1"),
            "pmrp_mean": result.get("retrieval", {}).get("pmrp_mean")}
