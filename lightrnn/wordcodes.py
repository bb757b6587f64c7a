"""Words as integers, fast: 64-bit word hashes, dictionary codes, and whole chunks of text encoded.

A word is a span (start, length) of a byte buffer. Everything here works on spans with
numpy, so a chunk of text is never cut into millions of Python strings:

    bytes of lines  --spans-->  (start, length) of every word   (numpy on the UTF-8 bytes)
    spans  --keys-->  one uint64 per word: its bytes if it has at most 7, else a hash
    keys  --Arrow's integer hash table-->  codes into the chunk's distinct words

`encode_text` is the `tokenize` rule of `lightrnn.text` applied to many lines at once; the
tests hold the two together.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lightrnn.text import check_utf8, lower_case, offsets_and_bytes

Encoded = tuple[np.ndarray, pa.Array, np.ndarray]  # (codes, distinct words, each line's first word)

_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(8)], dtype=np.uint64)  # masks of the first k bytes
_LONG = np.uint64(1 << 63)  # marks keys of words longer than 7 bytes (hashed), apart from exact short keys
# an odd multiplier (invertible mod 2^64): spreads the keys for Arrow's hash table, and is undone after
_SPREAD = 0x9E3779B97F4A7C15
_SPREAD_INVERSE = pow(_SPREAD, -1, 1 << 64)
_TEXT_SPACE = np.zeros(256, dtype=bool)  # ASCII characters str.split() splits on (\x1c-\x1f included)
_TEXT_SPACE[[0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20]] = True
# the whitespace beyond ASCII that str.split() splits on (all below U+3001: 2 or 3 bytes in
# UTF-8); the tests recompute it over every code point
UNICODE_SPACES = np.array([0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000])
_ASCII_LOWER = np.arange(256, dtype=np.uint8)
_ASCII_LOWER[ord("A") : ord("Z") + 1] += 32


def _splitmix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: every input bit moves every output bit."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _padded(data: np.ndarray) -> np.ndarray:
    """`data` with 8 zero bytes after it, so 8 bytes can be read at any of its offsets."""
    out = np.zeros(data.size + 8, dtype=np.uint8)
    out[: data.size] = data
    return out


def _spans(words: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(padded bytes, starts, lengths) of a string array's words."""
    words = words.combine_chunks() if isinstance(words, pa.ChunkedArray) else words
    offsets, data = offsets_and_bytes(words.cast(pa.large_string()))
    return _padded(data), offsets[:-1] - offsets[0], np.diff(offsets)


def _hash_spans(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, *seeds: int) -> list[np.ndarray]:
    """One hash per seed of each span's bytes: Horner's polynomial (a base per seed), then mixed.

    One step per byte position, over the spans still that long; the seeds share each step's
    byte reads.
    """
    hashes = [np.zeros(starts.size, dtype=np.uint64) for _ in seeds]
    bases = [np.uint64((0x100000001B3 + 2 * seed) | 1) for seed in seeds]  # odd: powers never vanish
    shortest = int(lengths.min()) if lengths.size else 0
    alive = np.flatnonzero(lengths > shortest)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max()) if lengths.size else 0):
            if j < shortest:  # every span is this long: no index needed
                byte = data[starts + j].astype(np.uint64) + np.uint64(1)
                for h, base in zip(hashes, bases, strict=True):
                    h *= base
                    h += byte
                continue
            if j > shortest:
                alive = alive[lengths[alive] > j]
            byte = data[starts[alive] + j].astype(np.uint64) + np.uint64(1)
            for h, base in zip(hashes, bases, strict=True):
                h[alive] = h[alive] * base + byte
        size = lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return [_splitmix(h + size + np.uint64(seed)) for h, seed in zip(hashes, seeds, strict=True)]


def word_hashes(words: pa.Array, seed: int = 0) -> np.ndarray:
    """(n,) uint64 hash of each string's UTF-8 bytes. `seed` picks the polynomial; a vocabulary
    whose words collide under one seed is hashed with the next (`lightrnn.vocab.WordLookup`)."""
    if words.null_count:
        raise ValueError("cannot hash null words")
    return _hash_spans(*_spans(words), seed)[0]


