"""The text rules: what a line is and what a word is.

`tokenize` is the rule, for one line in Python. `lightrnn.wordcodes.encode_text` applies
it to many lines at once with numpy, for the corpus stage at scale; the tests hold the two
together on every Unicode whitespace and case character.

A line ends at "\\r\\n", "\\r" or "\\n" (universal newlines, as Python's text mode reads);
a last line without a line end still counts (`lines_from_bytes`). Words are the runs of
characters between Unicode whitespace (`str.split()`).
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class TextError(ValueError):
    """Text that cannot be read as UTF-8 lines."""


def tokenize(line: str, lower: bool = False) -> list[str]:
    """The words of one line: the project's one tokenizer rule.

    Whitespace-separated tokens (`str.split`: any run of Unicode whitespace), after
    lower-casing when `lower` is set. Every reader, counter and encoder follows it.
    """
    return (line.lower() if lower else line).split()


# -- many strings at once (Arrow) ------------------------------------------------------------

# Characters whose lower case Arrow's utf8_lower (utf8proc) gives differently from Python's
# str.lower() (Greek capital sigma: Python writes a final sigma at a word's end); strings
# holding one are lower-cased in Python. The tests recompute this set over every code point.
_LOWER_DIFFERS = (
    "\u03a3\u0130\u1c89\ua7cb\ua7cc\ua7ce\ua7d2\ua7d4\ua7da\ua7dc"
    "\U00010d50\U00010d51\U00010d52\U00010d53\U00010d54\U00010d55\U00010d56\U00010d57\U00010d58"
    "\U00010d59\U00010d5a\U00010d5b\U00010d5c\U00010d5d\U00010d5e\U00010d5f\U00010d60\U00010d61"
    "\U00010d62\U00010d63\U00010d64\U00010d65"
    "\U00016ea0\U00016ea1\U00016ea2\U00016ea3\U00016ea4\U00016ea5\U00016ea6\U00016ea7\U00016ea8"
    "\U00016ea9\U00016eaa\U00016eab\U00016eac\U00016ead\U00016eae\U00016eaf\U00016eb0\U00016eb1"
    "\U00016eb2\U00016eb3\U00016eb4\U00016eb5\U00016eb6\U00016eb7\U00016eb8"
)
_LOWER_DIFFERS_PATTERN = "[" + _LOWER_DIFFERS + "]"


def _bad_line(data: bytes) -> tuple[int, UnicodeDecodeError]:
    """(1-based line number, error) of the first line of `data` that is not UTF-8."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return number, e
    raise AssertionError("no invalid line found")  # only called when decoding failed


def lines_from_bytes(data: bytes, where: str = "text", first_line: int = 1) -> pa.LargeStringArray:
    """The lines of UTF-8 text, without their line ends; a clear error at the first invalid line.

    `where` and `first_line` only name the place in the error message.
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not data:
        return pa.array([], pa.large_string())
    end = len(data) - 1 if data.endswith(b"\n") else len(data)  # a final line end closes the last line
    offsets = pa.py_buffer(np.array([0, end], dtype=np.int64))
    whole = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
    lines = pc.split_pattern(whole, pattern=b"\n")[0].values
    try:
        return lines.cast(pa.large_string())  # validates UTF-8
    except pa.ArrowInvalid:
        _raise_bad_line(data[:end], where, first_line)


def check_utf8(data: bytes, where: str = "text", first_line: int = 1) -> None:
    """A clear error at the first line of `data` that is not valid UTF-8 (Arrow's validation, no copy)."""
    offsets = pa.py_buffer(np.array([0, len(data)], dtype=np.int64))
    try:
        pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)]).validate(full=True)
    except pa.ArrowInvalid:
        _raise_bad_line(data, where, first_line)


def _raise_bad_line(data: bytes, where: str, first_line: int) -> NoReturn:
    number, e = _bad_line(data)
    raise TextError(
        f"{where}: line {first_line + number - 1} is not valid UTF-8 ({e.reason} at byte {e.start}); "
        "fix or re-encode the file"
    ) from None


def offsets_and_bytes(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A large_string array's offsets (n + 1) and the bytes they index (from offsets[0]), without copies."""
    if len(strings) == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64)[strings.offset : strings.offset + len(strings) + 1]
    return offsets, np.frombuffer(strings.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]


def documents_text(texts: pa.Array) -> tuple[bytes, int]:
    """A column of documents as one text whose lines end with a line feed, and the null documents skipped.

    Each document reads like a file of its own: its lines end at line ends, a final line end
    does not start an empty line, and an empty document has no lines.
    """
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    nulls = texts.null_count
    texts = (texts.drop_null() if nulls else texts).cast(pa.large_string())
    if len(texts) == 0:
        return b"", nulls
    offsets, data = offsets_and_bytes(texts)
    if (data == 0x0D).any():  # universal newlines: every line end as "\n" (one numpy pass finds a "\r")
        texts = pc.replace_substring(pc.replace_substring(texts, "\r\n", "\n"), "\r", "\n")
        offsets, data = offsets_and_bytes(texts)
    starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
    unclosed = (ends > starts) & (data[np.maximum(ends - 1, 0)] != 0x0A)  # its last line has no line end
    return np.insert(data, ends[unclosed], 0x0A).tobytes(), nulls


def lower_case(strings: pa.Array) -> pa.Array:
    """Python's `str.lower()` of each string: Arrow's utf8_lower, and Python for the few characters it gets wrong."""
    lowered = pc.utf8_lower(strings)
    odd = pc.match_substring_regex(strings, _LOWER_DIFFERS_PATTERN)
    if not pc.any(odd).as_py():
        return lowered
    fixed = [s.lower() for s in strings.filter(odd).to_pylist()]  # rare: only strings holding one of them
    return pc.replace_with_mask(lowered, odd, pa.array(fixed, lowered.type))
