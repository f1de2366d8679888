"""AdaCL, Algorithm 1: clone-negative discovery (salient scores, labelled GDA, anchor) and the margins m1, m2.

"Discovering Clone Negatives via Adaptive Contrastive Learning for Image-Text Matching" (Pan, Dong & Yang,
ICLR 2025). Pure math on arrays (numpy for the discovery, torch for the loss).

Notation. One direction of a batch of N pairs is a similarity matrix S (N x N), S[i, j] = s_ij = the cosine
of query i and candidate j, positives on the diagonal: image->text is S = V Tᵀ, text->image its transpose.
τ = 1 / logit_scale, ℓ_ij = s_ij / τ the negative logits, Σ_i = Σ_{j≠i} exp(ℓ_ij).

Line 2  salient score g_i = s_ii - max_{j≠i} s_ij; i⁺ = argmax g, i⁻ = argmin g (the first index on ties).
        S_sln = {s_{i⁺j} : j ≠ i⁺} (salient negatives), S_cln = {s_{i⁻j} : j ≠ i⁻} (potential clone negatives).
Line 3  GDA with labelled classes: the clone class C ~ N(μ_c, σ_c²) fitted to S_cln, the non-clone class
        C̄ ~ N(μ_c̄, σ_c̄²) fitted to S_sln (maximum likelihood: the mean and the population standard deviation),
        priors π_c and π_c̄ = 1 - π_c; by Bayes' rule
          p(C|s) = 1 / (1 + (π_c̄/π_c)(σ_c/σ_c̄) exp[(s-μ_c)²/(2σ_c²) - (s-μ_c̄)²/(2σ_c̄²)]).
        S̄ = {s_ij, i ≠ j : p(C|s_ij) > p(C̄|s_ij)}. The anchor pair (u, v) ∈ S̄ is the one whose gap
        δ_uv = s_uu - s_uv is the median of the gaps over S̄ (the lower median, so that it names one pair; the
        first pair in row-major order on ties); anchor = s_uu, Σ_anchor = Σ_u.
Line 4  p̂_u = exp[m1(anchor - m2)] / (exp[m1(anchor - m2)] + Σ_anchor) with the current margins.
Line 5  m1 <- log(ε p̂_u / ((1-ε)(1-p̂_u))) / (anchor - 1),   m2 <- anchor + log((1-p̂_u) / (p̂_u Σ_anchor)) / m1,
        so that the anchor keeps p̂_u and a perfect match s = 1 (against the anchor's negatives) gets 1 - ε:
          m1(anchor - m2) = log(p̂_u Σ_anchor / (1 - p̂_u)),   m1(1 - m2) = log((1 - ε) Σ_anchor / ε).
Line 6  p̂_i = exp[m1(s_ii - m2)] / (exp[m1(s_ii - m2)] + Σ_i); the loss is the cross-entropy of p̂ in both
        directions, as InfoNCE. m1 = 1/τ, m2 = 0 (the start) is plain InfoNCE.

Hand example (the one in docs/formulas.md, "AdaCL (Algorithm 1)"): τ = 0.1, anchor = 0.6 with 29 negatives at s = 0.6, so
Σ_anchor = 29 e^6 and, at the start, p̂_u = e^6 / (e^6 + 29 e^6) = 1/30. With ε = 0.1:
m1 = log((0.1/30) / (0.9 · 29/30)) / (0.6 - 1) = log(261) / 0.4 = 13.9113, m2 = 0.6 + log(e^-6) / m1 = 0.16869;
the anchor stays at 1/30 and s = 1 gets 0.9.

Both directions run the algorithm on their own matrix (S for image queries, Sᵀ for text queries) and keep
their own margins; the image->text cross-entropy uses the first, the text->image one the second.

Degenerate cases: no update is possible, the current margins are kept and the reason is recorded.
  * S̄ is empty (no negative is more likely a clone), or the GDA is undefined (a labelled set with fewer than
    2 values or zero spread, e.g. a batch of 2): there is no anchor.
  * anchor >= 1: no line through (anchor, p̂_u) and (1, 1 - ε).
  * p̂_u is 0 or 1 in floating point: its log-odds are infinite.
  * p̂_u >= 1 - ε: m1 would be <= 0, i.e. the positive logit would not grow with s.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

DIRECTIONS = ("i2t", "t2i")
# Rows of S whose posterior is evaluated at once: bounds the float64 temporaries to a few x 512 x N.
POSTERIOR_ROW_BLOCK = 512


# ---------------------------------------------------------------- line 2: salient scores

def check_square(S: np.ndarray) -> np.ndarray:
    S = np.asarray(S, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 2:
        raise ValueError(f"need a square similarity matrix with N >= 2, got shape {S.shape}")
    return S


def hardest_negatives(S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax_{j≠i} s_ij, max_{j≠i} s_ij) for every row i (the first index on ties), in row blocks."""
    S = check_square(S)
    n = len(S)
    partner = np.empty(n, dtype=np.int64)
    for r0 in range(0, n, POSTERIOR_ROW_BLOCK):
        block = S[r0:r0 + POSTERIOR_ROW_BLOCK].copy()
        rows = np.arange(len(block))
        block[rows, r0 + rows] = -np.inf
        partner[r0:r0 + len(block)] = block.argmax(axis=1)
    return partner, S[np.arange(n), partner]