def _strings(lengths: np.ndarray, sources: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> pa.Array:
    """A string array of the given lengths, its bytes copied from (rows, source bytes, source starts)."""
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.empty(int(offsets[-1]), dtype=np.uint8)
    for rows, source, starts in sources:
        sizes = lengths[rows]
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        data[np.repeat(offsets[rows], sizes) + within] = source[np.repeat(starts, sizes) + within]
    return pa.Array.from_buffers(pa.large_string(), lengths.size, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _span_codes(
    data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, source: pa.Array | None = None
) -> tuple[np.ndarray, pa.Array]:
    """Codes of the spans of `data` (padded) into their distinct words, distinct in first-seen order.

    Each word gets a 64-bit key: exactly its bytes (and length) if it has at most 7, else a
    hash with the top bit set. Arrow's integer hash table numbers the keys. Long words that
    share that hash would share a code: a second, independent hash of every long word must
    then agree with its code's first word, else Arrow's string table numbers the words
    instead. The distinct words come from `source` (the words as an Arrow array), or are
    rebuilt from the keys and the spans.
    """
    n = starts.size
    if n == 0:
        return np.zeros(0, dtype=np.int32), pa.array([], pa.large_string())
    eight = np.ndarray(shape=(data.size - 7,), dtype="<u8", buffer=data, strides=(1,))  # 8 bytes at any offset
    keys = eight[starts] & _LOW_BYTES[np.minimum(lengths, 7)]
    keys |= lengths.astype(np.uint64) << np.uint64(56)
    long = np.flatnonzero(lengths > 7)
    if long.size:  # the key, and a second, independent hash to check that the key told the words apart
        key_hash, check = _hash_spans(data, starts[long], lengths[long], 0, 1)
        keys[long] = key_hash | _LONG
    with np.errstate(over="ignore"):
        encoded = pc.dictionary_encode(pa.array(keys * np.uint64(_SPREAD)))
        distinct_keys = encoded.dictionary.to_numpy() * np.uint64(_SPREAD_INVERSE)
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    first = np.empty(distinct_keys.size, dtype=np.int64)
    first[codes[::-1]] = np.arange(n - 1, -1, -1)  # the last write wins: each code's first word
    if long.size:
        per_code = np.zeros(distinct_keys.size, dtype=np.uint64)
        per_code[codes[long]] = check  # any of a code's words; they must all agree
        if not np.array_equal(per_code[codes[long]], check):  # two long words shared a 63-bit hash:
            words = source if source is not None else _strings(lengths, [(np.arange(n), data, starts)])
            fallback = pc.dictionary_encode(words)  # number the strings themselves
            return fallback.indices.to_numpy(zero_copy_only=False).astype(np.int32), fallback.dictionary
    if source is not None:
        return codes, source.take(pa.array(first))
    is_long = (distinct_keys & _LONG) != 0
    short_rows, long_rows = np.flatnonzero(~is_long), np.flatnonzero(is_long)
    sizes = (distinct_keys >> np.uint64(56)).astype(np.int64)
    sizes[long_rows] = lengths[first[long_rows]]
    key_bytes = np.ascontiguousarray(distinct_keys[short_rows]).view(np.uint8)  # 8 little-endian bytes a key
    sources = [
        (short_rows, key_bytes, np.arange(short_rows.size, dtype=np.int64) * 8),
        (long_rows, data, starts[first[long_rows]]),
    ]
    return codes, _strings(sizes, sources)


def word_codes(words: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Dictionary-encode a word array: (codes (n,) int32, distinct words in first-seen order).

    The result of Arrow's `dictionary_encode`, at a fraction of its cost (`_span_codes`).
    """
    words = words.combine_chunks() if isinstance(words, pa.ChunkedArray) else words
    return _span_codes(*_spans(words), words.cast(pa.large_string()))


def _mark_unicode_spaces(raw: np.ndarray, word: np.ndarray) -> None:
    """Mark the bytes of the whitespace characters beyond ASCII (2 or 3 bytes of valid UTF-8) as no word's."""
    text = raw[:-8]
    lead = np.flatnonzero(text >= 0xC2)
    byte = text[lead]
    lead = lead[(byte == 0xC2) | ((byte >= 0xE1) & (byte <= 0xE3))]  # the first bytes such spaces can have
    if not lead.size:
        return
    b0, b1, b2 = (raw[lead + k].astype(np.int32) for k in range(3))
    two = b0 == 0xC2
    code_points = np.where(
        two, ((b0 & 0x1F) << 6) | (b1 & 0x3F), ((b0 & 0x0F) << 12) | ((b1 & 0x3F) << 6) | (b2 & 0x3F)
    )
    space = np.isin(code_points, UNICODE_SPACES)
    at, three = lead[space], ~two[space]
    word[at] = word[at + 1] = False
    word[at[three] + 2] = False


def encode_text(data: bytes, lower: bool = False, where: str = "text", first_line: int = 1) -> Encoded:
    """The words of some lines of text, `tokenize`d: codes into their distinct words, and line offsets.

    Returns (codes (n,) int32, distinct words, offsets (lines + 1,)): line i holds the words
    codes[offsets[i]:offsets[i+1]]. Lines end as `lines_from_bytes` says. The text is split
    with numpy on its UTF-8 bytes (whitespace runs mark the words); with `lower`, ASCII
    letters are lower-cased on the bytes and, in text beyond ASCII, the distinct words then
    as `str.lower()` does (a word's lower case never depends on the words around it).
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    ascii_text = data.isascii()
    if not ascii_text:
        check_utf8(data, where, first_line)
    raw = _padded(np.frombuffer(data, dtype=np.uint8))
    if lower:
        raw = _ASCII_LOWER[raw]
    text = raw[:-8]
    inside = np.zeros(text.size + 2, dtype=bool)  # inside[i + 1]: byte i belongs to a word; none beyond the ends
    word = inside[1:-1]
    np.greater(text, 0x20, out=word)
    controls = np.flatnonzero(text < 0x20)  # line ends, tabs; a control character that is no space is a letter
    word[controls] = ~_TEXT_SPACE[text[controls]]
    if not ascii_text:
        _mark_unicode_spaces(raw, word)
    # a word begins where the mask rises and ends where it falls (comparing booleans: numpy's fast nonzero)
    starts = np.flatnonzero(inside[1:] > inside[:-1])
    ends = np.flatnonzero(inside[1:] < inside[:-1])
    line_ends = controls[text[controls] == 0x0A]
    lines = line_ends.size + (1 if text.size and text[-1] != 0x0A else 0)  # a last line without its line end
    offsets = np.zeros(lines + 1, dtype=np.int64)
    offsets[1 : line_ends.size + 1] = np.searchsorted(starts, line_ends)
    offsets[line_ends.size + 1 :] = starts.size
    codes, distinct = _span_codes(raw, starts, ends - starts)
    if lower and not ascii_text:  # Unicode lower case, once per distinct word; words may merge
        remap, distinct = word_codes(lower_case(distinct))
        codes = remap[codes]
    return codes, distinct, offsets
