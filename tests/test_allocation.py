from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightrnn.allocation import EMPTY, Allocation, AllocationError, table_shape


@pytest.mark.parametrize(
    ("vocab", "shape"),
    [
        (1, (1, 1)),
        (2, (2, 1)),
        (4, (2, 2)),
        (5, (3, 2)),
        (10, (4, 3)),
        (10_000, (100, 100)),
        (10_000_000, (3163, 3162)),
    ],
)
def test_table_shape_is_ceil_sqrt_by_ceil_ratio(vocab: int, shape: tuple[int, int]) -> None:
    assert table_shape(vocab) == shape
    rows, cols = shape
    assert rows * cols >= vocab and (rows - 1) * cols < vocab + cols


@pytest.mark.parametrize("vocab", [1, 7, 10, 100, 1001])
def test_random_allocation_is_a_bijection_onto_cells(vocab: int) -> None:
    alloc = Allocation.random(vocab, seed=3)
    assert len(set(alloc.cell_of.tolist())) == vocab
    table = alloc.word_table()
    assert sorted(table[table != EMPTY].tolist()) == list(range(vocab))
    assert alloc.occupied().sum() == vocab
    for w in range(vocab):
        assert table[alloc.row_of[w], alloc.col_of[w]] == w


def test_frequency_ordered_puts_frequent_words_first() -> None:
    counts = np.array([5, 100, 7, 100, 1, 50])
    alloc = Allocation.frequency_ordered(counts)
    assert (alloc.num_rows, alloc.num_cols) == (3, 2)
    # rank by count desc, ties by id: 1, 3, 5, 2, 0, 4 -> cells 0..5 row-major
    assert alloc.cell_of.tolist() == [4, 0, 3, 1, 5, 2]


def test_moved_words_counts_differences() -> None:
    a = Allocation.random(50, seed=0)
    b = Allocation.random(50, seed=1)
    assert a.moved_words(a) == 0
    assert a.moved_words(b) == int(np.sum(a.cell_of != b.cell_of)) > 0


@pytest.mark.parametrize(
    ("rows", "cols", "message"),
    [
        ([0, 0], [0, 0], "share cell"),
        ([0, 2], [0, 0], "outside 0..1"),
        ([0, -1], [0, 1], "outside"),
        ([0, 1], [0, 5], "col 5, outside 0..1"),
        ([0, 1, 1], [0, 1], "same length"),
        ([], [], "at least one word"),
        ([0.0, 1.0], [0, 1], "integers"),
    ],
)
def test_invalid_allocations_are_refused_with_the_reason(rows, cols, message: str) -> None:
    with pytest.raises(AllocationError, match=message):
        Allocation(np.array(rows, dtype=type(rows[0]) if rows else int), np.array(cols, dtype=int), 2, 2)


def test_too_small_table_is_refused() -> None:
    with pytest.raises(AllocationError, match="do not fit"):
        Allocation(np.arange(5), np.zeros(5, dtype=int), 2, 2)


def test_save_load_round_trip(tmp_path) -> None:
    alloc = Allocation.random(37, seed=5)
    alloc.save(tmp_path / "a.parquet")
    assert Allocation.load(tmp_path / "a.parquet") == alloc
    assert not list(tmp_path.glob(".tmp-*"))


def test_load_refuses_foreign_parquet_and_garbage(tmp_path) -> None:
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(AllocationError, match="not an allocation table"):
        Allocation.load(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(AllocationError, match="cannot read allocation"):
        Allocation.load(tmp_path / "junk.parquet")
    with pytest.raises(AllocationError, match="cannot read allocation"):
        Allocation.load(tmp_path / "missing.parquet")


def test_load_refuses_a_tampered_non_bijection(tmp_path) -> None:
    table = Allocation.random(6, seed=0).to_table()
    rows = table.column("row").to_numpy().copy()
    cols = table.column("col").to_numpy().copy()
    rows[1], cols[1] = rows[0], cols[0]
    bad = table.set_column(1, "row", pa.array(rows)).set_column(2, "col", pa.array(cols))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), tmp_path / "bad.parquet")
    with pytest.raises(AllocationError, match="share cell"):
        Allocation.load(tmp_path / "bad.parquet")
