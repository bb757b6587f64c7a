"""The text rules: what a line is, what a word is, and a 64-bit hash of each word.

`tokenize` is the rule, for one line in Python. The Arrow functions apply the same rule to
many lines at once in C++ kernels, for the corpus stage at scale; the tests hold them to
`tokenize` on every Unicode whitespace and case character.

    bytes  --lines_from_bytes-->  lines (large_string)  --split_words-->  list<word> per line

A line ends at "\\r\\n", "\\r" or "\\n" (universal newlines, as Python's text mode reads);
a last line without a line end still counts. Words are the runs of characters between
Unicode whitespace (`str.split()`; Arrow's `utf8_split_whitespace` splits on the same set).
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


# -- many lines at once (Arrow) --------------------------------------------------------------

# Characters whose lower case Arrow's utf8_lower (utf8proc) gives differently from Python's
# str.lower() (Greek capital sigma: Python writes a final sigma at a word's end); lines holding
# one are lower-cased in Python. The tests recompute this set over every code point.
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


def _offsets_and_bytes(texts: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A large_string array's offsets and the bytes they index (from offsets[0]), without copies."""
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset : texts.offset + len(texts) + 1]
    return offsets, np.frombuffer(texts.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]


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
    offsets, data = _offsets_and_bytes(texts)
    if (data == 0x0D).any():  # universal newlines: every line end as "\n" (one numpy pass finds a "\r")
        texts = pc.replace_substring(pc.replace_substring(texts, "\r\n", "\n"), "\r", "\n")
        offsets, data = _offsets_and_bytes(texts)
    starts, ends = offsets[:-1] - offsets[0], offsets[1:] - offsets[0]
    unclosed = (ends > starts) & (data[np.maximum(ends - 1, 0)] != 0x0A)  # its last line has no line end
    return np.insert(data, ends[unclosed], 0x0A).tobytes(), nulls


def _ascii_lines(lines: pa.Array) -> np.ndarray:
    """Per line: True when Arrow's faster ASCII kernels split it as `str.split()` does.

    That is ASCII without the separators \x1c-\x1f, which Python counts as whitespace and
    Arrow's ASCII kernels do not. Checked on the whole buffer first (one pass each).
    """
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    data = np.frombuffer(lines.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]] if len(lines) else []
    if len(data) == 0:
        return np.ones(len(lines), dtype=bool)
    if data.max() < 0x80 and not np.any((data - np.uint8(0x1C)) < 4):
        return np.ones(len(lines), dtype=bool)
    special = np.concatenate([[0], np.cumsum((data >= 0x80) | ((data - np.uint8(0x1C)) < 4), dtype=np.int64)])
    rel = offsets - offsets[0]
    return special[rel[1:]] == special[rel[:-1]]


_ASCII_SPACE = np.zeros(256, dtype=bool)
_ASCII_SPACE[[0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20]] = True


def _ascii_edges_have_space(lines: pa.Array) -> bool:
    """Whether any line starts or ends with ASCII whitespace (one look at each line's two ends)."""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)[lines.offset : lines.offset + len(lines) + 1]
    if len(lines) == 0 or offsets[-1] == offsets[0]:
        return False
    data = np.frombuffer(lines.buffers()[2], dtype=np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    filled = ends > starts
    return bool(_ASCII_SPACE[data[starts[filled]]].any() or _ASCII_SPACE[data[ends[filled] - 1]].any())


def _split(lines: pa.Array, ascii_kernels: bool, lower: bool) -> pa.ListArray:
    if lower:
        lines = pc.ascii_lower(lines) if ascii_kernels else _lower(lines)
    trim, split = (
        (pc.ascii_trim_whitespace, pc.ascii_split_whitespace)
        if ascii_kernels
        else (pc.utf8_trim_whitespace, pc.utf8_split_whitespace)
    )
    # str.split() drops leading and trailing whitespace; trimming copies every line, so only when needed
    trimmed = lines if ascii_kernels and not _ascii_edges_have_space(lines) else trim(lines)
    lists = split(trimmed)
    # a line with no words splits into one empty string; drop it
    blank = pc.equal(pc.binary_length(trimmed), 0).to_numpy(zero_copy_only=False)
    if not blank.any():
        return lists
    words = lists.flatten()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False) - blank
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), words.filter(pc.greater(pc.binary_length(words), 0)))


def split_words(lines: pa.Array, lower: bool = False) -> pa.ListArray:
    """The words of each line (`tokenize`, in C++): a list<large_string> array, one list per line.

    Lines that are plain ASCII go through Arrow's ASCII kernels (several times faster), the
    others through its Unicode ones; both split exactly as `str.split()` does.
    """
    lines = lines.cast(pa.large_string())
    fast = _ascii_lines(lines)
    if fast.all() or not fast.any():
        return _split(lines, bool(fast.all()), lower)
    # mixed: split each kind apart, then put every line's words back in line order
    fast_lists = _split(lines.filter(pa.array(fast)), True, lower)
    slow_lists = _split(lines.filter(pa.array(~fast)), False, lower)
    lengths = np.empty(len(lines), dtype=np.int64)
    lengths[fast] = pc.list_value_length(fast_lists).to_numpy(zero_copy_only=False)
    lengths[~fast] = pc.list_value_length(slow_lists).to_numpy(zero_copy_only=False)
    fast_words, slow_words = fast_lists.flatten(), slow_lists.flatten()
    first = np.empty(len(lines), dtype=np.int64)  # where each line's words start in fast + slow
    first[fast] = np.asarray(fast_lists.offsets)[:-1] - fast_lists.offsets[0].as_py()
    first[~fast] = len(fast_words) + np.asarray(slow_lists.offsets)[:-1] - slow_lists.offsets[0].as_py()
    offsets = np.zeros(len(lines) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    order = np.repeat(first - offsets[:-1], lengths) + np.arange(offsets[-1])
    words = pa.concat_arrays([fast_words, slow_words]).take(pa.array(order))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), words)


def _lower(lines: pa.Array) -> pa.Array:
    lowered = pc.utf8_lower(lines)
    odd = pc.match_substring_regex(lines, _LOWER_DIFFERS_PATTERN)
    if not pc.any(odd).as_py():
        return lowered
    picks = np.flatnonzero(odd.to_numpy(zero_copy_only=False))
    fixed = lowered.to_pylist()
    for i in picks.tolist():  # rare: only lines holding one of these characters
        fixed[i] = lines[i].as_py().lower()
    return pa.array(fixed, lowered.type)
