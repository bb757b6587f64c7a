"""Corpus sources: the files a corpus URI names, cut into units of work, read as lines.

A corpus is text (`.txt` or any other name; `.gz`/`.xz` decompressed by name) or Parquet
documents (`.parquet`, `.parq`, `.pq`) with a string column of document texts. Work is cut
below the file, so one large file is many tasks:

    text, uncompressed   byte ranges of about `unit_bytes`, each cut just after a "\\n"
    text, compressed     the whole file (a compressed stream cannot be entered midway);
                         read a chunk at a time, so memory stays bounded
    Parquet              runs of whole row groups of about `unit_bytes` of text (one row group
                         at least), read with only the text column

The stream order is file order, then row (document) order, then line order; a document
reads like a file of its own (`lightrnn.text.documents_text`). Null documents are skipped
and counted.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from lightrnn.text import TextError, documents_text
from lightrnn.wordcodes import Encoded, encode_text
from pipeline import storage

PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
COMPRESSED_SUFFIXES = (".gz", ".xz", ".bz2")
_FIND_NEWLINE = 1 << 16  # bytes read at a time while looking for the line end after a cut


class CorpusError(ValueError):
    """Corpus input that cannot be used: missing, empty, not UTF-8, or not the expected Parquet."""


@dataclass(frozen=True)
class Unit:
    """One task's share of a corpus file."""

    split: str
    file_index: int
    part: int  # index of this unit within its file
    uri: str
    kind: str  # "text", "compressed" or "parquet"
    start: int  # text: first byte; compressed: 0; parquet: the first row group
    stop: int  # text: byte after the last (a cut just after a line end); compressed: -1; parquet: last row group + 1
    size: int = 0  # bytes of text it holds, as far as the plan knows (compressed: the file's size)


