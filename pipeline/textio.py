"""Reading corpus text from storage: input expansion and exact, line-numbered UTF-8 lines."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline import storage

# Text-mode universal newlines (what lightrnn.corpus.read_lines sees): \r\n, \r and \n end a line.
_NEWLINE = re.compile(r"\r\n|\r|\n")


class CorpusError(ValueError):
    """Corpus input that cannot be used: missing, empty or not UTF-8."""


def expand_inputs(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """The files a corpus URI names, sorted: a file, every file under a folder, or a glob."""
    fs, path = storage.filesystem(uri, storage_options)
    fs.invalidate_cache()
    if any(c in path for c in "*?["):
        paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        # hidden and marker files (.crc, _SUCCESS) are not corpus text
        paths = sorted(p for p in fs.find(path) if not p.rsplit("/", 1)[-1].startswith((".", "_")))
    elif fs.isfile(path):
        paths = [path]
    else:
        raise CorpusError(f"corpus input not found: {uri} (give a file, a folder of files or a glob)")
    if not paths:
        raise CorpusError(f"corpus input {uri} matches no files")
    return [fs.unstrip_protocol(p) for p in paths]


def iter_lines(uri: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[str]:
    """Lines of a UTF-8 text file (.gz/.xz decompressed by name), without line ends.

    Decoding line by line names the exact line of an invalid byte sequence.
    """
    with storage.open(uri, "rb", storage_options, compression="infer") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{uri}: line {line_no} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                    "fix or re-encode the file"
                ) from e
            pieces = _NEWLINE.split(text)
            if pieces[-1] == "":
                pieces.pop()
            yield from pieces
