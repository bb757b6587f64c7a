"""Small file helpers shared by the vocabulary, the allocation and the corpus readers."""

from __future__ import annotations

import gzip
import lzma
import os
import tempfile
from typing import BinaryIO, TextIO

import pyarrow as pa
import pyarrow.parquet as pq


def atomic_write_table(table: pa.Table, where: str | os.PathLike[str] | BinaryIO) -> None:
    """Write `table` as Parquet; a local path is written to a temporary name and renamed.

    A reader therefore sees either the old file or the whole new one, never half of it.
    File objects (e.g. from fsspec) are written as given: their owner commits them.
    """
    if not isinstance(where, (str, os.PathLike)):
        pq.write_table(table, where)
        return
    path = os.fspath(where)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=directory)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_tagged_table(
    where: str | os.PathLike[str] | BinaryIO,
    kind: str,
    columns: tuple[str, ...],
    error: type[Exception],
    writer: str,
) -> pa.Table:
    """Read Parquet written by this package's `save` of `kind`; anything else raises `error`.

    Tables carry `lightrnn.kind` in their schema metadata, so a vocabulary is never read
    as an allocation (or a foreign file as either) just because the columns fit.
    """
    try:
        table = pq.read_table(where)
    except (OSError, pa.ArrowInvalid) as e:
        raise error(f"cannot read {kind} from {where!r}: {e}") from e
    meta = table.schema.metadata or {}
    if meta.get(b"lightrnn.kind") != kind.encode() or not set(columns) <= set(table.column_names):
        article = "an" if kind[0] in "aeiou" else "a"
        raise error(
            f"{where!r} is not {article} {kind} table (expected Parquet written by {writer} with columns "
            f"{', '.join(columns)}; found {table.column_names})"
        )
    return table


def open_text(path: str | os.PathLike[str]) -> TextIO:
    """Open a UTF-8 text file, transparently decompressing .xz and .gz."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such corpus file: {path}")
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")
