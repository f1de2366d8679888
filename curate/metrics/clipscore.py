"""CLIPScore: the cosine similarity of a sample's own image and text embeddings (pure math, no I/O)."""

from __future__ import annotations

import numpy as np


def clipscore(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """CLIPScore_i = s_ii = <v_i, t_i> (Hessel et al. 2021, Eq. 1 without the w=2.5 rescale and the clip at 0;
    the negCLIPLoss paper, Sec. 3, uses the raw cosine). Inputs are L2-normalised (n, D) rows, any float dtype;
    accumulation is float32. Returns (n,) float32.
    """
    image_emb = np.asarray(image_emb)
    text_emb = np.asarray(text_emb)
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"clipscore needs two (n, D) arrays of the same shape, got {image_emb.shape} and {text_emb.shape}")
    return np.einsum("nd,nd->n", image_emb.astype(np.float32, copy=False), text_emb.astype(np.float32, copy=False),
                     dtype=np.float32)