def salient_scores(S: np.ndarray) -> np.ndarray:
    """g_i = s_ii - max_{j≠i} s_ij (AdaCL Alg. 1 line 2; our reading of the paper's "salient score")."""
    S = check_square(S)
    return np.diag(S) - hardest_negatives(S)[1]


def labelled_negatives(S: np.ndarray, salient: np.ndarray | None = None) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(i⁺, i⁻, S_sln, S_cln): the most and least salient rows and their negatives (AdaCL Alg. 1 line 2).
    `salient`: the rows' salient scores when the caller has them."""
    S = check_square(S)
    g = salient_scores(S) if salient is None else np.asarray(salient)
    i_plus, i_minus = int(np.argmax(g)), int(np.argmin(g))
    return i_plus, i_minus, np.delete(S[i_plus], i_plus), np.delete(S[i_minus], i_minus)


# ---------------------------------------------------------------- line 3: labelled GDA

@dataclass(frozen=True)
class LabelledGDA:
    """One Gaussian per labelled class: clone C (from S_cln) and non-clone C̄ (from S_sln), and the prior π_c."""

    mean_clone: float
    std_clone: float
    mean_salient: float
    std_salient: float
    prior_clone: float

    def log_odds(self, s: np.ndarray) -> np.ndarray:
        """log p(C̄|s) - log p(C|s) = log(π_c̄/π_c) + log(σ_c/σ_c̄) + (s-μ_c)²/(2σ_c²) - (s-μ_c̄)²/(2σ_c̄²)."""
        s = np.asarray(s, dtype=np.float64)
        const = math.log((1.0 - self.prior_clone) / self.prior_clone) + math.log(self.std_clone / self.std_salient)
        return (const + (s - self.mean_clone) ** 2 / (2.0 * self.std_clone ** 2)
                - (s - self.mean_salient) ** 2 / (2.0 * self.std_salient ** 2))

    def posterior(self, s: np.ndarray) -> np.ndarray:
        """p(C|s) = 1 / (1 + exp(log_odds)), computed without overflow (AdaCL Alg. 1 line 3)."""
        return np.exp(-np.logaddexp(0.0, self.log_odds(s)))

    def to_dict(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}


def fit_labelled_gda(clone_set: np.ndarray, salient_set: np.ndarray, prior_clone: float = 0.5) -> LabelledGDA:
    """Maximum-likelihood Gaussians of the two labelled sets (AdaCL Alg. 1 line 3).

    Raises ValueError when a set has fewer than 2 finite values or zero spread, or the prior is not in (0, 1):
    the posterior is undefined there.
    """
    if not 0.0 < float(prior_clone) < 1.0:
        raise ValueError(f"prior_clone must be in (0, 1), got {prior_clone}")
    stats = []
    for name, values in (("clone", clone_set), ("salient", salient_set)):
        values = np.asarray(values, dtype=np.float64).ravel()
        if len(values) < 2 or not np.isfinite(values).all():
            raise ValueError(f"the {name} set needs at least 2 finite similarities, got {len(values)}")
        std = float(values.std())
        if not std > 0.0:
            raise ValueError(f"the {name} set has zero spread: no Gaussian can be fitted")
        stats += [float(values.mean()), std]
    return LabelledGDA(stats[0], stats[1], stats[2], stats[3], float(prior_clone))


