"""`curate score`'s in-process passes: s_ii (clipscore) of every row, from the tables or from the fp16 caches."""

from __future__ import annotations

import numpy as np

from curate.io.tables import EmbeddingPool, to_float32
from curate.stages.common import PoolRows, check_finite
from curate.metrics.clipscore import clipscore


def clipscore_from_tables(pool: EmbeddingPool) -> np.ndarray:
    """s_ii of every row, streamed from the tables; also rejects non-finite embeddings."""

    s_ii = np.empty(pool.n_rows, dtype=np.float32)
    row = 0
    for _, chunk in pool.iter_chunks(["image_embedding", "text_embedding"], dtype=np.float16):
        image, text = chunk["image_embedding"], chunk["text_embedding"]
        check_finite(pool, image, row, "image_embedding")
        check_finite(pool, text, row, "text_embedding")
        s_ii[row:row + len(image)] = clipscore(image, text)
        row += len(image)
    return s_ii


def clipscore_from_rows(image: PoolRows, text: PoolRows, chunk_rows: int = 1 << 13) -> np.ndarray:
    """s_ii of every row from the `.npy` caches, read in sequential slices (every read is checked by PoolRows).

    When negclip builds the caches anyway, this replaces the second Parquet pass: the rows come back from
    the cache as a sequential read, with no Parquet pages to decode.
    """

    s_ii = np.empty(len(image), dtype=np.float32)
    # fp16 -> float32 through torch into two reused buffers: numpy's conversion costs more than the dot products
    buffers = [np.empty((min(chunk_rows, len(image)),) + tuple(image.shape[1:]), np.float32) for _ in range(2)]
    for start in range(0, len(image), chunk_rows):
        s_ii[start:start + chunk_rows] = clipscore(to_float32(image[start:start + chunk_rows], out=buffers[0]),
                                                   to_float32(text[start:start + chunk_rows], out=buffers[1]))
    return s_ii
