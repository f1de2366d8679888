"""`curate train`: train a small student CLIP from scratch on a subset, with a fixed budget; and student eval.

The closed loop of DataComp in miniature: a subset is judged by the model it trains. Every student of a
comparison sees the same number of samples (steps x batch size), whatever the subset size, so a smaller or
cleaner subset is not given more or less compute. The budget is written into the training JSON and the
checkpoint, and `curate compare` refuses to tabulate runs whose budgets differ.

Inputs: a `curate filter` output directory (or a DataComp `uids.npy`) plus the shards it was selected from
(`--corpus`), or shards that hold only the kept samples (`curate export` output). The kept samples are
decoded once into one image tensor and one token tensor (students are trained on small synth corpora; this
stage is the miniature experiment, not a web-scale trainer).

Losses (`--loss`):
  infonce  CLIP's symmetric InfoNCE (curate.models.train.infonce_loss);
  adacl    AdaCL's Algorithm 1 (curate.metrics.adacl.adacl_loss): per step and direction, clone discovery on
           the batch (salient scores, labelled GDA, anchor) and the margins m1, m2 tuned from the previous
           step's (1/τ, 0 at the start); in-batch negatives only (the paper adds a momentum memory bank);
  pcme     PCME++ probabilistic heads (curate.metrics.pcme.PCMEHeads) on the student's normalised embeddings,
           trained jointly with the towers by the closed-form (CSD) match loss; the heads are saved in the
           checkpoint, and evaluation uses their normalised means μ.

Evaluation (`evaluate_student`): zero-shot top-1 accuracy on a synth target set (class prompts from its
classes.json through the student's text tower, averaged over templates) and retrieval R@1 (both directions,
curate.metrics.retrieval) on a held-out synth split.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from curate.errors import CurateError
from curate.io.atomic import atomic_path, write_text_atomic
from curate.io.shards import SampleError, decode_sample, expand_shards, iter_shard, sample_uid

LOSS_NAMES = ("infonce", "adacl", "pcme")
CHECKPOINT_NAME = "student.pt"
TRAIN_JSON = "train.json"
CURVE_PNG = "curve.png"
EVAL_JSON = "eval.json"
EVAL_BATCH = 256


@dataclass
class StudentConfig:
    model: str = "curate-student"
    loss: str = "infonce"
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup: int | None = None        # None: steps // 10 (curate.models.train)
    augment: bool = True
    seed: int = 0
    threads: int | None = None       # torch intra-op threads; None: torch's default
    device: str = "cpu"
    log_every: int = 10
    adacl_eps: float = 0.1           # AdaCL: a perfect match (s = 1) gets probability 1 - eps
    pcme_vib: float = 1e-4           # PCME: weight of the KL(N(μ, σ²) ‖ N(0, I)) regulariser
    pcme_hidden: int = 64


def budget_of(config: StudentConfig, train_pairs: int) -> dict:
    """The compute budget of a run: samples seen = steps x batch size (the same for every subset)."""
    return {"steps": int(config.steps), "batch_size": int(config.batch_size),
            "samples_seen": int(config.steps) * int(config.batch_size), "train_pairs": int(train_pairs),
            "epochs": round(int(config.steps) * int(config.batch_size) / max(1, train_pairs), 3)}


# ---------------------------------------------------------------- data

@dataclass
class PairSet:
    """Decoded, preprocessed training pairs in corpus order."""

    uids: list[str]
    images: torch.Tensor             # [N,3,H,W]
    tokens: torch.Tensor             # [N,L]
    truth: list[str | None]          # the synth ground truth per pair (None outside synth corpora)
    labels: list[list | None] = field(default_factory=list)  # the synth multi-hot attribute labels, if any
    skipped: dict = field(default_factory=dict)   # reason -> count
    shards: int = 0

    def select(self, uids: Sequence[str] | set[str]) -> "PairSet":
        """The pairs whose uid is in `uids`, in corpus order."""
        wanted = set(uids)
        rows = [i for i, u in enumerate(self.uids) if u in wanted]
        index = torch.as_tensor(rows, dtype=torch.long)
        return PairSet([self.uids[i] for i in rows], self.images[index], self.tokens[index],
                       [self.truth[i] for i in rows], [self.labels[i] for i in rows], dict(self.skipped), self.shards)

    def label_matrix(self) -> np.ndarray | None:
        """(N, L) uint8 multi-hot labels, or None when some pair has none (then no PMRP)."""
        if not self.labels or any(not isinstance(r, list) for r in self.labels) \
                or len({len(r) for r in self.labels}) != 1:
            return None
        return np.asarray(self.labels, dtype=np.uint8)

    def truth_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.truth:
            key = str(t) if t is not None else "unknown"
            counts[key] = counts.get(key, 0) + 1
        return counts


def load_pairs(shards, preprocess: Callable, tokenizer: Callable, uids: set[str] | None = None,
               on_problem: Callable[[str, str], None] | None = None) -> PairSet:
    """Decode every usable sample of `shards` (or only those whose uid is in `uids`) into tensors.

    Unusable samples are skipped and counted by reason (and passed to `on_problem`); a uid seen twice keeps
    its first sample, as in `curate embed`.
    """
    urls = expand_shards(shards)
    skipped: dict[str, int] = {}

    def problem(key: str, reason: str) -> None:
        short = reason.split(" (")[0].split(":")[0]
        skipped[short] = skipped.get(short, 0) + 1
        if on_problem is not None:
            on_problem(key, reason)

    images, captions, kept_uids, truth, labels = [], [], [], [], []
    seen: set[str] = set()
    for url in urls:
        for raw in iter_shard(url, problem):
            if uids is not None and sample_uid(raw) not in uids:
                continue
            try:
                sample = decode_sample(raw)
                pixels = preprocess(sample.image)
            except SampleError as exc:
                problem(raw.key, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a transform failure is a per-sample skip
                problem(raw.key, f"preprocess failed ({type(exc).__name__}: {exc})")
                continue
            if sample.uid in seen:
                problem(raw.key, "duplicate uid; kept the first")
                continue
            seen.add(sample.uid)
            images.append(pixels)
            captions.append(sample.caption)
            kept_uids.append(sample.uid)
            meta = sample.meta if isinstance(sample.meta, dict) else {}
            truth.append(meta.get("truth"))
            labels.append(meta.get("labels"))
    if not images:
        return PairSet([], torch.zeros(0), torch.zeros(0, dtype=torch.long), [], [], skipped, len(urls))
    return PairSet(kept_uids, torch.stack(images), tokenizer(captions), truth, labels, skipped, len(urls))


def read_subset_uids(subset: str | Path) -> list[str]:
    """The uids of a `curate filter` output directory (its uids.npy) or of a DataComp `.npy` subset file."""
    from curate.io.uids import read_uid_npy, subset_file

    return read_uid_npy(subset_file(subset))


def is_subset_spec(source: str | Path) -> bool:
    path = Path(source)
    return (path.is_dir() and (path / "uids.npy").is_file()) or (path.is_file() and path.suffix == ".npy")


# ---------------------------------------------------------------- objectives (see curate.models.train)

class AdaCLObjective:
    """AdaCL as a train_clip objective: the margins of both directions live here and carry across steps."""

    def __init__(self, eps: float):
        from curate.metrics.adacl import MarginState

        if not 0.0 < eps < 1.0:
            raise CurateError(f"adacl eps {eps}: need 0 < eps < 1")
        self.eps = float(eps)
        self.state = MarginState()

    def __call__(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        from curate.metrics.adacl import adacl_loss

        return adacl_loss(img, txt, logit_scale, eps=self.eps, state=self.state)

    def extra_log(self) -> dict:
        """The margins in use after this step and how they were reached, per direction (t2i with a suffix)."""
        entry = {}
        for direction, step in self.state.last.items():
            suffix = "" if direction == "i2t" else "_t2i"
            entry.update({f"adacl_m1{suffix}": step.m1, f"adacl_m2{suffix}": step.m2,
                          f"adacl_anchor{suffix}": step.anchor, f"adacl_p_hat_u{suffix}": step.p_hat_u,
                          f"adacl_potential_clones{suffix}": step.n_potential,
                          f"adacl_kept{suffix}": step.reason})
        return entry


class PCMEObjective:
    """PCME++ heads on the student's normalised embeddings, trained with the towers (CSD match loss)."""

    def __init__(self, dim: int, hidden: int, vib_weight: float):
        from curate.metrics.pcme import PCMEHeads

        self.heads = PCMEHeads(dim, hidden)
        self.vib_weight = float(vib_weight)

    def parameters(self):
        return list(self.heads.parameters())

    def __call__(self, img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        self.heads.to(img.device)
        return self.heads.loss(img, txt, kind="csd", vib_weight=self.vib_weight)

    def extra_log(self) -> dict:
        return {"pcme_a": float(self.heads.a.detach()), "pcme_b": float(self.heads.b.detach())}


def make_student_objective(config: StudentConfig, embed_dim: int):
    if config.loss == "infonce":
        return "infonce"
    if config.loss == "adacl":
        return AdaCLObjective(config.adacl_eps)
    if config.loss == "pcme":
        return PCMEObjective(embed_dim, config.pcme_hidden, config.pcme_vib)
    raise CurateError(f"--loss {config.loss!r}: choose one of {', '.join(LOSS_NAMES)}")


# ---------------------------------------------------------------- training

def check_config(config: StudentConfig) -> None:
    if config.loss not in LOSS_NAMES:
        raise CurateError(f"--loss {config.loss!r}: choose one of {', '.join(LOSS_NAMES)}")
    if config.steps < 1:
        raise CurateError(f"--steps must be >= 1, got {config.steps}")
    if config.batch_size < 2:
        raise CurateError(f"--batch-size must be >= 2 (contrastive batches), got {config.batch_size}")
    if not config.lr > 0:
        raise CurateError(f"--lr must be > 0, got {config.lr}")


def new_student(config: StudentConfig) -> tuple[torch.nn.Module, dict]:
    """A randomly initialised student (seeded by config.seed) and its open_clip config."""
    from curate.models.teacher import create_model, model_config

    arch = model_config(config.model)
    torch.manual_seed(int(config.seed))
    return create_model(config.model, arch), arch


def student_transforms(model_name: str):
    """(preprocess, tokenizer) of a student architecture, without building trained weights."""
    import open_clip

    from curate.models.teacher import eval_transform, model_config, register_configs

    register_configs()
    arch = model_config(model_name)
    with torch.random.fork_rng(devices=[]):
        probe, _ = new_student(StudentConfig(model=model_name))
    context = int(arch.get("text_cfg", {}).get("context_length", probe.context_length))
    return eval_transform(probe), open_clip.get_tokenizer(model_name, context_length=context)


@dataclass
class TrainedStudent:
    model: torch.nn.Module
    arch: dict
    config: StudentConfig
    history: list[dict]
    budget: dict
    heads_state: dict | None
    seconds: float


def train_on_pairs(pairs: PairSet, config: StudentConfig, on_log: Callable[[dict], None] | None = None) -> TrainedStudent:
    """Train a fresh student on `pairs` for exactly config.steps x config.batch_size samples."""
    from curate.models.train import train_clip

    check_config(config)
    n = len(pairs.uids)
    if n < config.batch_size:
        raise CurateError(f"the training set has {n} pairs, fewer than --batch-size {config.batch_size}; every "
                          "step must see a full batch for the budget (steps x batch size) to hold: lower "
                          "--batch-size or keep more samples")
    started = time.perf_counter()
    model, arch = new_student(config)
    objective = make_student_objective(config, int(arch["embed_dim"]))
    history = train_clip(model, pairs.images, pairs.tokens, steps=config.steps, batch_size=config.batch_size,
                         lr=config.lr, seed=config.seed, loss=objective, log_every=config.log_every,
                         augment=config.augment, weight_decay=config.weight_decay, warmup=config.warmup,
                         num_threads=config.threads, device=config.device, on_log=on_log)
    model.to("cpu")
    heads_state = None
    if isinstance(objective, PCMEObjective):
        objective.heads.to("cpu")
        heads_state = {k: v.detach().clone() for k, v in objective.heads.state_dict().items()}
    return TrainedStudent(model, arch, config, history, budget_of(config, n), heads_state,
                          time.perf_counter() - started)


def save_student(trained: TrainedStudent, out_dir: str | Path, data: dict) -> dict:
    """Write student.pt (weights_only-loadable), train.json and curve.png into `out_dir`; returns train.json."""
    from curate.models.teacher import save_checkpoint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"student": asdict(trained.config), "budget": trained.budget, "history": trained.history,
             "training": data}
    if trained.heads_state is not None:
        extra["pcme_heads"] = {"state_dict": trained.heads_state, "dim": int(trained.arch["embed_dim"]),
                               "hidden": int(trained.config.pcme_hidden)}
    save_checkpoint(trained.model, out / CHECKPOINT_NAME, trained.config.model, trained.arch, extra)
    record = {"checkpoint": str(out / CHECKPOINT_NAME), "config": asdict(trained.config), "budget": trained.budget,
              "data": data, "history": trained.history, "train_seconds": round(trained.seconds, 3),
              "final_loss": trained.history[-1]["loss"] if trained.history else None,
              "torch_threads": trained.config.threads or torch.get_num_threads()}
    write_text_atomic(out / TRAIN_JSON, json.dumps(record, indent=2, sort_keys=True) + "\n")
    plot_curve(trained.history, out / CURVE_PNG, title=f"{trained.config.model} {trained.config.loss} "
                                                        f"seed {trained.config.seed}")
    return record