def expand_inputs(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files a corpus URI names, sorted: a file, every file under a folder, or a glob."""
    fs, path = storage.filesystem(uri, storage_options)
    fs.invalidate_cache()
    if any(c in path for c in "*?["):
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not paths:
            raise CorpusError(f"corpus input {uri} matches no files (check the pattern and the folder)")
    elif fs.isdir(path):
        # hidden and marker files (.crc, _SUCCESS) are not corpus text
        paths = sorted(p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_")))
        if not paths:
            raise CorpusError(f"corpus input {uri} is a folder with no files")
    elif fs.isfile(path):
        paths = [path]
    else:
        raise CorpusError(f"corpus input not found: {uri} (give a file, a folder of files or a glob)")
    return [fs.unstrip_protocol(p) for p in paths]


def kind_of(uri: str) -> str:
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "compressed" if name.endswith(COMPRESSED_SUFFIXES) else "text"


# -- planning ----------------------------------------------------------------------------


def _open_parquet(uri: str, storage_options: Mapping[str, Any] | None) -> pq.ParquetFile:
    """A Parquet file; a local one through Arrow's own file I/O (faster than a Python file object)."""
    try:
        fs, path = storage.filesystem(uri, storage_options)
        if isinstance(fs, LocalFileSystem):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file: {uri}")
            return pq.ParquetFile(path)
        return pq.ParquetFile(storage.open(uri, "rb", storage_options))
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{uri} is not a readable Parquet file ({e}); replace or remove it") from e


def _check_text_column(pf: pq.ParquetFile, uri: str, column: str) -> None:
    schema = pf.schema_arrow
    if column not in schema.names:
        raise CorpusError(
            f"{uri} has no column {column!r} (it has {', '.join(schema.names)}); "
            f"name the document text column with --text-column"
        )
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{uri}: column {column!r} holds {kind}, not text (a string column of documents)")


def _cut_after_newline(f: Any, at: int, size: int) -> int:
    """The first offset >= `at` that follows a "\\n" (or `size`)."""
    f.seek(at)
    position = at
    while position < size:
        chunk = f.read(_FIND_NEWLINE)
        if not chunk:
            break
        found = chunk.find(b"\n")
        if found >= 0:
            return position + found + 1
        position += len(chunk)
    return size


def plan_file(
    uri: str, split: str, file_index: int, unit_bytes: int, text_column: str, storage_options: Mapping[str, Any] | None
) -> list[Unit]:
    """The units of one file. Parquet: checks the text column (a clear error names the file)."""
    kind = kind_of(uri)
    if kind == "parquet":
        pf = _open_parquet(uri, storage_options)
        _check_text_column(pf, uri, text_column)
        sizes = [_text_bytes(pf, g, text_column) for g in range(pf.metadata.num_row_groups)]
        groups, held = [0], 0  # each unit's first row group: whole groups while they fit in unit_bytes
        for g, size in enumerate(sizes):
            if held and held + size > unit_bytes:
                groups.append(g)
                held = 0
            held += size
        bounds = list(itertools.pairwise([*groups, len(sizes)])) if sizes else []
        return [Unit(split, file_index, i, uri, kind, a, b, sum(sizes[a:b])) for i, (a, b) in enumerate(bounds)]
    if kind == "compressed":
        fs, path = storage.filesystem(uri, storage_options)
        return [Unit(split, file_index, 0, uri, kind, 0, -1, int(fs.size(path)))]
    fs, path = storage.filesystem(uri, storage_options)
    size = int(fs.size(path))
    cuts = [0]
    with fs.open(path, "rb") as f:
        while cuts[-1] + unit_bytes < size:
            cuts.append(_cut_after_newline(f, cuts[-1] + unit_bytes, size))
    if cuts[-1] < size or size == 0:
        cuts.append(size)
    return [Unit(split, file_index, i, uri, kind, a, b, b - a) for i, (a, b) in enumerate(itertools.pairwise(cuts))]


# -- reading -----------------------------------------------------------------------------


def _lines_before(uri: str, stop: int, storage_options: Mapping[str, Any] | None) -> int:
    """Lines that end before byte `stop` (a cut just after "\\n"); only to name a bad line."""
    lines = 0
    with storage.open(uri, "rb", storage_options) as f:
        remaining = stop
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                break
            remaining -= len(chunk)
            lines += chunk.count(b"\n") + chunk.count(b"\r") - chunk.count(b"\r\n")
    return lines


def _text_chunks(unit: Unit, chunk_bytes: int, storage_options: Mapping[str, Any] | None) -> Iterator[bytes]:
    """The bytes of a text unit, in chunks cut just after a line end."""
    compression = "infer" if unit.kind == "compressed" else None
    with storage.open(unit.uri, "rb", storage_options, compression=compression) as f:
        if unit.kind == "text":
            f.seek(unit.start)
        left = unit.stop - unit.start if unit.kind == "text" else -1
        carry = b""
        while left != 0:
            block = f.read(chunk_bytes if left < 0 else min(chunk_bytes, left))
            if not block:
                break
            left = left - len(block) if left > 0 else left
            block = carry + block
            cut = block.rfind(b"\n") + 1
            if cut == 0 and left != 0:
                carry = block  # one line longer than a chunk: read on
                continue
            body, carry = (block, b"") if left == 0 else (block[:cut], block[cut:])
            yield body
        if carry:
            yield carry


def _encoded(
    body: bytes, lower: bool, unit: Unit, first_line: int, storage_options: Mapping[str, Any] | None
) -> Encoded:
    try:
        return encode_text(body, lower, unit.uri, first_line)
    except TextError as e:
        if unit.kind == "text" and unit.start > 0:  # number the line from the start of the file
            offset = _lines_before(unit.uri, unit.start, storage_options)
            raise CorpusError(str(e).replace(f": line {first_line}", f": line {first_line + offset}", 1)) from None
        raise CorpusError(str(e)) from None


def unit_chunks(
    unit: Unit, lower: bool, text_column: str, chunk_bytes: int, storage_options: Mapping[str, Any] | None
) -> Iterator[tuple[Encoded, int]]:
    """The words of a unit, `tokenize`d and encoded (`lightrnn.wordcodes.encode_text`), chunk by
    chunk in stream order, each with the null documents it skipped."""
    try:
        if unit.kind != "parquet":
            first_line = 1
            for body in _text_chunks(unit, chunk_bytes, storage_options):
                encoded = _encoded(body, lower, unit, first_line, storage_options)
                first_line += encoded[2].size - 1  # its lines
                yield encoded, 0
            return
        pf = _open_parquet(unit.uri, storage_options)
        _check_text_column(pf, unit.uri, text_column)
        groups = range(unit.start, unit.stop)
        rows = sum(pf.metadata.row_group(g).num_rows for g in groups)
        batch_rows = max(1, chunk_bytes * rows // max(1, unit.size))  # unit.size: its groups' text bytes
        # one thread: the unit is the task's share of the cluster's CPUs
        read = {"row_groups": list(groups), "columns": [text_column], "use_threads": False}
        for batch in pf.iter_batches(batch_size=batch_rows, **read):
            body, nulls = documents_text(batch.column(0))
            yield _encoded(body, lower, unit, 1, storage_options), nulls
    except FileNotFoundError as e:
        raise CorpusError(f"{unit.uri} disappeared while the corpus was being read ({e}); re-run the stage") from e
    except (OSError, pa.ArrowException) as e:
        raise CorpusError(f"{unit.uri} cannot be read ({e}); replace or remove it") from e


def _text_bytes(pf: pq.ParquetFile, group: int, column: str) -> int:
    """Uncompressed bytes of a row group's text column (of the whole group if the column is not listed)."""
    meta = pf.metadata.row_group(group)
    names = [meta.column(i).path_in_schema for i in range(meta.num_columns)]
    return meta.column(names.index(column)).total_uncompressed_size if column in names else meta.total_byte_size
