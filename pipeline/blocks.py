"""A split's token stream cut into fixed-length blocks and written as Parquet shards.

Each unit of the corpus knows where its tokens start in its split's stream, so it cuts
them at global multiples of `block_len` on its own:

    split stream  |<- unit 0 ------------->|<- unit 1 ---------------------->|
    blocks        [ block 0   ][ block 1   ][ block 2   ][ block 3   ][ 4 ]
                                      ^^^^^ ^^^^^
    blocks inside a unit go to that unit's shard; a block that straddles units comes
    back as pieces (block, offset in block, tokens), joined afterwards into "edges" shards.

The split's last block may be short; every other block holds `block_len` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.dataset import SHARD_SCHEMA

Piece = tuple[int, int, np.ndarray]  # (block, offset in the block, int32 tokens)
_BLOCKS_PER_ROW_GROUP = 256  # full blocks per Parquet row group: 256 x 8192 int32 = 8 MiB per write
# token ids are near-random integers: Parquet's dictionary encoding saves little on them and
# costs most of the write time (`python -m jobs.bench ingest` shows the encode phase); zstd
# keeps them 28-32% smaller than snappy (PTB, a 10M-word vocabulary) for ~10% more write time
WRITE_OPTIONS = {"use_dictionary": False, "compression": "zstd"}


def blocks_table(split: str, first: int, tokens_NL: np.ndarray) -> pa.Table:
    """Rows (split, block, tokens) for N equal blocks numbered from `first`."""
    n, length = tokens_NL.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * length)
    return pa.table(
        {
            "split": pa.array([split] * n, pa.string()),
            "block": pa.array(np.arange(first, first + n, dtype=np.int64)),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(tokens_NL.reshape(-1).astype(np.int32, copy=False))),
        },
        schema=SHARD_SCHEMA,
    )


class ShardWriter:
    """Blocks of one unit -> one Parquet shard, written whole (atomic) in row groups."""

    def __init__(self, uri: str, split: str, storage_options: Mapping[str, Any]) -> None:
        self.uri, self.split, self.storage_options = uri, split, storage_options
        self.written = 0
        self._ctx: AbstractContextManager[str] | None = None
        self._writer: pq.ParquetWriter | None = None

    def add(self, first: int, tokens_NL: np.ndarray) -> None:
        """Write N consecutive blocks numbered from `first`."""
        for i in range(0, tokens_NL.shape[0], _BLOCKS_PER_ROW_GROUP):
            chunk = tokens_NL[i : i + _BLOCKS_PER_ROW_GROUP]
            if self._writer is None:  # Arrow's native file I/O, much faster than a Python file object
                self._ctx = storage.atomic_local_path(self.uri, self.storage_options, ".parquet")
                self._writer = pq.ParquetWriter(self._ctx.__enter__(), SHARD_SCHEMA, **WRITE_OPTIONS)
            self._writer.write_table(blocks_table(self.split, first + i, chunk))
            self.written += chunk.shape[0]

    def close(self) -> bool:
        """Commit the shard; False if it held no block (no file written)."""
        if self._writer is None:
            return False
        self._writer.close()
        assert self._ctx is not None
        self._ctx.__exit__(None, None, None)
        return True

    def abort(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


class BlockCutter:
    """Cuts one unit's tokens, which start at `start` in a split of `total` tokens, into blocks."""

    def __init__(self, start: int, total: int, block_len: int, writer: ShardWriter) -> None:
        self.block_len, self.total, self.writer = block_len, total, writer
        self.at = start  # global offset of carry[0]
        self.carry = np.zeros(0, dtype=np.int32)
        self.pieces: list[Piece] = []

    def add(self, tokens: np.ndarray) -> None:
        buf = np.concatenate([self.carry, tokens]) if self.carry.size else tokens
        at, length = self.at, self.block_len
        if at % length:  # the unit starts inside a block: that block's head is a piece
            need = length - at % length
            if buf.size < need:
                self.carry = buf
                return
            self.pieces.append((at // length, at % length, buf[:need].copy()))
            buf, at = buf[need:], at + need
        full = buf.size // length
        if full:
            self.writer.add(at // length, buf[: full * length].reshape(full, length))
        self.carry, self.at = buf[full * length :].copy(), at + full * length

    def close(self) -> list[Piece]:
        """Flush what is left: the split's last (short) block, or a piece; returns the pieces."""
        if self.carry.size:
            block, offset = divmod(self.at, self.block_len)
            if offset == 0 and self.at + self.carry.size == self.total:
                self.writer.add(block, self.carry.reshape(1, -1))
            else:
                self.pieces.append((block, offset, self.carry))
        return self.pieces


def join_pieces(split: str, pieces: Iterable[Piece]) -> Iterator[tuple[int, np.ndarray]]:
    """Blocks that straddle units, from their pieces in stream order: (block, tokens)."""
    block, parts, expected = -1, [], 0
    for b, offset, tokens in pieces:
        if b != block:
            if parts:
                yield block, np.concatenate(parts)
            block, parts, expected = b, [], 0
        if offset != expected:
            raise RuntimeError(f"{split} block {b}: pieces do not line up ({offset} != {expected}); this is a bug")
        parts.append(tokens)
        expected += tokens.size
    if parts:
        yield block, np.concatenate(parts)


def write_edges(
    split: str, blocks: Iterable[tuple[int, np.ndarray]], uri_of: Any, storage_options: Mapping[str, Any]
) -> tuple[list[str], int]:
    """Write the straddling blocks into shards of up to 4,096 blocks (`uri_of(i)` names shard i)."""
    uris, count, batch = [], 0, []

    def flush() -> None:
        uri = uri_of(len(uris))
        with storage.atomic_local_path(uri, storage_options, ".parquet") as path:
            tables = [blocks_table(split, b, t.reshape(1, -1)) for b, t in batch]
            pq.write_table(pa.concat_tables(tables), path, **WRITE_OPTIONS)
        uris.append(uri)

    for block, tokens in blocks:
        batch.append((block, tokens))
        count += 1
        if len(batch) == 4096:
            flush()
            batch = []
    if batch:
        flush()
    return uris, count
