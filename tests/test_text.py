"""The text rules: Arrow and numpy tokenisation, word codes and hashes agree with `tokenize` exactly."""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lightrnn import text, wordcodes
from lightrnn.text import documents_text, lines_from_bytes, lower_case, tokenize
from lightrnn.vocab import Vocabulary, WordLookup
from lightrnn.wordcodes import encode_text, word_codes, word_hashes

CODE_POINTS = [c for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]


def every_character_lines() -> list[str]:
    """Each code point as a separator, alone, and at a line's edges; plus blank and plain lines."""
    lines = ["", "  ", "a", " a  b ", "\x1c x \x1f y", "Tab\tSep", "plain ascii line"]
    for c in CODE_POINTS:
        ch = chr(c)
        lines += [f"{ch}a{ch}b{ch}", ch, f"{ch}{ch}x"]
    return lines


def test_the_lower_case_exceptions_are_exactly_those_arrow_gets_wrong() -> None:
    # recomputed here: every character whose lower case Arrow's utf8_lower gives otherwise than Python,
    # plus capital sigma, whose Python lower case depends on the next character
    chars = [chr(c) for c in CODE_POINTS]
    arrow = pc.utf8_lower(pa.array(chars)).to_pylist()
    differ = {ch for ch, low in zip(chars, arrow, strict=True) if ch.lower() != low} | {"\u03a3"}
    assert differ == set(text._LOWER_DIFFERS)
    words = ["ΣΑΣ", "İstanbul", "Abc", "ΟΔΟΣ-ΣΑ", "x"]
    assert lower_case(pa.array(words, pa.large_string())).to_pylist() == [w.lower() for w in words]


@pytest.mark.parametrize("lower", [False, True])
def test_encode_text_is_tokenize_line_by_line(lower: bool) -> None:
    cases = [b"", b"\n", b"a", b"a\n", b"a b\n\nc", b" a  b \n\t c\x1cd\x1f\n", b"x\r\ny\rz", b"\n\n", b"  \n"]
    cases += [b"A B\x7fC\x01D", "café \u00a0x\u2003y\nΣΑΣ\n".encode()]  # control bytes are letters; non-ASCII
    cases += ["\n".join(every_character_lines()).encode()]  # every code point as a separator and a letter
    for data in cases:
        codes, distinct, offsets = encode_text(data, lower)
        words = distinct.take(pa.array(codes)).to_pylist()
        lines = lines_from_bytes(data).to_pylist()
        got = [words[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
        assert got == [tokenize(line, lower) for line in lines], data[:60]


def test_the_unicode_spaces_are_exactly_those_str_split_splits_on() -> None:
    assert {c for c in CODE_POINTS if c >= 0x80 and chr(c).isspace()} == set(wordcodes.UNICODE_SPACES.tolist())


def test_encode_text_names_the_line_that_is_not_utf8() -> None:
    for lower in (False, True):
        with pytest.raises(text.TextError, match=r"f\.txt: line 12 is not valid UTF-8"):
            encode_text("café\nok\n".encode() + b"bad \xff\n", lower, "f.txt", first_line=10)


def test_lines_end_as_in_text_mode() -> None:
    assert lines_from_bytes(b"a b\r\nc\rd\n\ne").to_pylist() == ["a b", "c", "d", "", "e"]
    assert lines_from_bytes(b"\n").to_pylist() == [""] and lines_from_bytes(b"").to_pylist() == []
    with pytest.raises(text.TextError, match=r"f\.txt: line 2 is not valid UTF-8"):
        lines_from_bytes(b"ok\nbad \xff\n", "f.txt")


def test_documents_read_like_files() -> None:
    docs = pa.array(["a b\nc\n", None, "", "\n", "x\r\ny", "q\n\n", "end"])
    body, nulls = documents_text(docs)
    assert nulls == 1
    assert body == b"a b\nc\n\nx\ny\nq\n\nend\n"  # the empty document has no line; "\n" is one empty line


def test_word_codes_equal_arrows_dictionary_encoding() -> None:
    rng = np.random.default_rng(0)
    short = [f"w{i}" for i in rng.integers(0, 500, 3000)]
    long = [f"a-much-longer-word-{i}" for i in rng.integers(0, 300, 2000)]
    words = pa.array(rng.permutation(short + long + ["", "é", "日本語"]).tolist(), pa.large_string())
    for array in (words, words.slice(7, 2500)):
        codes, distinct = word_codes(array)
        expected = pc.dictionary_encode(array)
        assert distinct.to_pylist() == expected.dictionary.to_pylist()  # same first-seen order
        assert np.array_equal(codes, expected.indices.to_numpy())


def test_word_codes_survive_colliding_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    words = pa.array(["a-long-word-one", "a-long-word-two", "short", "a-long-word-one"], pa.large_string())
    # every long word gets the same key hash: the second hash catches it and the string table takes over
    hash_spans = wordcodes._hash_spans

    def colliding(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, *seeds: int) -> list[np.ndarray]:
        hashes = hash_spans(data, starts, lengths, *seeds)
        return [np.zeros_like(h) if seed == 0 else h for h, seed in zip(hashes, seeds, strict=True)]

    monkeypatch.setattr(wordcodes, "_hash_spans", colliding)
    codes, distinct = word_codes(words)
    assert distinct.take(pa.array(codes)).to_pylist() == words.to_pylist()
    assert len(distinct) == 3


def test_word_hashes_depend_on_the_bytes_only() -> None:
    words = pa.array(["alpha", "beta", "alpha", "gamma-delta-epsilon"], pa.large_string())
    h = word_hashes(words)
    assert h[0] == h[2] and len(set(h.tolist())) == 3
    assert np.array_equal(word_hashes(words.slice(1, 3)), h[1:])  # an array's offset does not matter
    assert not np.array_equal(word_hashes(words, seed=1), h)


def test_lookup_maps_words_to_ids_and_unknown_words_to_unk() -> None:
    vocab = Vocabulary(["<unk>", "<eos>", "the", "cat", "a-rather-long-word"], [5, 4, 3, 2, 1])
    lookup = vocab.lookup()
    words = pa.array(["cat", "dog", "the", "a-rather-long-word", "<eos>", "cat"], pa.large_string())
    assert lookup.ids_of(words).tolist() == [3, 0, 2, 4, 1, 3]
    assert isinstance(lookup, WordLookup) and lookup.hashes.dtype == np.uint64
