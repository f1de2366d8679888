"""The embedding table format: binary float16 vectors, read back exactly; older list tables still read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.io.tables import (EmbeddingPool, TeacherInfo, build_embedding_table, embedding_schema,
                              numpy_to_fixed_list, numpy_to_vectors, vectors_to_numpy, write_table_atomic)

TEACHER = TeacherInfo("m", "none", 6, 100.0)


def rows(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float16)


def decode_by_hand(column: pa.Array) -> np.ndarray:
    """Independent reading: each row's bytes are D little-endian IEEE half floats."""
    out = []
    for value in column.to_pylist():
        halves = [int.from_bytes(value[i:i + 2], "little") for i in range(0, len(value), 2)]
        out.append(np.array(halves, dtype=np.uint16).view(np.float16))
    return np.array(out, dtype=np.float16).reshape(len(out), -1)


def test_binary_vectors_round_trip_against_a_per_row_decoder():
    x = rows(9)
    column = numpy_to_vectors(x)
    assert column.type == pa.binary(12) and len(column) == 9
    np.testing.assert_array_equal(decode_by_hand(column), x)
    np.testing.assert_array_equal(vectors_to_numpy(column, np.float16), x)
    np.testing.assert_array_equal(vectors_to_numpy(column), x.astype(np.float32))  # exact widening
    # a slice (non-zero offset) and a multi-chunk column read the right rows
    np.testing.assert_array_equal(vectors_to_numpy(column.slice(3, 4), np.float16), x[3:7])
    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2)])
    np.testing.assert_array_equal(vectors_to_numpy(chunked, np.float16), x)
    assert vectors_to_numpy(column.slice(0, 0), np.float16).shape == (0, 6)


def test_hand_checkable_bytes():
    # 1.0 is 0x3C00 and -2.0 is 0xC000 in IEEE half precision, stored little-endian
    column = numpy_to_vectors(np.array([[1.0, -2.0]], dtype=np.float32))
    assert column.to_pylist() == [b"\x00\x3c\x00\xc0"]


def test_embedding_table_schema_is_self_describing(tmp_path):
    x = rows(5)
    table = build_embedding_table([f"{i:032x}" for i in range(5)], list("abcde"), list("abcde"), x, -x)
    write_table_atomic(table, tmp_path / "e" / "s.parquet", meta={"teacher": TEACHER.to_dict()})
    schema = pq.read_schema(tmp_path / "e" / "s.parquet")
    assert schema.field("image_embedding").type == pa.binary(12)
    assert schema.field("image_embedding").metadata == {b"curate.vector": b"float16[6] little-endian"}
    # what the README tells other tools to do
    column = pq.read_table(tmp_path / "e" / "s.parquet").column("text_embedding").combine_chunks()
    np.testing.assert_array_equal(np.frombuffer(column.buffers()[1], "<f2").reshape(-1, 6), -x)


def _list_table(x: np.ndarray, offset: int) -> pa.Table:
    """An embedding table as versions before binary vectors wrote it (fixed_size_list<float16>)."""
    uids = pa.array([f"{offset + i:032x}" for i in range(len(x))])
    names = pa.array([str(offset + i) for i in range(len(x))])
    return pa.table({"uid": uids, "key": names, "caption": names,
                     "image_embedding": numpy_to_fixed_list(x), "text_embedding": numpy_to_fixed_list(-x)})


def test_pool_mixing_list_and_binary_tables_reads_the_same(tmp_path):
    x = [rows(7, seed=1), rows(4, seed=2)]
    meta = {"teacher": TEACHER.to_dict()}
    write_table_atomic(_list_table(x[0], 0), tmp_path / "mixed" / "a.parquet", meta=meta)
    write_table_atomic(build_embedding_table([f"{7 + i:032x}" for i in range(4)], list("wxyz"), list("wxyz"),
                                             x[1], -x[1]), tmp_path / "mixed" / "b.parquet", meta=meta)
    pool = EmbeddingPool(tmp_path / "mixed")
    assert pool.n_rows == 11
    want = np.concatenate(x)
    np.testing.assert_array_equal(pool.matrix("image_embedding"), want)
    np.testing.assert_array_equal(pool.matrix("text_embedding", tmp_path / "cache"), -want)
    chunks = [c["image_embedding"] for _, c in pool.iter_chunks(["image_embedding"], dtype=np.float16)]
    np.testing.assert_array_equal(np.concatenate(chunks), want)


def test_bad_vector_columns_are_clear_errors(tmp_path):
    meta = {"teacher": TEACHER.to_dict()}
    table = build_embedding_table(["0" * 32], ["k"], ["c"], rows(1), rows(1))
    wrong = table.set_column(3, "image_embedding", numpy_to_vectors(rows(1, dim=5)))
    write_table_atomic(wrong, tmp_path / "w" / "s.parquet", meta=meta)
    with pytest.raises(CurateError, match=r"s.parquet: column `image_embedding` holds 5-d vectors .* embed_dim 6"):
        EmbeddingPool(tmp_path / "w")
    odd = table.set_column(3, "image_embedding", pa.array([b"abc"], pa.binary(3)))
    write_table_atomic(odd, tmp_path / "o" / "s.parquet", meta=meta)
    with pytest.raises(CurateError, match=r"s.parquet: column `image_embedding` has type fixed_size_binary\[3\]"):
        EmbeddingPool(tmp_path / "o")
    nulls = table.set_column(4, "text_embedding", pa.array([None], pa.binary(12)))
    write_table_atomic(nulls, tmp_path / "n" / "s.parquet", meta=meta)
    pool = EmbeddingPool(tmp_path / "n")
    with pytest.raises(CurateError, match=r"s.parquet: vector column holds 1 null rows"):
        list(pool.iter_chunks())
    assert embedding_schema(6).field("text_embedding").type == pa.binary(12)
