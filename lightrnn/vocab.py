"""The vocabulary: words, ids and counts, with `<unk>` and `<eos>`.

Ids are ordered by descending count, ties broken by the word's code points, so the same
counts always give the same ids (on one machine or many) and the adaptive-softmax
baseline gets the frequency order it relies on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightrnn.io import atomic_write_table, read_tagged_table
from lightrnn.text import tokenize
from lightrnn.wordcodes import word_hashes

__all__ = ["EOS", "UNK", "Vocabulary", "VocabularyError", "WordLookup", "tokenize"]

UNK = "<unk>"
EOS = "<eos>"
_LOOKUP_SEEDS = 16  # hash seeds tried before giving up on a collision-free lookup


class VocabularyError(ValueError):
    """A vocabulary that cannot be built or read."""


@dataclass(frozen=True)
class WordLookup:
    """Word -> id without a Python dict: the sorted 64-bit hashes of the vocabulary's words.

    Two numpy arrays (12 bytes a word: 120 MB at 10M words) that Ray's object store shares
    zero-copy between the processes that encode text. The seed is chosen so that no two
    vocabulary words share a hash. A word outside the vocabulary maps to `<unk>` unless its
    hash equals a vocabulary word's, which for 64-bit hashes has probability V / 2^64 per
    distinct word (5e-13 at V = 10M).
    """

    hashes: np.ndarray  # (V,) uint64, ascending
    ids: np.ndarray  # (V,) int32: the id of the word with hashes[i]
    seed: int
    unk_id: int

    @classmethod
    def build(cls, words: pa.Array, unk_id: int, hashes: np.ndarray | None = None) -> WordLookup:
        """The lookup of `words` (word i has id i); `hashes`: their seed-0 hashes, if known already."""
        for seed in range(_LOOKUP_SEEDS):
            hashed = hashes if seed == 0 and hashes is not None else word_hashes(words, seed)
            order = np.argsort(hashed, kind="stable")
            ordered = hashed[order]
            if not (ordered[1:] == ordered[:-1]).any():
                return cls(ordered, order.astype(np.int32), seed, unk_id)
        raise VocabularyError(f"{len(words)} words collide under {_LOOKUP_SEEDS} hash seeds; this is a bug")

    def ids_of_hashes(self, hashes: np.ndarray) -> np.ndarray:
        """(n,) int32 ids of the words with these hashes (under `self.seed`); unknown: `<unk>`."""
        # sorted queries: numpy's binary search starts each one where the last ended, so the walk
        # through a large table stays in cache (5x faster at 10M words)
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        at = np.minimum(np.searchsorted(self.hashes, ordered), len(self.hashes) - 1)
        ids = np.empty(hashes.size, dtype=np.int32)
        ids[order] = np.where(self.hashes[at] == ordered, self.ids[at], np.int32(self.unk_id))
        return ids

    def ids_of_distinct(self, words: pa.Array, hashes: np.ndarray | None = None) -> np.ndarray:
        """(n,) int32 ids of distinct `words`; `hashes`: their seed-0 hashes, used when this lookup's seed is 0."""
        return self.ids_of_hashes(hashes if hashes is not None and self.seed == 0 else word_hashes(words, self.seed))

    def ids_of(self, words: pa.Array) -> np.ndarray:
        """(n,) int32 ids of `words`, each distinct word hashed once."""
        encoded = pc.dictionary_encode(words)
        return self.ids_of_distinct(encoded.dictionary)[encoded.indices.to_numpy(zero_copy_only=False)]


class Vocabulary:
    """An immutable word <-> id map with the training-corpus count of every word."""

    TABLE_METADATA: ClassVar[dict[bytes, bytes]] = {b"lightrnn.kind": b"vocabulary"}  # what `load` checks for

    def __init__(self, words: Sequence[str], counts: Sequence[int] | np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if len(words) != counts.shape[0]:
            raise VocabularyError(f"{len(words)} words but {counts.shape[0]} counts")
        self.words: list[str] = list(words)
        self.counts = counts
        self._ids = {w: i for i, w in enumerate(self.words)}
        if len(self._ids) != len(self.words):
            raise VocabularyError("duplicate words in the vocabulary")
        for special in (UNK, EOS):
            if special not in self._ids:
                raise VocabularyError(f"the vocabulary must contain {special}")
        self.unk_id = self._ids[UNK]
        self.eos_id = self._ids[EOS]

    @classmethod
    def build(cls, counts: Mapping[str, int], max_size: int = 0, min_count: int = 1) -> Vocabulary:
        """Keep words seen at least `min_count` times, the `max_size` most frequent if > 0.

        Dropped words' occurrences are added to `<unk>`; `<unk>` and `<eos>` are always kept.
        """
        if max_size and max_size < 2:
            raise VocabularyError(f"max_size must be 0 (no limit) or >= 2 (room for {UNK} and {EOS}), got {max_size}")
        if min_count < 1:
            raise VocabularyError(f"min_count must be >= 1, got {min_count}")
        if not counts or sum(counts.values()) == 0:
            raise VocabularyError("cannot build a vocabulary from an empty corpus: no words were counted")
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        specials = {UNK: counts.get(UNK, 0), EOS: counts.get(EOS, 0)}
        room = max_size - len(specials) if max_size else len(ordered)  # the specials always stay
        kept: list[tuple[str, int]] = []
        for word, count in ordered:
            if word in specials:
                continue
            if count >= min_count and len(kept) < room:
                kept.append((word, count))
            else:
                specials[UNK] += count
        kept.extend(specials.items())
        kept.sort(key=lambda kv: (-kv[1], kv[0]))
        return cls([w for w, _ in kept], [c for _, c in kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._ids

    def id_of(self, word: str) -> int:
        """The word's id, or `<unk>`'s."""
        return self._ids.get(word, self.unk_id)

    def encode(self, words: Iterable[str]) -> np.ndarray:
        """(N,) int32 ids; unknown words map to `<unk>`."""
        get, unk = self._ids.get, self.unk_id
        return np.fromiter((get(w, unk) for w in words), dtype=np.int32)

    def encode_line(self, line: str, lower: bool = False) -> np.ndarray:
        """Whitespace-tokenised ids of one line followed by `<eos>`."""
        ids = self.encode(tokenize(line, lower))
        return np.append(ids, np.int32(self.eos_id))

    def lookup(self) -> WordLookup:
        return WordLookup.build(pa.array(self.words, pa.large_string()), self.unk_id)

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[int(i)] for i in ids]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words and np.array_equal(self.counts, other.counts)

    __hash__ = None  # type: ignore[assignment]

    def to_table(self) -> pa.Table:
        table = pa.table({"word": pa.array(self.words, pa.string()), "count": pa.array(self.counts, pa.int64())})
        return table.replace_schema_metadata(self.TABLE_METADATA)

    def save(self, where: str | os.PathLike[str] | BinaryIO) -> None:
        """Write as Parquet: one row per id, columns word and count."""
        atomic_write_table(self.to_table(), where)

    @classmethod
    def load(cls, where: str | os.PathLike[str] | BinaryIO) -> Vocabulary:
        """Read a vocabulary written by `save`; refuses any other Parquet file."""
        table = read_tagged_table(where, "vocabulary", ("word", "count"), VocabularyError, "Vocabulary.save")
        return cls(table.column("word").to_pylist(), table.column("count").to_numpy())
