"""AdaCL loss: InfoNCE whose positive logit is rescaled and shifted so the modulating anchor reaches 1 - ε.

"Discovering Clone Negatives via Adaptive Contrastive Learning for Image-Text Matching" (Pan et al., ICLR 2025).

Setting. A batch of B pairs with unit embeddings v_i, t_i, s_ij = <v_i, t_j>, τ = 1 / logit_scale and logits
l_ij = s_ij / τ. AdaCL changes only the positive logit, by a scale m1 and a shift m2:

    l'_ii = m1 · s_ii / τ - m2                 (negatives l_ij, j != i, unchanged)

and minimises the cross-entropy of p̂_i = softmax(l'_i·)_i in both directions (image->text rows,
text->image columns; the diagonal is shared).

Anchor. Every pair gives two salient gaps δ = s_ii - max_{j!=i} s_ij (row) and s_ii - max_{j!=i} s_ji
(column). A two-Gaussian GDA (curate.metrics.clones.fit_gda) over the batch's gaps plus a memory bank of the
last 4096 gaps separates potential clones from salient pairs; the median gap of the potential clones,
smoothed across batches by momentum 0.99 (δ̄ <- 0.99 δ̄ + 0.01 δ_batch), is the anchor gap. The anchor pair u
is the batch pair (in the direction) whose gap is closest to δ̄. Let a = s_uu and
N_u = log Σ_{j != u} exp(l_uj) (the log-sum-exp of its negatives in that direction).

Closed form. The paper states its two equations in prose; we write the two conditions explicitly.
  (1) target:  p̂_u = σ(l'_uu - N_u) = 1 - ε   <=>   l'_uu = L* := N_u + log((1 - ε) / ε)
  (2) pivot:   a perfect match keeps its logit, l'(s = 1) = 1/τ   <=>   m1/τ - m2 = 1/τ   <=>   m2 = (m1 - 1)/τ
  (the paper's m1 carries the factor 1/(anchor - 1), i.e. a pivot at s = 1, too.)
Substituting (2) into (1):  m1·a/τ - (m1 - 1)/τ = L*  <=>  m1·(a - 1) = τ·L* - 1, so

    m1 = (1 - τ·L*) / (1 - a),      m2 = (m1 - 1) / τ.

If the anchor already sits at the target (L* = a/τ) this gives m1 = 1, m2 = 0: plain InfoNCE. If it is below
the target (a clone-like anchor, L* > a/τ) then m1 < 1, m2 < 0: positives below s = 1 are lifted, softening the
push against clone negatives; above the target, m1 > 1 tightens. m1 must stay positive (the logit must still
grow with s), which needs a < 1 and τ·L* < 1; outside [M1_MIN, M1_MAX] m1 is clamped (recorded as `clamped`)
and the anchor then reaches the target only approximately. Margins are computed from detached values: no
gradient flows through m1, m2.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from curate.metrics.clones import GDAFit, fit_gda

M1_MIN, M1_MAX = 0.05, 20.0
# Per batch the GDA is warm-started from the previous batch's fit and runs a few EM iterations: the fit keeps
# improving across batches (like online EM) at a small fixed cost per training step.
GDA_STEP_ITERS, GDA_STEP_TOL = 25, 1e-7


def adacl_margins(anchor_sim: float, anchor_neg_lse: float, logit_scale: float,
                  eps: float) -> tuple[float, float, bool]:
    """Closed-form (m1, m2, clamped) putting the anchor's adjusted positive probability at 1 - eps.

    Derived in this module's docstring (AdaCL, Pan et al. 2025, Alg. 1 line 5): m1 = (1 - τL*)/(1 - a),
    m2 = (m1 - 1)/τ with L* = N_u + log((1-ε)/ε).
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    tau = 1.0 / float(logit_scale)
    target = float(anchor_neg_lse) + math.log((1.0 - eps) / eps)
    if 1.0 - anchor_sim < 1e-6:
        return 1.0, 0.0, True  # the anchor is a perfect match: no line through it and s = 1
    m1 = (1.0 - tau * target) / (1.0 - float(anchor_sim))
    clamped = not (M1_MIN <= m1 <= M1_MAX)
    m1 = min(max(m1, M1_MIN), M1_MAX)
    return m1, (m1 - 1.0) / tau, clamped


