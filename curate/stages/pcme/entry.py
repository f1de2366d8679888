"""`curate pcme`'s entry: tier 1 calibration, tier 2 heads (fit) and their scores."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from curate.config import check_config
from curate.errors import CurateError
from curate.io.atomic import write_bytes_atomic
from curate.io.tables import EmbeddingPool, write_table_atomic
from curate.metrics import pcme as pm
from curate.models.teacher import resolve_device
from curate.stages.common import clipscore_blocks, pool_cache_dir, pool_field
from curate.stages.pcme import (HEADS_FORMAT, PcmeCalibrateConfig, PcmeCalibration, PcmeFitConfig, PcmeHeadsFit,
                                PcmeScoreConfig, PcmeScores)


def _sample_rows(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if count >= n else np.sort(rng.choice(n, count, replace=False))


def _gather(matrix: np.ndarray, rows: np.ndarray, block: int = 65536) -> np.ndarray:
    """Rows of a (memory-mapped) matrix as float32, read in sorted order for locality."""
    out = np.empty((len(rows), matrix.shape[1]), np.float32)
    order = np.argsort(rows, kind="stable")
    for s in range(0, len(rows), block):
        sel = order[s:s + block]
        out[sel] = matrix[rows[sel]]
    return out


def truth_roc_aucs(pool: EmbeddingPool, spec: str, scores: dict[str, np.ndarray], clean_high: set[str]) -> dict:
    """ROC-AUC of each score for clean vs corrupted (truth field `spec`, "clean" or a corruption kind), overall
    and per corruption kind. Scores named in `clean_high` should be high for clean samples (p_match); the others
    high for corrupted ones (uncertainty)."""
    kinds = np.asarray([str(v) for v in pool_field(pool, spec)], dtype=object)
    clean = kinds == "clean"
    out: dict = {"n_clean": int(clean.sum()), "n_corrupted": int((~clean).sum())}
    for name, values in scores.items():
        label = f"roc_auc_{name}_" + ("clean_vs_corrupted" if name in clean_high else "corrupted_vs_clean")
        flag = clean if name in clean_high else ~clean
        out[label] = pm.binary_roc_auc(values, flag)
        per_kind = {}
        for kind in sorted(set(kinds) - {"clean"}):
            keep = clean | (kinds == kind)
            per_kind[kind] = pm.binary_roc_auc(values[keep], flag[keep])
        out[label + "_by_kind"] = per_kind
    return out


# ---------------------------------------------------------------- tier 1

def calibrate_p_match(emb: str | Path, out: str | Path, cfg: PcmeCalibrateConfig = PcmeCalibrateConfig()
                      ) -> PcmeCalibration:
    """Fit a, b on `cfg.pairs` positives + as many random negatives; write uid, similarity, p_match for all
    rows."""
    check_config(cfg)
    pairs, seed = cfg.pairs, cfg.seed
    out = Path(out)
    pool = EmbeddingPool(emb)
    n = pool.n_rows
    if n < 2:
        raise CurateError(f"{emb}: calibration needs at least 2 samples (positives and negatives), found {n}")
    cache = pool_cache_dir(out, cfg.cache_dir)
    img = pool.matrix("image_embedding", cache)
    txt = pool.matrix("text_embedding", cache)
    rng = np.random.default_rng(seed)
    rows = _sample_rows(n, min(n, int(pairs)), rng)
    partners = (rows + rng.integers(1, n, size=len(rows))) % n  # uniform over j != i
    v = _gather(img, rows)
    s_pos = np.einsum("ij,ij->i", v, _gather(txt, rows))
    s_neg = np.einsum("ij,ij->i", v, _gather(txt, partners))
    fit = pm.fit_match_logistic(s_pos, s_neg)
    positive = clipscore_blocks(img, txt)
    p_match = pm.match_prob_from_cosine(positive, fit["a"], fit["b"])
    result = PcmeCalibration(tier=1, model="p = sigmoid(-a * (2 - 2 s) + b)", **fit, n_pairs=int(len(rows)),
                             seed=seed, teacher=pool.teacher.to_dict(), source=str(emb))
    if cfg.truth:
        result.truth_check = truth_roc_aucs(pool, cfg.truth, {"p_match": p_match}, {"p_match"})
    table = pa.table({"uid": pool.uid_array(), "similarity": pa.array(positive, pa.float32()),
                      "p_match": pa.array(p_match, pa.float64())})
    write_table_atomic(table, out, meta={"pcme": result.metadata()}, row_group_size=1 << 20)
    return result


# ---------------------------------------------------------------- tier 2

def fit_heads(emb: str | Path, out: str | Path, cfg: PcmeFitConfig = PcmeFitConfig()) -> PcmeHeadsFit:
    """Train PCME (`loss="mc"`) or PCME++ (`loss="csd"`) heads on frozen embeddings; save them to `out`.

    Cost per step: csd needs B² closed-form distances; mc needs (B·J)² sampled ones (J = n_samples per side,
    default 7 as in PCME: (7·256)² distances per step at B = 256).
    """
    check_config(cfg)
    loss, steps, batch_size, lr, n_samples = cfg.loss, cfg.steps, cfg.batch_size, cfg.lr, cfg.n_samples
    vib_weight, hidden, max_samples, seed = cfg.vib_weight, cfg.hidden, cfg.max_samples, cfg.seed
    out = Path(out)
    pool = EmbeddingPool(emb)
    n = pool.n_rows
    if n < 2:
        raise CurateError(f"{emb}: fitting heads needs at least 2 samples, found {n}")
    dev = resolve_device(cfg.device)
    cache = pool_cache_dir(out, cfg.cache_dir)
    rng = np.random.default_rng(seed)
    rows = _sample_rows(n, min(n, int(max_samples)), rng)
    x_img = torch.from_numpy(_gather(pool.matrix("image_embedding", cache), rows)).to(dev)
    x_txt = torch.from_numpy(_gather(pool.matrix("text_embedding", cache), rows)).to(dev)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = pm.PCMEHeads(pool.dim, hidden).to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    opt = torch.optim.Adam(heads.parameters(), lr=lr)
    bs = min(batch_size, len(rows))
    curve: list[float] = []
    order = rng.permutation(len(rows))
    cursor = 0
    for step in range(steps):
        if cursor + bs > len(order):  # new epoch; every batch is full and drawn from the whole sample
            order, cursor = rng.permutation(len(rows)), 0
        idx = torch.from_numpy(order[cursor:cursor + bs]).to(dev)
        cursor += bs
        value = heads.loss(x_img[idx], x_txt[idx], kind=loss, n_samples=n_samples, vib_weight=vib_weight,
                           generator=gen)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        curve.append(float(value.detach()))
    if not math.isfinite(curve[-1]):
        raise CurateError(f"PCME head training diverged (loss {curve[-1]}); lower --lr")
    checkpoint = {
        "format": HEADS_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in heads.state_dict().items()},
        "config": {"dim": pool.dim, "hidden": hidden, "loss": loss, "n_samples": n_samples,
                   "vib_weight": vib_weight},
        "teacher": pool.teacher.to_dict(),
        "train": {"steps": steps, "batch_size": bs, "lr": lr, "seed": seed, "n_train": int(len(rows)),
                  "final_loss": curve[-1], "loss_curve": curve[:: max(1, steps // 100)],
                  "a": float(heads.a.detach()), "b": float(heads.b.detach())},
        "source": str(emb),
    }
    buffer = io.BytesIO()  # saved from memory: the archive's inner name must not depend on the temp file's name
    torch.save(checkpoint, buffer)
    write_bytes_atomic(out, buffer.getvalue())
    return PcmeHeadsFit(**{k: checkpoint[k] for k in ("config", "teacher", "train")})


def load_heads(path: str | Path) -> tuple[pm.PCMEHeads, dict]:
    """Load heads saved by `fit_heads` with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"{path}: no such heads checkpoint; run `curate pcme fit` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means: not our checkpoint
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CurateError(f"{path}: not a readable heads checkpoint ({type(exc).__name__}: {first}); "
                          "give the .pt written by `curate pcme fit`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != HEADS_FORMAT:
        raise CurateError(f"{path}: not a `curate pcme fit` checkpoint (format {HEADS_FORMAT} expected)")
    cfg = ckpt["config"]
    heads = pm.PCMEHeads(int(cfg["dim"]), int(cfg["hidden"]))
    try:
        heads.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CurateError(f"{path}: heads do not match their config ({exc})") from None
    heads.eval()
    return heads, ckpt


def p_match_and_uncertainty(emb: str | Path, heads_path: str | Path, out: str | Path,
                            cfg: PcmeScoreConfig = PcmeScoreConfig()) -> PcmeScores:
    """p_match, csd, uncertainty_img, uncertainty_txt (mean σ²) and their mean for every row, streamed, written
    to `out`."""
    check_config(cfg)
    estimator, n_samples = cfg.estimator, cfg.n_samples
    pool = EmbeddingPool(emb)
    heads, ckpt = load_heads(heads_path)
    if ckpt["teacher"] != pool.teacher.to_dict():
        raise CurateError(f"{heads_path}: heads were fitted on embeddings of teacher {ckpt['teacher']}, but {emb} "
                          f"has {pool.teacher.to_dict()}; fit heads on this teacher's embeddings")
    dev = resolve_device(cfg.device)
    heads.to(dev)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("p_match", "csd", "uncertainty_img", "uncertainty_txt")}
    for _, chunk in pool.iter_chunks(("image_embedding", "text_embedding")):
        for s in range(0, len(chunk["image_embedding"]), 65536):
            res = heads.score(torch.from_numpy(chunk["image_embedding"][s:s + 65536]).to(dev),
                              torch.from_numpy(chunk["text_embedding"][s:s + 65536]).to(dev),
                              estimator=estimator, n_samples=n_samples, generator=gen)
            for k in cols:
                cols[k].append(res[k].cpu().numpy().astype(np.float64))
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    arrays["uncertainty"] = 0.5 * (arrays["uncertainty_img"] + arrays["uncertainty_txt"])
    result = PcmeScores(tier=2, estimator=estimator, n_samples=n_samples if estimator == "mc" else None,
                        heads=str(heads_path), a=float(heads.a.detach()), b=float(heads.b.detach()),
                        heads_loss=ckpt["config"]["loss"], teacher=pool.teacher.to_dict(), source=str(emb))
    if cfg.truth:
        result.truth_check = truth_roc_aucs(
            pool, cfg.truth, {k: arrays[k] for k in ("p_match", "uncertainty", "uncertainty_img", "uncertainty_txt")},
            {"p_match"})
    table = pa.table({"uid": pool.uid_array(), **{k: pa.array(v, pa.float64()) for k, v in arrays.items()}})
    write_table_atomic(table, out, meta={"pcme": result.metadata()}, row_group_size=1 << 20)
    return result