def gda_clone_posterior(s: np.ndarray, clone_set: np.ndarray, salient_set: np.ndarray,
                        prior_clone: float = 0.5) -> np.ndarray:
    """p(C|s) of every value in `s`, the clone class fitted to `clone_set` (S_cln) and the non-clone class to
    `salient_set` (S_sln): AdaCL Alg. 1 line 3. Raises ValueError where the GDA is undefined (see
    `fit_labelled_gda`)."""
    return fit_labelled_gda(clone_set, salient_set, prior_clone).posterior(s)


# ---------------------------------------------------------------- line 3: potential clones and the anchor

@dataclass
class Discovery:
    """What lines 2-3 of Algorithm 1 find in one direction of one batch."""

    salient: np.ndarray          # g_i
    partner: np.ndarray          # argmax_{j≠i} s_ij
    partner_sim: np.ndarray      # max_{j≠i} s_ij
    partner_prob: np.ndarray     # p(C | max_{j≠i} s_ij); NaN where the GDA is undefined
    i_plus: int
    i_minus: int
    gda: LabelledGDA | None
    n_potential: int             # |S̄|
    anchor_row: int | None       # u of the anchor pair (u, v)
    anchor_col: int | None       # v
    anchor: float | None         # s_uu
    anchor_gap: float | None     # δ_uv, the median gap over S̄
    reason: str | None           # why there is no anchor


def median_gap_pair(gaps: np.ndarray, flat_index: np.ndarray) -> int:
    """The flat index of the pair whose gap is the lower median of `gaps` (the first listed on ties)."""
    k = (len(gaps) - 1) // 2
    median = np.partition(gaps, k)[k]
    return int(flat_index[np.flatnonzero(gaps == median)[0]])


def discover_clones(S: np.ndarray, prior_clone: float = 0.5) -> Discovery:
    """Salient scores, labelled GDA, potential clone negatives S̄ and the anchor (AdaCL Alg. 1 lines 2-3)."""
    S = check_square(S)
    n = len(S)
    partner, partner_sim = hardest_negatives(S)
    pos = np.diag(S).copy()
    salient = pos - partner_sim
    i_plus, i_minus, salient_set, clone_set = labelled_negatives(S, salient)
    result = Discovery(salient, partner, partner_sim, np.full(n, np.nan), i_plus, i_minus, None, 0,
                       None, None, None, None, None)
    try:
        gda = fit_labelled_gda(clone_set, salient_set, prior_clone)
    except ValueError as exc:
        result.reason = f"no GDA: {exc}"
        return result
    result.gda = gda
    result.partner_prob = gda.posterior(partner_sim)
    gaps, flat = [], []
    for r0 in range(0, n, POSTERIOR_ROW_BLOCK):
        block = S[r0:r0 + POSTERIOR_ROW_BLOCK]
        clone = gda.log_odds(block) < 0.0       # p(C|s) > p(C̄|s)
        rows = np.arange(len(block))
        clone[rows, r0 + rows] = False          # positives are not negatives
        gaps.append((pos[r0:r0 + len(block), None] - block)[clone])   # row-major order
        flat.append(np.flatnonzero(clone) + r0 * n)
    gaps = np.concatenate(gaps)
    flat = np.concatenate(flat)
    result.n_potential = int(len(gaps))
    if len(gaps) == 0:
        result.reason = "S̄ empty: no negative is more likely a clone than not"
        return result
    u, v = divmod(median_gap_pair(gaps, flat), n)
    result.anchor_row, result.anchor_col = int(u), int(v)
    result.anchor, result.anchor_gap = float(pos[u]), float(pos[u] - S[u, v])
    return result


# ---------------------------------------------------------------- lines 4-5: the margins

def adjusted_log_odds(s, m1: float, m2: float, log_neg_sum):
    """log p̂ - log(1 - p̂) = m1(s - m2) - log Σ of p̂ = exp[m1(s - m2)] / (exp[m1(s - m2)] + Σ)."""
    return m1 * (np.asarray(s, dtype=np.float64) - m2) - np.asarray(log_neg_sum, dtype=np.float64)


