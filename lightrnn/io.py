"""Small file helpers shared by the vocabulary, the allocation, the export and the corpus readers.

`atomic_path` is the one atomic writer of the project: `pipeline.storage.atomic_write`
builds on it for URIs, `lightrnn.export` and the Parquet tables below for local files.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import tempfile
from collections.abc import Iterator
from typing import BinaryIO, TextIO

import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[str]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds.

    A reader therefore sees either the old file or the whole new one, never half of it; on
    an error the temporary file is removed. `suffix` keeps a real extension on the temporary
    name for writers that look at it (torch.save names its zip archive after the file).
    """
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; others (trainers, users) must read it
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_table(table: pa.Table, where: str | os.PathLike[str] | BinaryIO) -> None:
    """Write `table` as Parquet; a local path is written atomically (`atomic_path`).

    File objects (e.g. from `pipeline.storage.atomic_write`) are written as given: their
    owner commits them.
    """
    if not isinstance(where, (str, os.PathLike)):
        pq.write_table(table, where)
        return
    with atomic_path(where, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


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