def plot_curve(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Training loss (and the learned logit scale) against the step, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    other = ax.twinx()
    other.plot(steps, [h["logit_scale"] for h in history], color="tab:orange", label="logit scale")
    other.set_ylabel("logit scale (1/τ)", color="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def train_student(source: str, out_dir: str | Path, config: StudentConfig, corpus: str | None = None,
                  heldout: str | None = None, target: str | None = None,
                  on_log: Callable[[dict], None] | None = None) -> dict:
    """`curate train`: decode the kept samples, train, save; evaluate when `heldout` or `target` is given."""
    from curate.models.teacher import resolve_device

    check_config(config)
    config = replace(config, device=str(resolve_device(config.device)))
    preprocess, tokenizer = student_transforms(config.model)
    started = time.perf_counter()
    if is_subset_spec(source):
        if corpus is None:
            raise CurateError(f"{source}: a subset holds uids only; give --corpus SHARDS (the shards it was "
                              "selected from) to read the images and captions")
        wanted = read_subset_uids(source)
        pairs = load_pairs(corpus, preprocess, tokenizer, set(wanted))
        missing = len(set(wanted)) - len(pairs.uids)
        if missing:
            raise CurateError(f"{source}: {missing} of the subset's {len(set(wanted))} uids are not usable samples "
                              f"of --corpus {corpus}; give the shards the subset was selected from")
        data = {"subset": str(source), "corpus": str(corpus)}
    else:
        if corpus is not None:
            raise CurateError(f"{source}: not a subset directory (no uids.npy), so --corpus is not used; give "
                              "either a subset with --corpus or the exported shards alone")
        pairs = load_pairs(source, preprocess, tokenizer)
        data = {"shards": str(source)}
    decode_seconds = time.perf_counter() - started
    data.update({"pairs": len(pairs.uids), "truth_counts": pairs.truth_counts(), "skipped": pairs.skipped,
                 "decode_seconds": round(decode_seconds, 3)})
    trained = train_on_pairs(pairs, config, on_log)
    record = save_student(trained, out_dir, data)
    if heldout is not None or target is not None:
        eval_data = load_eval_data(preprocess, tokenizer, heldout, target)
        result = evaluate_model(trained.model, trained.heads_state, eval_data, config.device)
        write_text_atomic(Path(out_dir) / EVAL_JSON, json.dumps(result, indent=2, sort_keys=True) + "\n")
        record["eval"] = result
    return record


# ---------------------------------------------------------------- evaluation

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