def adjusted_probability(s, m1: float, m2: float, log_neg_sum):
    """p̂ = exp[m1(s - m2)] / (exp[m1(s - m2)] + Σ), from log Σ without overflow (AdaCL Alg. 1 lines 4, 6)."""
    return np.exp(-np.logaddexp(0.0, -adjusted_log_odds(s, m1, m2, log_neg_sum)))


def margin_update_problem(anchor: float, p_hat_u: float, log_neg_sum: float, eps: float) -> str | None:
    """Why Algorithm 1's line 5 has no valid result for these inputs, or None (degenerate cases, module doc).
    Every reason starts with a fixed category and a colon ("p̂_u >= 1 - ε: ...")."""
    if not 0.0 < eps < 1.0:
        return f"eps out of range: eps must be in (0, 1), got {eps}"
    if not all(math.isfinite(x) for x in (anchor, p_hat_u, log_neg_sum)):
        return "non-finite input: anchor, p̂_u or Σ_anchor is not finite"
    if anchor >= 1.0:
        return f"anchor >= 1: anchor = {anchor!r}, no line through (anchor, p̂_u) and (1, 1 - ε)"
    if not 0.0 < p_hat_u < 1.0:
        return f"p̂_u saturated: p̂_u = {p_hat_u!r}, its log-odds are infinite"
    if p_hat_u >= 1.0 - eps:
        return f"p̂_u >= 1 - ε: p̂_u = {p_hat_u:.6g}, m1 would be <= 0 (the positive logit would not grow with s)"
    return None


def reason_category(reason: str | None) -> str | None:
    """The fixed category of a no-update reason (the text before its first colon)."""
    return None if reason is None else reason.split(":")[0]


def alg1_margins_from_log_sum(anchor: float, p_hat_u: float, log_neg_sum: float, eps: float) -> tuple[float, float]:
    """`alg1_margins` with log Σ_anchor instead of Σ_anchor (logits of 100 make Σ large)."""
    problem = margin_update_problem(float(anchor), float(p_hat_u), float(log_neg_sum), float(eps))
    if problem is not None:
        raise ValueError(problem)
    log_p, log_q = math.log(p_hat_u), math.log1p(-p_hat_u)
    m1 = (math.log(eps) + log_p - math.log1p(-eps) - log_q) / (anchor - 1.0)
    m2 = anchor + (log_q - log_p - log_neg_sum) / m1
    return m1, m2


def alg1_margins(anchor: float, p_hat_u: float, neg_sum: float, eps: float) -> tuple[float, float]:
    """m1 = log(ε p̂_u / ((1-ε)(1-p̂_u))) / (anchor - 1), m2 = anchor + log((1-p̂_u) / (p̂_u Σ_anchor)) / m1
    (AdaCL Alg. 1 line 5, Eqs. 4 and 6). Raises ValueError in the degenerate cases of the module docstring."""
    if not neg_sum > 0.0:
        raise ValueError(f"Σ_anchor not positive: Σ_anchor must be > 0, got {neg_sum}")
    return alg1_margins_from_log_sum(anchor, p_hat_u, math.log(neg_sum), eps)


@dataclass
class MarginStep:
    """One application of lines 2-5 to one direction: the margins to use now, and how they were reached."""

    m1: float
    m2: float
    updated: bool                    # False: the current margins were kept (reason says why)
    reason: str | None
    anchor: float | None
    anchor_gap: float | None
    p_hat_u: float | None            # the anchor's probability under the margins before the update
    n_potential: int

    def to_dict(self) -> dict:
        return asdict(self)


def row_log_neg_sum(S: np.ndarray, row: int, logit_scale: float) -> float:
    """log Σ_row = log Σ_{j≠row} exp(s_row,j / τ)."""
    logits = np.delete(np.asarray(S[row], dtype=np.float64), row) * float(logit_scale)
    return float(np.logaddexp.reduce(logits))


