"""Single-process corpus reading: count words and encode text files to id streams.

The distributed version of these steps (Ray Data over object storage) lives in
`pipeline/`; this one serves local runs, tests and the demo.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator

import numpy as np

from lightrnn.io import open_text
from lightrnn.vocab import EOS, Vocabulary, tokenize


def read_lines(path: str | os.PathLike[str]) -> Iterator[str]:
    """Lines of a UTF-8 text file (.xz/.gz decompressed); invalid UTF-8 names file and line."""
    with open_text(path) as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, start=1):  # noqa: B007 - used in the error below
                yield line
        except UnicodeDecodeError as e:
            raise ValueError(f"{os.fspath(path)}: invalid UTF-8 after line {line_no}: {e.reason}") from e


def count_words(paths: Iterable[str | os.PathLike[str]], lower: bool = False) -> Counter[str]:
    """Whitespace-token counts over all files, with one `<eos>` per line."""
    counts: Counter[str] = Counter()
    for path in paths:
        for line in read_lines(path):
            counts.update(tokenize(line, lower))
            counts[EOS] += 1
    return counts


def encode_file(path: str | os.PathLike[str], vocab: Vocabulary, lower: bool = False) -> np.ndarray:
    """(N,) int64 id stream of a text file, `<eos>` after every line."""
    pieces = [vocab.encode_line(line, lower) for line in read_lines(path)]
    if not pieces:
        raise ValueError(f"{os.fspath(path)} is empty: a corpus split needs at least one line")
    return np.concatenate(pieces).astype(np.int64)
