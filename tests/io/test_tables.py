"""The embedding table format: float16 vectors as typed lists, read back exactly; the binary vectors of earlier
versions still read; side records live in subfolders."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.io.tables import (EmbeddingPool, TeacherInfo, build_embedding_table, embedding_files, embedding_schema,
                              numpy_to_vectors, vectors_to_numpy, write_table_atomic)

TEACHER = TeacherInfo("m", "none", 6, 100.0)


def rows(n: int, dim: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float16)


def binary_vectors(x: np.ndarray) -> pa.Array:
    """Vectors as versions before typed lists wrote them: each row D little-endian float16 values as bytes."""
    return pa.array([row.astype("<f2").tobytes() for row in x], pa.binary(2 * x.shape[1]))


def test_vectors_round_trip_as_typed_float16_lists():
    x = rows(9)
    column = numpy_to_vectors(x)
    assert column.type == pa.list_(pa.field("element", pa.float16(), nullable=False), 6) and len(column) == 9
    # independent reading: each row is a list of D numbers
    np.testing.assert_array_equal(np.array(column.to_pylist(), dtype=np.float16), x)
    np.testing.assert_array_equal(vectors_to_numpy(column, np.float16), x)
    np.testing.assert_array_equal(vectors_to_numpy(column), x.astype(np.float32))  # exact widening
    # a slice (non-zero offset) and a multi-chunk column read the right rows
    np.testing.assert_array_equal(vectors_to_numpy(column.slice(3, 4), np.float16), x[3:7])
    chunked = pa.chunked_array([column.slice(0, 2), column.slice(2)])
    np.testing.assert_array_equal(vectors_to_numpy(chunked, np.float16), x)
    assert vectors_to_numpy(column.slice(0, 0), np.float16).shape == (0, 6)


def test_hand_checkable_values():
    column = numpy_to_vectors(np.array([[1.0, -2.0], [0.5, 65504.0]], dtype=np.float32))
    assert column.to_pylist() == [[1.0, -2.0], [0.5, 65504.0]]  # 65504 is float16's largest finite value


def test_embedding_table_schema_holds_numbers(tmp_path):
    x = rows(5)
    table = build_embedding_table([f"{i:032x}" for i in range(5)], list("abcde"), list("abcde"), x, -x)
    write_table_atomic(table, tmp_path / "e" / "s.parquet", meta={"teacher": TEACHER.to_dict()})
    schema = pq.read_schema(tmp_path / "e" / "s.parquet")
    assert schema.field("image_embedding").type.value_type == pa.float16()
    assert schema.field("image_embedding").type.list_size == 6
    assert schema.remove_metadata() == embedding_schema(6)
    # what the README tells numpy users to do: np.stack over the rows, no byte recipe
    column = pq.read_table(tmp_path / "e" / "s.parquet").column("text_embedding")
    np.testing.assert_array_equal(np.stack(column.to_numpy(zero_copy_only=False)), -x)


def test_image_only_tables_have_no_caption_or_text_vectors(tmp_path):
    x = rows(3)
    table = build_embedding_table(["a" * 32, "b" * 32, "c" * 32], ["k0", "k1", "k2"], None, x, None,
                                  labels=["cat", "dog", "cat"])
    assert table.schema.names == ["uid", "key", "label", "image_embedding"]
    write_table_atomic(table, tmp_path / "i" / "s.parquet", meta={"teacher": TEACHER.to_dict()})
    pool = EmbeddingPool(tmp_path / "i")
    np.testing.assert_array_equal(pool.matrix("image_embedding"), x)
    with pytest.raises(CurateError, match="image-only"):
        list(pool.iter_chunks())  # uid, image and text: an image-only table has no text to give


def test_pool_mixing_binary_and_list_tables_reads_the_same(tmp_path):
    x = [rows(7, seed=1), rows(4, seed=2)]
    meta = {"teacher": TEACHER.to_dict()}
    uids = pa.array([f"{i:032x}" for i in range(7)])
    names = pa.array([str(i) for i in range(7)])
    legacy = pa.table({"uid": uids, "key": names, "caption": names,
                       "image_embedding": binary_vectors(x[0]), "text_embedding": binary_vectors(-x[0])})
    write_table_atomic(legacy, tmp_path / "mixed" / "a.parquet", meta=meta)
    write_table_atomic(build_embedding_table([f"{7 + i:032x}" for i in range(4)], list("wxyz"), list("wxyz"),
                                             x[1], -x[1]), tmp_path / "mixed" / "b.parquet", meta=meta)
    pool = EmbeddingPool(tmp_path / "mixed")
    assert pool.n_rows == 11
    want = np.concatenate(x)
    np.testing.assert_array_equal(pool.matrix("image_embedding"), want)
    np.testing.assert_array_equal(pool.matrix("text_embedding", tmp_path / "cache"), -want)
    chunks = [c["image_embedding"] for _, c in pool.iter_chunks(["image_embedding"], dtype=np.float16)]
    np.testing.assert_array_equal(np.concatenate(chunks), want)


def test_a_directory_lists_only_its_top_level_tables(tmp_path):
    meta = {"teacher": TEACHER.to_dict()}
    table = build_embedding_table(["0" * 32], ["k"], ["c"], rows(1), rows(1))
    write_table_atomic(table, tmp_path / "d" / "00000.parquet", meta=meta)
    write_table_atomic(pa.table({"key": ["x"]}), tmp_path / "d" / "_errors" / "00000.parquet")
    write_table_atomic(pa.table({"key": ["x"]}), tmp_path / "d" / "00001.errors.parquet")  # an earlier layout
    (tmp_path / "d" / "_markers").mkdir()
    assert [p.name for p in embedding_files(tmp_path / "d")] == ["00000.parquet"]


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
    nulls = table.set_column(4, pa.field("text_embedding", pa.list_(pa.float16(), 6)),
                             pa.array([None], pa.list_(pa.float16(), 6)))
    write_table_atomic(nulls, tmp_path / "n" / "s.parquet", meta=meta)
    pool = EmbeddingPool(tmp_path / "n")
    with pytest.raises(CurateError, match=r"s.parquet: vector column holds 1 null rows"):
        list(pool.iter_chunks())
    null_values = table.set_column(4, pa.field("text_embedding", pa.list_(pa.float16(), 6)),
                                   pa.FixedSizeListArray.from_arrays(pa.array([1.0, None, 0, 0, 0, 0], pa.float16()), 6))
    write_table_atomic(null_values, tmp_path / "v" / "s.parquet", meta=meta)
    with pytest.raises(CurateError, match=r"s.parquet: vector column holds 1 null values"):
        list(EmbeddingPool(tmp_path / "v").iter_chunks())
