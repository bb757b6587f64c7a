"""The vocabulary: words, ids and counts, with `<unk>` and `<eos>`.

Ids are ordered by descending count, ties broken by the word's code points, so the same
counts always give the same ids (on one machine or many) and the adaptive-softmax
baseline gets the frequency order it relies on.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from lightrnn.io import atomic_write_table, read_tagged_table

UNK = "<unk>"
EOS = "<eos>"


def tokenize(line: str, lower: bool = False) -> list[str]:
    """The words of one line: the project's one tokenizer rule.

    Whitespace-separated tokens (`str.split`: any run of Unicode whitespace), after
    lower-casing when `lower` is set. Every reader, counter and encoder goes through it;
    the vectorised corpus stage is tested against it.
    """
    return (line.lower() if lower else line).split()


class VocabularyError(ValueError):
    """A vocabulary that cannot be built or read."""


class Vocabulary:
    """An immutable word <-> id map with the training-corpus count of every word."""

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

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[int(i)] for i in ids]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words and np.array_equal(self.counts, other.counts)

    __hash__ = None  # type: ignore[assignment]

    def to_table(self) -> pa.Table:
        table = pa.table({"word": pa.array(self.words, pa.string()), "count": pa.array(self.counts, pa.int64())})
        return table.replace_schema_metadata({b"lightrnn.kind": b"vocabulary"})

    def save(self, where: str | os.PathLike[str] | BinaryIO) -> None:
        """Write as Parquet: one row per id, columns word and count."""
        atomic_write_table(self.to_table(), where)

    @classmethod
    def load(cls, where: str | os.PathLike[str] | BinaryIO) -> Vocabulary:
        """Read a vocabulary written by `save`; refuses any other Parquet file."""
        table = read_tagged_table(where, "vocabulary", ("word", "count"), VocabularyError, "Vocabulary.save")
        return cls(table.column("word").to_pylist(), table.column("count").to_numpy())
