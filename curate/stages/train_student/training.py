"""Training a student: the objectives (InfoNCE, AdaCL, PCME++), a fresh seeded model, the fixed budget, the saved
checkpoint, training JSON and loss curve."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from curate.config import check_config
from curate.errors import CurateError
from curate.io.atomic import atomic_path, write_text_atomic
from curate.stages.train_student import CHECKPOINT_NAME, CURVE_PNG, LOSS_NAMES, TRAIN_JSON, StudentConfig
from curate.stages.train_student.data import PairSet


def budget_of(config: StudentConfig, train_pairs: int) -> dict:
    """The compute budget of a run: samples seen = steps x batch size (the same for every subset)."""
    return {"steps": int(config.steps), "batch_size": int(config.batch_size),
            "samples_seen": int(config.steps) * int(config.batch_size), "train_pairs": int(train_pairs),
            "epochs": round(int(config.steps) * int(config.batch_size) / max(1, train_pairs), 3)}


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


def save_student(trained: TrainedStudent, out_dir: str | Path, data: dict, plot: bool = True) -> dict:
    """Write student.pt (weights_only-loadable), train.json and (with `plot`) curve.png into `out_dir`; returns
    train.json."""
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
    if plot:
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
