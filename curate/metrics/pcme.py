"""Match probability and uncertainty: calibrated logistic (tier 1) and probabilistic embeddings (tier 2).

Tier 1 (no training): p(match) = σ(-a·‖v - t‖² + b) = σ(-a·(2 - 2s) + b) for unit v, t, with a, b fitted by
logistic regression on positives vs sampled negatives (`fit_match_logistic`).

Tier 2: small heads on frozen embeddings give each modality a Gaussian N(μ, diag σ²) (`ProbHead`,
`PCMEHeads`). Two match probabilities:
  * PCME ("Probabilistic Embeddings for Cross-Modal Retrieval", Chun et al., CVPR 2021, Eq. 2):
    Monte Carlo, J samples per side (J = 7 as in PCME's configs), p = (1/J²) Σ_{j,j'} σ(-a·‖z_v^j - z_t^j'‖ + b),
    trained with the soft contrastive loss (Eq. 3) and the VIB regulariser KL(N(μ, σ²) ‖ N(0, I)) (Eq. 5),
    averaged over dimensions as PCME++'s code does (`vib_penalty`);
  * PCME++ ("Improved Probabilistic Cross-Modal Embeddings", Chun, ICLR 2024, Eq. 3-4): closed-form sampled
    distance CSD = ‖μ_v - μ_t‖² + Σ_d (σ_v,d² + σ_t,d²) and p = σ(-a·CSD + b), trained with binary
    cross-entropy on all in-batch pairs (the paper's pseudo-positives and mixed-sample augmentation are not
    used here).
Both tier-2 losses average the binary cross-entropy over all B² in-batch pairs (B matches, B² - B
non-matches), as the papers do; so tier-2 p_match carries the in-batch prior (about one match in B candidates)
and ranks pairs rather than reading as even-odds probability. Tier 1 weighs positives and negatives equally
(even odds). (Balancing the tier-2 terms too was tried on the synth corpus: it drove σ² to zero for generic
captions, making uncertainty anti-correlated with noise.)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEFAULT_SAMPLES = 7  # J samples per side: PCME's configs (num_samples and n_samples_inference are 7)

# ---------------------------------------------------------------- tier 1: logistic calibration

def match_prob_from_cosine(s: np.ndarray, a: float, b: float) -> np.ndarray:
    """p(match) = σ(-a·‖v - t‖² + b) with ‖v - t‖² = 2 - 2s for unit vectors (PCME Eq. 2 with one sample,
    squared distance as in PCME++ Eq. 4)."""
    z = -a * (2.0 - 2.0 * np.asarray(s, dtype=np.float64)) + b
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow


def fit_match_logistic(s_pos: np.ndarray, s_neg: np.ndarray, ridge: float = 1e-6,
                       max_iter: int = 100, tol: float = 1e-12) -> dict:
    """Maximum-likelihood a, b of p = σ(-a·(2 - 2s) + b) (logistic regression, Newton/IRLS; Bishop PRML
    Eq. 4.99). Positives and negatives are weighted to equal total mass (a balanced prior); a tiny ridge keeps
    the optimum finite for separable data. Returns {a, b, n_iter, converged, log_loss}."""
    s_pos = np.asarray(s_pos, dtype=np.float64).ravel()
    s_neg = np.asarray(s_neg, dtype=np.float64).ravel()
    if len(s_pos) == 0 or len(s_neg) == 0:
        raise ValueError("logistic calibration needs positives and negatives")
    x = np.concatenate([2.0 - 2.0 * s_pos, 2.0 - 2.0 * s_neg])
    y = np.concatenate([np.ones(len(s_pos)), np.zeros(len(s_neg))])
    w = np.concatenate([np.full(len(s_pos), 0.5 / len(s_pos)), np.full(len(s_neg), 0.5 / len(s_neg))])
    X = np.stack([-x, np.ones_like(x)], 1)  # parameters theta = (a, b): z = -a x + b

    def objective(theta):
        z = X @ theta
        # weighted negative log-likelihood, log(1 + e^z) - y z, computed stably
        return float((w * (np.logaddexp(0.0, z) - y * z)).sum() + 0.5 * ridge * (theta @ theta))

    theta = np.array([1.0, 0.0])
    f = objective(theta)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        z = X @ theta
        p = 0.5 * (1.0 + np.tanh(0.5 * z))
        grad = X.T @ (w * (p - y)) + ridge * theta
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:  # backtracking keeps every Newton step a descent step
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f or t < 1e-8:
                break
            t *= 0.5
        done = abs(f - fc) <= tol * max(1.0, abs(f))
        theta, f = cand, fc
        if done:
            converged = True
            break
    return {"a": float(theta[0]), "b": float(theta[1]), "n_iter": it, "converged": converged, "log_loss": f}


def binary_roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC-AUC = P(score of a random positive > score of a random negative), ties counted 1/2 (the
    Mann-Whitney U statistic; Hanley & McNeil 1982, Eq. 1), from average ranks."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank of each run of ties (ranks start at 1)
    starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ---------------------------------------------------------------- tier 2: distances and probabilities

def csd_paired(mu_v: torch.Tensor, logvar_v: torch.Tensor, mu_t: torch.Tensor, logvar_t: torch.Tensor) -> torch.Tensor:
    """CSD(v_i, t_i) = ‖μ_v - μ_t‖² + Σ_d (σ_v² + σ_t²) for matching rows (PCME++, Chun 2024, Eq. 3)."""
    return ((mu_v - mu_t) ** 2).sum(-1) + logvar_v.exp().sum(-1) + logvar_t.exp().sum(-1)


def csd_pairwise(mu_v: torch.Tensor, logvar_v: torch.Tensor, mu_t: torch.Tensor,
                 logvar_t: torch.Tensor) -> torch.Tensor:
    """(B_v, B_t) matrix of CSD over all image/text pairs (PCME++, Chun 2024, Eq. 3), via one matmul."""
    sq = (mu_v ** 2).sum(-1)[:, None] + (mu_t ** 2).sum(-1)[None, :] - 2.0 * mu_v @ mu_t.T
    return sq.clamp_min(0.0) + logvar_v.exp().sum(-1)[:, None] + logvar_t.exp().sum(-1)[None, :]


def match_prob_csd(csd: torch.Tensor, a, b) -> torch.Tensor:
    """p = σ(-a·CSD + b) (PCME++, Chun 2024, Eq. 4). CSD 0.9, a = b = 5 gives σ(0.5) = 0.62246."""
    return torch.sigmoid(-a * csd + b)


def _samples(mu: torch.Tensor, logvar: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Reparameterised draws z = μ + σ ⊙ ε, shape (B, J, D) (PCME Eq. 1)."""
    device = generator.device if generator is not None else mu.device
    noise = torch.randn((mu.shape[0], n, mu.shape[1]), generator=generator, dtype=mu.dtype, device=device)
    return mu[:, None, :] + (0.5 * logvar).exp()[:, None, :] * noise.to(mu.device)