class AdaCLBank:
    """Memory bank of the last `size` salient gaps (FIFO) and the momentum-smoothed anchor gap.

    Also keeps the previous GDA fit to warm-start the next one, and `last`: what the latest call decided.
    """

    def __init__(self, size: int = 4096, momentum: float = 0.99):
        if size < 0 or not 0.0 <= momentum < 1.0:
            raise ValueError("bank size must be >= 0 and momentum in [0, 1)")
        self.size = int(size)
        self.momentum = float(momentum)
        self.buffer = np.zeros(self.size, dtype=np.float64)
        self.count = 0          # how many gaps are stored (<= size)
        self.cursor = 0         # next slot to overwrite
        self.anchor_gap: float | None = None
        self.gda: GDAFit | None = None
        self.last: dict = {}

    def gaps(self) -> np.ndarray:
        return self.buffer[:self.count].copy()

    def push(self, gaps: np.ndarray) -> None:
        gaps = np.asarray(gaps, dtype=np.float64).ravel()
        if self.size == 0:
            return
        gaps = gaps[-self.size:]
        idx = (self.cursor + np.arange(len(gaps))) % self.size
        self.buffer[idx] = gaps
        self.cursor = int((self.cursor + len(gaps)) % self.size)
        self.count = int(min(self.size, self.count + len(gaps)))

    def update_anchor(self, batch_anchor_gap: float) -> float:
        """δ̄ <- momentum · δ̄ + (1 - momentum) · δ_batch (the first batch sets δ̄)."""
        if self.anchor_gap is None:
            self.anchor_gap = float(batch_anchor_gap)
        else:
            self.anchor_gap = self.momentum * self.anchor_gap + (1.0 - self.momentum) * float(batch_anchor_gap)
        return self.anchor_gap

    def state_dict(self) -> dict:
        """Plain types only (safe for torch.load(weights_only=True))."""
        return {"size": self.size, "momentum": self.momentum, "gaps": self.buffer[:self.count].tolist(),
                "cursor": self.cursor, "anchor_gap": self.anchor_gap}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(int(state["size"]), float(state["momentum"]))
        gaps = np.asarray(state["gaps"], dtype=np.float64)
        self.buffer[:len(gaps)] = gaps
        self.count = len(gaps)
        self.cursor = int(state["cursor"])
        self.anchor_gap = None if state["anchor_gap"] is None else float(state["anchor_gap"])


def _scale_value(logit_scale) -> float:
    return float(logit_scale.detach().reshape(-1)[0]) if torch.is_tensor(logit_scale) else float(logit_scale)


