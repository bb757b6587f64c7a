from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lightrnn.corpus import count_words, encode_file
from lightrnn.vocab import EOS, UNK, Vocabulary, VocabularyError


def test_ids_follow_descending_count_with_deterministic_ties() -> None:
    vocab = Vocabulary.build(Counter({"b": 3, "a": 3, "c": 5, EOS: 4}))
    assert vocab.words == ["c", EOS, "a", "b", UNK]
    assert vocab.counts.tolist() == [5, 4, 3, 3, 0]


def test_max_size_and_min_count_fold_into_unk() -> None:
    counts = Counter({"x": 10, "y": 5, "z": 1, EOS: 3, UNK: 2})
    vocab = Vocabulary.build(counts, max_size=3)
    assert set(vocab.words) == {"x", EOS, UNK}
    assert vocab.counts[vocab.unk_id] == 2 + 5 + 1
    vocab = Vocabulary.build(counts, min_count=2)
    assert "z" not in vocab and "y" in vocab and vocab.counts[vocab.unk_id] == 3
    assert vocab.counts.sum() == sum(counts.values())


def test_encode_line_appends_eos_and_maps_unknowns() -> None:
    vocab = Vocabulary.build(Counter({"the": 2, "cat": 1, EOS: 1}))
    ids = vocab.encode_line(" the dog  cat ")
    assert vocab.decode(ids) == ["the", UNK, "cat", EOS]
    assert ids.dtype == np.int32


@pytest.mark.parametrize(
    ("kwargs", "message"), [({}, "empty corpus"), ({"max_size": 1}, "max_size"), ({"min_count": 0}, "min_count")]
)
def test_bad_build_arguments_are_refused(kwargs, message: str) -> None:
    counts = Counter() if not kwargs else Counter({"a": 1})
    with pytest.raises(VocabularyError, match=message):
        Vocabulary.build(counts, **kwargs)


def test_save_load_round_trip_and_foreign_file(tmp_path) -> None:
    vocab = Vocabulary.build(Counter({"é": 2, "a b": 1, EOS: 1}))
    vocab.save(tmp_path / "v.parquet")
    assert Vocabulary.load(tmp_path / "v.parquet") == vocab
    from lightrnn.allocation import Allocation

    Allocation.random(3).save(tmp_path / "alloc.parquet")
    with pytest.raises(VocabularyError, match="not a vocabulary"):
        Vocabulary.load(tmp_path / "alloc.parquet")


def test_penn_treebank_counts_match_the_published_ones(ptb_dir) -> None:
    counts = count_words([ptb_dir / "ptb.train.txt.xz"])
    vocab = Vocabulary.build(counts)
    assert len(vocab) == 10_000
    assert sum(counts.values()) == 929_589
    stream = encode_file(ptb_dir / "ptb.valid.txt", vocab)
    assert stream.shape == (73_760,)
    assert (stream == vocab.eos_id).sum() == 3_370


def test_corpus_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such corpus file"):
        count_words([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("")
    vocab = Vocabulary.build(Counter({"a": 1, EOS: 1}))
    with pytest.raises(ValueError, match="empty.txt is empty"):
        encode_file(tmp_path / "empty.txt", vocab)
    (tmp_path / "bad.txt").write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(ValueError, match="bad.txt: invalid UTF-8"):
        count_words([tmp_path / "bad.txt"])
