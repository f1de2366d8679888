"""Exact top-k by radix select over order-preserving integer keys (pure numpy, no I/O).

The distributed `curate filter` (curate/stages/filter/tasks.py) finds the k-th largest score of a
column it never holds whole: map tasks histogram one 16-bit digit of each row's key, a reduce picks the
bucket holding the cut and narrows the key prefix, until few enough rows remain to collect exactly (radix
select: Knuth, TAOCP vol. 3, 5.2.5; MSD passes as in Alabi et al. 2012, "Fast k-selection algorithms for
graphics processing units"). Ties at the cut value are broken by uid ascending (the 128-bit uid as
(high, low) uint64 halves), so one step is fully described by (cut key, uid cut).

Keys: a float's IEEE-754 bits with the sign bit flipped for positives and all bits flipped for negatives
sort as unsigned integers in the order of the floats (-inf < ... < -0 < +0 < ... < +inf). -0.0 is first
made +0.0, because the in-memory filter compares them equal (a tie, broken by uid). NaN gets some key
but is never a candidate: callers mask it out.
"""

from __future__ import annotations

import numpy as np

DIGIT_BITS = 16
DIGITS = 1 << DIGIT_BITS
_KEY_DTYPES = {np.dtype(np.float32): np.dtype(np.uint32), np.dtype(np.float64): np.dtype(np.uint64)}


def key_bits(dtype) -> int:
    """32 for float32 scores, 64 for float64 (integer metrics arrive as float64)."""
    dtype = np.dtype(dtype)
    if dtype not in _KEY_DTYPES:
        raise TypeError(f"order keys exist for float32 and float64 scores, not {dtype}")
    return dtype.itemsize * 8


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned keys in the order of the float values (uint32 for float32, uint64 for float64)."""
    values = np.asarray(values)
    key_dtype = _KEY_DTYPES[np.dtype(values.dtype)]
    bits = (values + values.dtype.type(0)).view(key_dtype)  # -0.0 + 0.0 is +0.0: equal scores, equal keys
    top = key_dtype.type(1 << (key_dtype.itemsize * 8 - 1))
    return np.where(bits & top, ~bits, bits | top)


def key_value(key: int, dtype) -> float:
    """The score a key stands for (the inverse of `order_keys`), as a Python float."""
    dtype = np.dtype(dtype)
    key_dtype = _KEY_DTYPES[dtype]
    top = 1 << (key_dtype.itemsize * 8 - 1)
    mask = (1 << (key_dtype.itemsize * 8)) - 1
    bits = key ^ top if key & top else ~key & mask
    return float(np.array([bits], key_dtype).view(dtype)[0])


def in_prefix(keys: np.ndarray, prefix: int, bits: int) -> np.ndarray:
    """Rows whose key starts with the `bits`-bit `prefix` (every row when bits = 0)."""
    if bits == 0:
        return np.ones(len(keys), dtype=bool)
    total = keys.dtype.itemsize * 8
    return (keys >> keys.dtype.type(total - bits)) == keys.dtype.type(prefix)


def digit_histogram(keys: np.ndarray, bits: int) -> np.ndarray:
    """Counts (int64, 65536) of the 16-bit digit that follows the first `bits` bits of each key."""
    total = keys.dtype.itemsize * 8
    shift = keys.dtype.type(total - bits - DIGIT_BITS)
    digits = ((keys >> shift) & keys.dtype.type(DIGITS - 1)).astype(np.intp)
    return np.bincount(digits, minlength=DIGITS).astype(np.int64)


def sparse_histogram(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(digits, counts) of the nonzero buckets: what a map task sends back instead of 65,536 counts."""
    digits = np.flatnonzero(hist)
    return digits.astype(np.uint16), hist[digits]


def sum_histograms(parts) -> np.ndarray:
    """The dense histogram (int64, 65536) of many `sparse_histogram` results."""
    hist = np.zeros(DIGITS, np.int64)
    for digits, counts in parts:
        hist[digits.astype(np.intp)] += counts
    return hist


def bucket_of_rank(hist: np.ndarray, need: int) -> tuple[int, int]:
    """The digit whose bucket holds the `need`-th largest key (1-based), and how many keys lie above it."""
    hist = np.asarray(hist, dtype=np.int64)
    at_or_above = np.cumsum(hist[::-1])[::-1]  # keys with digit >= d
    if not 1 <= need <= (int(at_or_above[0]) if len(hist) else 0):
        raise ValueError(f"rank {need} outside 1..{int(at_or_above[0]) if len(hist) else 0}")
    digit = int(np.flatnonzero(at_or_above >= need)[-1])
    return digit, int(at_or_above[digit] - hist[digit])


def uid_at_most(high: np.ndarray, low: np.ndarray, cut_high: int, cut_low: int) -> np.ndarray:
    """uid <= (cut_high, cut_low) as 128-bit numbers."""
    cut_high, cut_low = np.uint64(cut_high), np.uint64(cut_low)
    return (high < cut_high) | ((high == cut_high) & (low <= cut_low))


def exact_cut(keys: np.ndarray, high: np.ndarray, low: np.ndarray, need: int) -> tuple[int, int, int, int]:
    """Among collected rows, the `need`-th in (key descending, uid ascending) order: (cut key, uid high,
    uid low, rows with the cut key left out). Every collected row ranks below those counted above them."""
    if not 1 <= need <= len(keys):
        raise ValueError(f"need {need} outside 1..{len(keys)}")
    order = np.lexsort((low, high, ~keys))
    last = order[need - 1]
    cut = keys[last]
    tied = int((keys == cut).sum())
    taken = int((keys[order[:need]] == cut).sum())
    return int(cut), int(high[last]), int(low[last]), tied - taken