def batch_gap_records(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-pair records of both directions from B x B logits (float64 numpy, detached):
    gap (in similarity units), positive similarity s_ii and the negatives' log-sum-exp N (in logits)."""
    with torch.no_grad():
        lg = logits.detach().to(torch.float64)
        b = lg.shape[0]
        eye = torch.eye(b, dtype=torch.bool, device=lg.device)
        neg = lg.masked_fill(eye, float("-inf"))
        pos = lg.diagonal()
        gap = torch.cat([pos - neg.max(dim=1).values, pos - neg.max(dim=0).values])
        lse = torch.cat([torch.logsumexp(neg, dim=1), torch.logsumexp(neg, dim=0)])
        return {"gap_logit": gap.cpu().numpy(), "pos_logit": torch.cat([pos, pos]).cpu().numpy(),
                "neg_lse": lse.cpu().numpy()}


def choose_margins(logits: torch.Tensor, logit_scale: float, eps: float, bank: AdaCLBank) -> dict:
    """Anchor selection (GDA on batch + bank gaps, median of potential clones, momentum) and closed-form
    margins for one batch; updates the bank. AdaCL (Pan et al. 2025) Alg. 1 lines 2-5."""
    rec = batch_gap_records(logits)
    tau = 1.0 / logit_scale
    gaps = rec["gap_logit"] * tau  # back to similarity units (the bank is scale-free across training)
    pos_sim = rec["pos_logit"] * tau
    pooled = np.concatenate([gaps, bank.gaps()])
    info = {"m1": 1.0, "m2": 0.0, "clamped": False, "anchor_index": -1, "anchor_direction": None,
            "anchor_gap": None, "anchor_sim": None, "n_potential_clones": 0}
    batch_anchor = None
    if len(pooled) >= 4 and np.ptp(pooled) > 0:
        fit = fit_gda(pooled, max_iter=GDA_STEP_ITERS, tol=GDA_STEP_TOL, init=bank.gda)
        bank.gda = fit
        post = fit.posterior_clone(pooled)
        clones = pooled[post > 0.5]
        info["n_potential_clones"] = int(len(clones))
        if len(clones):
            batch_anchor = float(np.median(clones))
    bank.push(gaps)
    if batch_anchor is None and bank.anchor_gap is None:
        bank.last = info
        return info  # nothing to anchor on yet: plain InfoNCE
    target_gap = bank.update_anchor(batch_anchor) if batch_anchor is not None else bank.anchor_gap
    u = int(np.argmin(np.abs(gaps - target_gap)))
    m1, m2, clamped = adacl_margins(pos_sim[u], rec["neg_lse"][u], logit_scale, eps)
    b = len(gaps) // 2
    info.update(m1=m1, m2=m2, clamped=clamped, anchor_index=u % b, anchor_gap=float(target_gap),
                anchor_sim=float(pos_sim[u]), anchor_direction="i2t" if u < b else "t2i")
    bank.last = info
    return info


def adacl_logits(img: torch.Tensor, txt: torch.Tensor, logit_scale, m1: float, m2: float) -> torch.Tensor:
    """B x B logits with the positive (diagonal) replaced by m1 · s_ii / τ - m2 (AdaCL Eq. 3, our form)."""
    logits = logit_scale * (img @ txt.T)
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    return torch.where(eye, m1 * logits - m2, logits)


def info_nce_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3): mean of CE over rows and columns of s/τ."""
    logits = logit_scale * (img @ txt.T)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def adacl_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale, eps: float = 0.1,
               bank: AdaCLBank | None = None, margins: tuple[float, float] | None = None) -> torch.Tensor:
    """AdaCL loss: L_ada = E[H(y, p̂)] in both directions, p̂ from `adacl_logits` (AdaCL Alg. 1 line 6).

    img, txt: (B, D) L2-normalised embeddings of B matching pairs (row i of each is pair i);
    logit_scale: 1/τ as a float or (learnable, already exponentiated) tensor, as open_clip's CLIP returns it;
    eps: the anchor's target is 1 - eps; bank: an `AdaCLBank` kept across steps (None: a fresh one, i.e. no
    memory); margins: force (m1, m2) instead of choosing them (m1 = 1, m2 = 0 is exactly `info_nce_loss`).
    What was chosen is left in `bank.last` (m1, m2, anchor_gap, anchor_sim, anchor_index, clamped).
    """
    if img.ndim != 2 or img.shape != txt.shape or img.shape[0] < 2:
        raise ValueError("need two (B, D) tensors of the same shape with B >= 2, "
                         f"got {tuple(img.shape)}, {tuple(txt.shape)}")
    if margins is None:
        bank = bank if bank is not None else AdaCLBank()
        scale = _scale_value(logit_scale)
        info = choose_margins(logit_scale * (img @ txt.T), scale, eps, bank)
        m1, m2 = info["m1"], info["m2"]
    else:
        m1, m2 = margins
    logits = adacl_logits(img, txt, logit_scale, m1, m2)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
