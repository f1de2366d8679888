"""A small, reusable contrastive training loop for open_clip models on pre-decoded tensors.

Used by `curate teacher train` (curate-tiny on a synth corpus) and by the student trainer (`curate train`).
Deterministic on CPU for a seed: parameters are initialised by the caller under `torch.manual_seed`, batches
come from a seeded `torch.Generator`, augmentation draws from the same generator.

Losses are pluggable: `loss` is a name in `LOSSES` (a factory `(**loss_kwargs) -> objective`, extended with
`register_loss`) or an objective object itself. An objective is a callable
`(img_emb, txt_emb, logit_scale) -> scalar loss` on L2-normalised embeddings, with optional hooks that the
loop calls when present:
  objective.parameters() -> iterable of extra trainable tensors (e.g. PCME's uncertainty heads)
  objective.encode(model, images, tokens) -> (img_emb, txt_emb)   replaces the default normalised encoding
  objective.after_step(img_emb, txt_emb, step)                    sees the batch's detached embeddings
                                                                  after each update (e.g. a memory bank)
  objective.extra_log() -> dict                                   merged into each history entry
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from curate.run.threads import torch_threads
from curate.errors import CurateError

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100 (Radford et al. 2021, Sec. 2.5)


def infonce_loss(img_emb: torch.Tensor, txt_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3): mean of the image->text and text->image
    cross-entropies of logits s * I T^T with the matching pair as target."""
    logits = logit_scale * img_emb @ txt_emb.t()
    target = torch.arange(len(img_emb), device=img_emb.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


LOSSES: dict[str, Callable[..., Any]] = {
    "infonce": lambda **kwargs: infonce_loss,
}


def register_loss(name: str, factory: Callable[..., Any]) -> None:
    """Add a loss: `factory(**loss_kwargs)` returns an objective (see module docstring)."""
    LOSSES[name] = factory


def make_objective(loss: str | Callable, **loss_kwargs) -> Callable:
    if callable(loss):
        return loss
    if loss not in LOSSES:

        raise CurateError(f"--loss {loss!r}: unknown loss; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[loss](**loss_kwargs)


# ---------------------------------------------------------------- batches and augmentation

def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless seeded batches: a fresh permutation per epoch, the short remainder of an epoch dropped."""
    batch_size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def augment_batch(images: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Light, caption-preserving augmentation: random flips and a random shift of up to `max_shift` px
    (edge-replicated). Our captions say nothing about position or orientation, so both are label-safe."""
    n, _, h, w = images.shape
    flip_h = torch.rand(n, generator=generator) < 0.5
    flip_v = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip_h[:, None, None, None], images.flip(3), images)
    out = torch.where(flip_v[:, None, None, None], out.flip(2), out)
    if max_shift > 0:
        padded = F.pad(out, (max_shift,) * 4, mode="replicate")
        dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
        dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return out


# ---------------------------------------------------------------- optimiser

def _param_groups(model: torch.nn.Module, extra: list[torch.Tensor], weight_decay: float) -> list[dict]:
    """open_clip's convention: no weight decay on gains, biases, embeddings' 1-d params and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
         else decay).append(p)
    no_decay += [p for p in extra if p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """LR multiplier: linear warmup over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------- the loop

def train_clip(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, steps: int, batch_size: int,
               lr: float, seed: int, loss: str | Callable = "infonce", log_every: int = 10, *,
               augment: bool = False, weight_decay: float = 0.1, warmup: int | None = None,
               num_threads: int | None = None, device: str | torch.device = "cpu",
               loss_kwargs: dict | None = None, on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` (an open_clip CLIP, parameters already initialised) contrastively in place.

    images: [N,3,H,W] preprocessed float tensor; tokens: [N,L] token ids, row i captions image i.
    Returns the history: one dict per logged step (and the last) with step, loss, lr, logit_scale.
    """
    if len(images) != len(tokens):
        raise ValueError(f"{len(images)} images but {len(tokens)} captions")
    if len(images) < 2:
        raise ValueError("contrastive training needs at least 2 pairs")
    device = torch.device(device)
    objective = make_objective(loss, **(loss_kwargs or {}))
    extra_params = list(objective.parameters()) if hasattr(objective, "parameters") else []
    encode = getattr(objective, "encode", None) or _encode_normalised
    after_step = getattr(objective, "after_step", None)
    extra_log = getattr(objective, "extra_log", None)
    warmup = max(1, steps // 10) if warmup is None else max(1, warmup)

    generator = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))  # for anything stochastic inside the model or the objective
    model.to(device).train()
    for extra in extra_params:
        extra.data = extra.data.to(device)
    # fused AdamW: one kernel for all parameters; on CPU ~8x faster than the per-tensor loop (the 49k-row token
    # embedding dominates), and deterministic.
    optimizer = torch.optim.AdamW(_param_groups(model, extra_params, weight_decay), lr=lr, betas=(0.9, 0.98),
                                  eps=1e-6, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    batches = batch_indices(len(images), batch_size, generator)
    history: list[dict] = []
    with torch_threads(num_threads):
        for step in range(steps):
            idx = next(batches)
            batch_images = images[idx]
            if augment:
                batch_images = augment_batch(batch_images, generator)
            batch_images, batch_tokens = batch_images.to(device), tokens[idx].to(device)
            img_emb, txt_emb = encode(model, batch_images, batch_tokens)
            logit_scale = model.logit_scale.exp()
            value = objective(img_emb, txt_emb, logit_scale)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            current_lr = schedule.get_last_lr()[0]
            schedule.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            if after_step is not None:
                after_step(img_emb.detach(), txt_emb.detach(), step)
            if (step + 1) % max(1, log_every) == 0 or step == steps - 1 or step == 0:
                entry = {"step": step + 1, "loss": float(value.detach()), "lr": float(current_lr),
                         "logit_scale": float(model.logit_scale.detach().exp())}
                if extra_log is not None:
                    entry.update(extra_log())
                history.append(entry)
                if on_log is not None:
                    on_log(entry)
    model.eval()
    return history


def _encode_normalised(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
