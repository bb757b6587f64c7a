"""Reading a prepared dataset: only through its manifest, so half-written output is never read.

Layout under the dataset root:

    manifest.json                    the commit: config, counts, shard list (written last)
    vocab.parquet                    lightrnn.vocab.Vocabulary (word, count), id = row
    shards/SPLIT-NNNNN-RUN.parquet   rows (split: string, block: int64, tokens: list<int32>)
    shards/SPLIT-edges-NNNNN-RUN.parquet   the same, for the blocks that straddle two input units

A split's stream is its blocks' tokens concatenated in `block` order; every block holds
`block_len` tokens except possibly the split's last.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lightrnn.vocab import Vocabulary
from pipeline import storage

VOCAB_FILE = "vocab.parquet"
SHARD_SCHEMA = pa.schema(
    [("split", pa.string()), ("block", pa.int64()), ("tokens", pa.list_(pa.int32()))],
    metadata={b"lightrnn.kind": b"token-blocks"},
)


class DatasetError(storage.StorageError):
    """A committed dataset whose files are missing, unreadable or not ours."""


def edges_shard_name(split: str, index: int, run_id: str) -> str:
    """The file name of `split`'s edges shard `index` (the blocks that straddle two input units)."""
    return f"{split}-edges-{index:05d}-{run_id}.parquet"


def is_edges_shard(name: str, split: str) -> bool:
    """Whether shard file `name` is one of `split`'s edges shards (`edges_shard_name`)."""
    return posixpath.basename(name).startswith(f"{split}-edges-")


class TokenDataset:
    """A committed prepared dataset: manifest, vocabulary and token streams per split."""

    def __init__(self, root: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.manifest = storage.read_manifest(self.root, self.storage_options)

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def block_len(self) -> int:
        return int(self.manifest["config"]["block_len"])

    def shard_uris(self, split: str, edges: bool | None = None) -> list[str]:
        """The split's shard files as the manifest lists them: the units' shards in block order, then
        the "edges" shards of the blocks that straddle two units (`pipeline.blocks`), in block order
        too. `edges` True or False keeps only those or only the others."""
        if split not in self.manifest["splits"]:
            raise KeyError(f"{self.root} has no split {split!r}; it has {', '.join(self.splits)}")
        names = self.manifest["splits"][split]["shards"]
        if edges is not None:
            names = [n for n in names if is_edges_shard(n, split) == edges]
        return [storage.join(self.root, s) for s in names]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab"]["size"])

    def vocab_counts(self) -> np.ndarray:
        """(V,) int64 training count of every word id, without reading the words themselves."""
        uri = storage.join(self.root, self.manifest["vocab"]["path"])
        with storage.open(uri, "rb", self.storage_options) as f:
            counts = pq.read_table(f, columns=["count"]).column("count").to_numpy()
        if counts.shape[0] != self.vocab_size:
            raise DatasetError(f"{self.root}: vocabulary has {counts.shape[0]} words, manifest says {self.vocab_size}")
        return counts

    def unigram_ppl(self, split: str) -> float:
        """Perplexity of `split`'s targets (every token after the first) under the training counts as
        a unigram model, a word counted 0 times taken as 1. On text drawn word by word from a fixed
        distribution, such as the synthetic Zipf corpus, no model does better in expectation."""
        counts = np.maximum(self.vocab_counts(), 1).astype(np.float64)
        log_p = np.log(counts) - np.log(counts.sum())
        return float(np.exp(-log_p[self.tokens(split)[1:]].mean()))

    def vocab(self) -> Vocabulary:
        """The whole vocabulary, words included (1-2 GB of Python objects at 10M words)."""
        with storage.open(storage.join(self.root, self.manifest["vocab"]["path"]), "rb", self.storage_options) as f:
            vocab = Vocabulary.load(f)
        if len(vocab) != self.manifest["vocab"]["size"]:
            raise DatasetError(
                f"{self.root}: vocabulary has {len(vocab)} words, manifest says {self.manifest['vocab']['size']}"
            )
        return vocab

    def read_blocks(self, split: str) -> pa.Table:
        """All blocks of `split` in stream order, checked against the manifest."""
        tables = [self.read_shard(uri) for uri in self.shard_uris(split)]
        table = pa.concat_tables(tables).sort_by("block") if tables else SHARD_SCHEMA.empty_table()
        info = self.manifest["splits"][split]
        blocks = table.column("block").to_numpy()
        if not np.array_equal(blocks, np.arange(info["blocks"])):
            raise DatasetError(f"{self.root}: {split} blocks are not 0..{info['blocks'] - 1}; the dataset is damaged")
        return table

    def tokens(self, split: str) -> np.ndarray:
        """(N,) int32 ids of the whole split, in stream order."""
        stream = self.read_blocks(split).column("tokens").combine_chunks().flatten().to_numpy()
        expected = self.manifest["splits"][split]["tokens"]
        if stream.shape[0] != expected:
            raise DatasetError(f"{self.root}: {split} holds {stream.shape[0]} tokens, manifest says {expected}")
        return stream

    def ray_dataset(self, split: str, edges: bool | None = None):  # -> ray.data.Dataset | None; ray imported lazily
        """The split's blocks as a Ray Dataset (rows: split, block, tokens), its files in manifest
        order; `edges` as in `shard_uris`; None when that selects no file."""
        import ray.data

        fs, _ = storage.filesystem(self.root, self.storage_options)
        paths = [storage.filesystem(u, self.storage_options)[1] for u in self.shard_uris(split, edges)]
        return ray.data.read_parquet(paths, filesystem=fs) if paths else None

    def read_shard(self, uri: str) -> pa.Table:
        try:
            with storage.open(uri, "rb", self.storage_options) as f:
                table = pq.read_table(f)
        except FileNotFoundError as e:
            raise DatasetError(f"{uri} is listed in the manifest but missing; delete {self.root} and re-run") from e
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{uri} is not readable Parquet ({e}); delete {self.root} and re-run") from e
        if (table.schema.metadata or {}).get(b"lightrnn.kind") != b"token-blocks" or not table.schema.equals(
            SHARD_SCHEMA, check_metadata=False
        ):
            raise DatasetError(
                f"{uri} is not a token-block shard (columns {table.column_names}, expected split, block, tokens); "
                f"delete {self.root} and re-run the prepare stage"
            )
        return table


def open_dataset(root: str, storage_options: Mapping[str, Any] | None = None) -> TokenDataset:
    """Open a committed dataset; raises DatasetNotCommittedError if its stage never finished."""
    return TokenDataset(root, storage_options)