def tune_margins(S: np.ndarray, logit_scale: float, current: tuple[float, float], eps: float,
                 prior_clone: float = 0.5, found: Discovery | None = None) -> MarginStep:
    """Lines 2-5 of AdaCL's Algorithm 1 on one direction of a batch: discover, anchor, p̂_u under `current`
    (m1, m2), new margins; the current margins are kept in the degenerate cases (module docstring).
    `found`: the result of `discover_clones(S, prior_clone)` when the caller already has it."""
    m1, m2 = float(current[0]), float(current[1])
    found = found if found is not None else discover_clones(S, prior_clone)
    if found.anchor is None:
        return MarginStep(m1, m2, False, found.reason, None, None, None, found.n_potential)
    log_sum = row_log_neg_sum(S, found.anchor_row, logit_scale)
    p_hat_u = float(adjusted_probability(found.anchor, m1, m2, log_sum))
    problem = margin_update_problem(found.anchor, p_hat_u, log_sum, eps)
    if problem is not None:
        return MarginStep(m1, m2, False, problem, found.anchor, found.anchor_gap, p_hat_u, found.n_potential)
    new_m1, new_m2 = alg1_margins_from_log_sum(found.anchor, p_hat_u, log_sum, eps)
    return MarginStep(new_m1, new_m2, True, None, found.anchor, found.anchor_gap, p_hat_u, found.n_potential)


# ---------------------------------------------------------------- line 6: the loss

@dataclass
class MarginState:
    """The current margins of each direction, kept across training steps (None: not started, i.e. 1/τ, 0)."""

    margins: dict = field(default_factory=lambda: {d: None for d in DIRECTIONS})
    last: dict = field(default_factory=dict)     # direction -> the latest MarginStep


def scale_value(logit_scale) -> float:
    return float(logit_scale.detach().reshape(-1)[0]) if torch.is_tensor(logit_scale) else float(logit_scale)


def check_pairs(img: torch.Tensor, txt: torch.Tensor) -> None:
    if img.ndim != 2 or img.shape != txt.shape or img.shape[0] < 2:
        raise ValueError("need two (B, D) tensors of the same shape with B >= 2, "
                         f"got {tuple(img.shape)}, {tuple(txt.shape)}")


def adacl_loss_with_margins(img: torch.Tensor, txt: torch.Tensor, logit_scale, i2t: tuple[float, float],
                            t2i: tuple[float, float]) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies of p̂ (AdaCL Alg. 1 line 6), each direction's
    positive logit m1(s_ii - m2) with its own margins, negatives s_ij/τ.

    The margins are constants for the gradient. The positive logit is written (m1 τ)·(s_ii - m2)/τ so that
    the temperature still gets its gradient through it: with m1 = 1/τ, m2 = 0 the loss and every gradient
    equal plain InfoNCE's exactly.
    """
    check_pairs(img, txt)
    scale = scale_value(logit_scale)
    sims = img @ txt.T
    logits = logit_scale * sims
    eye = torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    labels = torch.arange(len(sims), device=sims.device)
    losses = []
    for (m1, m2), matrix in ((i2t, logits), (t2i, logits.T)):
        positive = (float(m1) / scale) * (logit_scale * (sims.diagonal() - float(m2)))
        adjusted = torch.where(eye, torch.diag_embed(positive), matrix)
        losses.append(F.cross_entropy(adjusted, labels))
    return 0.5 * (losses[0] + losses[1])


def adacl_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale, eps: float = 0.1,
               state: MarginState | None = None, prior_clone: float = 0.5) -> torch.Tensor:
    """AdaCL loss (Alg. 1 lines 2-6): tune each direction's margins on this batch, then the adjusted loss.

    img, txt: (B, D) L2-normalised embeddings of B matching pairs; logit_scale: 1/τ (float or tensor);
    eps: a perfect match gets 1 - eps; state: the margins kept across steps (None: a fresh start from
    m1 = 1/τ, m2 = 0). What each direction decided is left in `state.last`.
    """
    check_pairs(img, txt)
    state = state if state is not None else MarginState()
    scale = scale_value(logit_scale)
    with torch.no_grad():
        S = (img.detach().double() @ txt.detach().double().T).cpu().numpy()
    chosen = {}
    for direction, matrix in zip(DIRECTIONS, (S, S.T)):
        current = state.margins.get(direction) or (scale, 0.0)
        step = tune_margins(matrix, scale, current, eps, prior_clone)
        state.margins[direction] = (step.m1, step.m2)
        state.last[direction] = step
        chosen[direction] = (step.m1, step.m2)
    return adacl_loss_with_margins(img, txt, logit_scale, chosen["i2t"], chosen["t2i"])


def info_nce_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, Fig. 3): mean of CE over rows and columns of s/τ."""
    logits = logit_scale * (img @ txt.T)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
