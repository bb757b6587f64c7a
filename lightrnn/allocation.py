"""The word <-> cell table of LightRNN (Li et al., NIPS 2016, section 3.1).

Every word of a V-word vocabulary sits in exactly one cell of an R x C table,
R = ceil(sqrt(V)), C = ceil(V / R). A word is represented by the vector of its row
and the vector of its column. When R * C > V some cells stay empty; the model masks
them out of the column softmax so that probabilities cover exactly the V words.

    word ids         table (R=3, C=3, V=8)
    0 1 2 3 ...      +----+----+----+
    row_of[w]        | w5 | w0 | w7 |   row 0
    col_of[w]        | w2 | -- | w1 |   row 1   (-- = empty cell, masked)
                     | w3 | w6 | w4 |   row 2
                     +----+----+----+
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from lightrnn.io import atomic_write_table, read_tagged_table

EMPTY = -1  # marks an empty cell in `word_table()`


class AllocationError(ValueError):
    """An allocation that is not a bijection from words onto distinct, in-range cells."""


def table_shape(vocab_size: int) -> tuple[int, int]:
    """(R, C) of the smallest near-square table holding `vocab_size` words."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    num_rows = math.isqrt(vocab_size - 1) + 1  # ceil(sqrt(V)) without float error
    num_cols = -(-vocab_size // num_rows)
    return num_rows, num_cols


@dataclass(frozen=True)
class Allocation:
    """A validated bijection from word ids 0..V-1 onto distinct cells of an R x C table."""

    row_of: np.ndarray  # (V,) int64
    col_of: np.ndarray  # (V,) int64
    num_rows: int
    num_cols: int

    def __post_init__(self) -> None:
        row_of = np.asarray(self.row_of)
        col_of = np.asarray(self.col_of)
        if row_of.ndim != 1 or col_of.ndim != 1 or row_of.shape != col_of.shape:
            raise AllocationError(
                f"row_of and col_of must be 1-D arrays of the same length, got shapes {row_of.shape} and {col_of.shape}"
            )
        if not (np.issubdtype(row_of.dtype, np.integer) and np.issubdtype(col_of.dtype, np.integer)):
            raise AllocationError(f"row_of and col_of must hold integers, got {row_of.dtype} and {col_of.dtype}")
        vocab_size = row_of.shape[0]
        if vocab_size == 0:
            raise AllocationError("an allocation needs at least one word")
        if self.num_rows < 1 or self.num_cols < 1:
            raise AllocationError(f"table must be at least 1 x 1, got {self.num_rows} x {self.num_cols}")
        if self.num_rows * self.num_cols < vocab_size:
            raise AllocationError(f"{vocab_size} words do not fit in a {self.num_rows} x {self.num_cols} table")
        for name, values, bound in (("row", row_of, self.num_rows), ("col", col_of, self.num_cols)):
            bad = np.flatnonzero((values < 0) | (values >= bound))
            if bad.size:
                w = int(bad[0])
                raise AllocationError(
                    f"word {w} has {name} {int(values[w])}, outside 0..{bound - 1} ({bad.size} word(s) out of range)"
                )
        cells = row_of.astype(np.int64) * self.num_cols + col_of.astype(np.int64)
        order = np.argsort(cells, kind="stable")
        clash = np.flatnonzero(cells[order][1:] == cells[order][:-1])
        if clash.size:
            a, b = int(order[clash[0]]), int(order[clash[0] + 1])
            raise AllocationError(
                f"words {a} and {b} share cell ({int(row_of[a])}, {int(col_of[a])}): an "
                f"allocation must put each word in its own cell ({clash.size} clash(es))"
            )
        object.__setattr__(self, "row_of", row_of.astype(np.int64, copy=False))
        object.__setattr__(self, "col_of", col_of.astype(np.int64, copy=False))

    # -- construction -------------------------------------------------------------

    @classmethod
    def from_cells(cls, cell_of: np.ndarray, num_rows: int, num_cols: int) -> Allocation:
        """Build from flat cell ids (row * C + col)."""
        cell_of = np.asarray(cell_of, dtype=np.int64)
        return cls(cell_of // num_cols, cell_of % num_cols, num_rows, num_cols)

    @classmethod
    def random(cls, vocab_size: int, seed: int = 0) -> Allocation:
        """Each word in a uniformly random distinct cell."""
        num_rows, num_cols = table_shape(vocab_size)
        rng = np.random.default_rng(seed)
        cells = rng.permutation(num_rows * num_cols)[:vocab_size]
        return cls.from_cells(cells, num_rows, num_cols)

    @classmethod
    def frequency_ordered(cls, counts: np.ndarray) -> Allocation:
        """Words in row-major cell order by descending count (ties: lower id first).

        This is the initial allocation of the official implementation: frequent words
        share the first rows.
        """
        counts = np.asarray(counts)
        num_rows, num_cols = table_shape(counts.shape[0])
        rank = np.empty(counts.shape[0], dtype=np.int64)
        rank[np.lexsort((np.arange(counts.shape[0]), -counts))] = np.arange(counts.shape[0])
        return cls.from_cells(rank, num_rows, num_cols)

    # -- views -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.row_of.shape[0])

    @property
    def num_cells(self) -> int:
        return self.num_rows * self.num_cols

    @property
    def cell_of(self) -> np.ndarray:
        """(V,) flat cell id row * C + col of every word."""
        return self.row_of * self.num_cols + self.col_of

    def word_table(self) -> np.ndarray:
        """(R, C) word id in every cell, EMPTY (-1) where no word sits."""
        table = np.full(self.num_cells, EMPTY, dtype=np.int64)
        table[self.cell_of] = np.arange(self.vocab_size)
        return table.reshape(self.num_rows, self.num_cols)

    def occupied(self) -> np.ndarray:
        """(R, C) bool, True where a word sits: the column-softmax mask of each row."""
        return self.word_table() != EMPTY

    def moved_words(self, other: Allocation) -> int:
        """How many words sit in a different cell in `other`."""
        if other.vocab_size != self.vocab_size:
            raise AllocationError(f"cannot compare allocations of {self.vocab_size} and {other.vocab_size} words")
        return int(np.count_nonzero(self.cell_of != other.cell_of))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Allocation)
            and (self.num_rows, self.num_cols) == (other.num_rows, other.num_cols)
            and np.array_equal(self.row_of, other.row_of)
            and np.array_equal(self.col_of, other.col_of)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    # -- persistence --------------------------------------------------------------

    def to_table(self) -> pa.Table:
        table = pa.table(
            {
                "word_id": pa.array(np.arange(self.vocab_size), pa.int64()),
                "row": pa.array(self.row_of, pa.int64()),
                "col": pa.array(self.col_of, pa.int64()),
            }
        )
        meta = {
            b"lightrnn.kind": b"allocation",
            b"num_rows": str(self.num_rows).encode(),
            b"num_cols": str(self.num_cols).encode(),
        }
        return table.replace_schema_metadata(meta)

    def save(self, where: str | os.PathLike[str] | BinaryIO) -> None:
        """Write as Parquet (columns word_id, row, col; table shape in the metadata)."""
        atomic_write_table(self.to_table(), where)

    @classmethod
    def load(cls, where: str | os.PathLike[str] | BinaryIO) -> Allocation:
        """Read an allocation written by `save`; refuses any other Parquet file."""
        table = read_tagged_table(where, "allocation", ("word_id", "row", "col"), AllocationError, "Allocation.save")
        meta = table.schema.metadata
        word_id = table.column("word_id").to_numpy()
        if not np.array_equal(word_id, np.arange(word_id.shape[0])):
            raise AllocationError(f"{where!r}: word_id column must be 0..V-1 in order")
        return cls(
            table.column("row").to_numpy(),
            table.column("col").to_numpy(),
            int(meta[b"num_rows"]),
            int(meta[b"num_cols"]),
        )