def _euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖x_i - y_j‖ over the last two dims via one matmul (fast forward and backward); the tiny floor keeps
    the gradient of the square root finite at 0."""
    sq = (x * x).sum(-1).unsqueeze(-1) + (y * y).sum(-1).unsqueeze(-2) - 2.0 * (x @ y.transpose(-1, -2))
    return (sq.clamp_min(0.0) + 1e-12).sqrt()


def mc_log_match(mu_v, logvar_v, mu_t, logvar_t, a, b, n_samples: int = DEFAULT_SAMPLES, pairwise: bool = True,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) of PCME's Monte Carlo match probability
    p = (1/J²) Σ_{j,j'} σ(-a·‖z_v^j - z_t^j'‖ + b) (PCME, Chun et al. 2021, Eq. 2), in log space.
    pairwise=True: all (B_v, B_t) pairs; False: matching rows only, shape (B,)."""
    return mc_log_match_from_samples(_samples(mu_v, logvar_v, n_samples, generator),
                                     _samples(mu_t, logvar_t, n_samples, generator), a, b, pairwise)


def mc_log_match_from_samples(zv: torch.Tensor, zt: torch.Tensor, a, b,
                              pairwise: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log(1 - p)) with p = (1/J²) Σ_{j,j'} σ(-a·‖z_v^j - z_t^j'‖ + b) for given samples
    zv (B_v, J, D), zt (B_t, J, D) (PCME, Chun et al. 2021, Eq. 2)."""
    if pairwise:
        bv, j, _ = zv.shape
        bt, jt, _ = zt.shape
        d = _euclidean(zv.reshape(bv * j, -1), zt.reshape(bt * jt, -1)).reshape(bv, j, bt, jt)
        dims = (1, 3)
    else:
        d = _euclidean(zv, zt)  # (B, J, J) per matching row
        dims = (1, 2)
    logit = -a * d + b
    log_sig = F.logsigmoid(logit)
    log_jj = math.log(zv.shape[1] * zt.shape[1])
    # log(1 - σ(x)) = log σ(x) - x: one log-sigmoid pass for both
    return (torch.logsumexp(log_sig, dim=dims) - log_jj, torch.logsumexp(log_sig - logit, dim=dims) - log_jj)


def match_prob_mc(mu_v, logvar_v, mu_t, logvar_t, a, b, n_samples: int = DEFAULT_SAMPLES, pairwise: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """PCME's Monte Carlo match probability (Chun et al. 2021, Eq. 2); see `mc_log_match`."""
    return mc_log_match(mu_v, logvar_v, mu_t, logvar_t, a, b, n_samples, pairwise, generator)[0].exp()


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_d (μ² + σ² - log σ² - 1) per row (PCME Eq. 5, the VIB term)."""
    return 0.5 * (mu ** 2 + logvar.exp() - logvar - 1.0).sum(-1)


def vib_penalty(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """VIB term as PCME++ computes it: (1/(B·D)) Σ_i Σ_d ½(μ² + σ² - log σ² - 1), the KL of PCME Eq. 5 averaged
    over rows and dimensions (pcmepp's `kl_divergence`: -0.5·(1 + log σ² - μ² - σ²).mean()), so that the weight
    means the same for any embedding width D."""
    return 0.5 * (mu ** 2 + logvar.exp() - logvar - 1.0).mean()


def _pairwise_match_loss(log_p: torch.Tensor, log_not_p: torch.Tensor) -> torch.Tensor:
    """Mean over all B² pairs of -log p_ij (i = j, a match) or -log(1 - p_ij) (i != j)."""
    eye = torch.eye(log_p.shape[0], dtype=torch.bool, device=log_p.device)
    return -torch.where(eye, log_p, log_not_p).mean()


def pcme_loss(mu_img: torch.Tensor, logvar_img: torch.Tensor, mu_txt: torch.Tensor, logvar_txt: torch.Tensor,
              a, b, *, kind: str = "csd", n_samples: int = DEFAULT_SAMPLES, vib_weight: float = 1e-4,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Probabilistic matching loss on a batch of B matching pairs (row i of each tensor is pair i).

    kind="csd": PCME++ (Chun 2024, Eq. 4-5) BCE of σ(-a·CSD + b), mean over all B² pairs (diagonal = match);
    kind="mc":  PCME (Chun et al. 2021, Eq. 3) soft contrastive loss with the J-sample MC probability, same mean.
    Both add vib_weight · ½(VIB_img + VIB_txt), each the KL to N(0, I) averaged over rows and dimensions
    (`vib_penalty`, as PCME++'s code). The whole is half of PCME++'s 2·BCE + β(KL_img + KL_txt): same optimum.
    a (> 0) and b are scalars or scalar tensors (learnable in `PCMEHeads`).
    """
    if kind == "csd":
        logit = -a * csd_pairwise(mu_img, logvar_img, mu_txt, logvar_txt) + b
        loss = _pairwise_match_loss(F.logsigmoid(logit), F.logsigmoid(-logit))
    elif kind == "mc":
        loss = _pairwise_match_loss(*mc_log_match(mu_img, logvar_img, mu_txt, logvar_txt, a, b, n_samples,
                                                  True, generator))
    else:
        raise ValueError(f"unknown PCME loss kind {kind!r}: use 'csd' (PCME++) or 'mc' (PCME)")
    if vib_weight:
        loss = loss + vib_weight * 0.5 * (vib_penalty(mu_img, logvar_img) + vib_penalty(mu_txt, logvar_txt))
    return loss


# ---------------------------------------------------------------- heads

class ProbHead(nn.Module):
    """One modality: μ = x + W x (W starts at 0, so μ starts at the frozen embedding) and
    log σ² = MLP(x) (its output layer starts at 0 weight and a bias giving Σ_d σ² = init_total_var)."""

    def __init__(self, dim: int, hidden: int = 128, init_total_var: float = 0.05):
        super().__init__()
        self.mean = nn.Linear(dim, dim)
        self.var_hidden = nn.Linear(dim, hidden)
        self.var_out = nn.Linear(hidden, dim)
        with torch.no_grad():
            self.mean.weight.zero_()
            self.mean.bias.zero_()
            self.var_out.weight.zero_()
            self.var_out.bias.fill_(math.log(init_total_var / dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + self.mean(x), self.var_out(F.gelu(self.var_hidden(x)))


class PCMEHeads(nn.Module):
    """Image and text `ProbHead`s plus the learnable match calibration a = exp(log_a) > 0 and b."""

    def __init__(self, dim: int, hidden: int = 128, init_a: float = 5.0, init_b: float = 5.0,
                 init_total_var: float = 0.05):
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        self.img = ProbHead(dim, hidden, init_total_var)
        self.txt = ProbHead(dim, hidden, init_total_var)
        self.log_a = nn.Parameter(torch.tensor(math.log(init_a)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))

    @property
    def a(self) -> torch.Tensor:
        return self.log_a.exp()

    def forward(self, img: torch.Tensor, txt: torch.Tensor):
        """-> (mu_img, logvar_img, mu_txt, logvar_txt)."""
        return (*self.img(img), *self.txt(txt))

    def loss(self, img: torch.Tensor, txt: torch.Tensor, kind: str = "csd", n_samples: int = DEFAULT_SAMPLES,
             vib_weight: float = 1e-4, generator: torch.Generator | None = None) -> torch.Tensor:
        return pcme_loss(*self(img, txt), self.a, self.b, kind=kind, n_samples=n_samples,
                         vib_weight=vib_weight, generator=generator)

    @torch.no_grad()
    def score(self, img: torch.Tensor, txt: torch.Tensor, estimator: str = "csd", n_samples: int = DEFAULT_SAMPLES,
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per matching pair: p_match, csd, uncertainty_img and uncertainty_txt (mean σ² over dimensions)."""
        mu_i, lv_i, mu_t, lv_t = self(img, txt)
        csd = csd_paired(mu_i, lv_i, mu_t, lv_t)
        if estimator == "csd":
            p = match_prob_csd(csd, self.a, self.b)
        elif estimator == "mc":
            p = match_prob_mc(mu_i, lv_i, mu_t, lv_t, self.a, self.b, n_samples, pairwise=False, generator=generator)
        else:
            raise ValueError(f"unknown estimator {estimator!r}: use 'csd' or 'mc'")
        return {"p_match": p, "csd": csd, "uncertainty_img": lv_i.exp().mean(-1),
                "uncertainty_txt": lv_t.exp().mean(-1)}
