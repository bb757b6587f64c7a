"""A synthetic Zipf corpus for scale tests at ClueWeb-like vocabulary sizes (10M words and more).

The word of rank r (1-based) is spelled `w{r}` and drawn with probability proportional to
1 / r**exponent (Zipf's law; natural text has an exponent close to 1). File k first spells
its 1/K share of the `distinct` words once each (shuffled), then draws the rest of its
tokens from the law, so the corpus holds exactly `distinct` words; `tokens` must therefore
be at least `distinct`. Preparing it with `max_vocab` below `distinct` trims the rarest.

Formats: `text` (lines of 1 to 39 words, `.txt`, or `.txt.gz` with `compress`) and
`parquet` (documents of about 40 lines in a `text` column, several row groups per file).
Everything is built with numpy and Arrow kernels, not a Python loop per word.
"""

from __future__ import annotations

import gzip
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline import storage

FORMATS = ("text", "parquet")
_MEAN_LINE = 20  # tokens per line on average; lines are 1..2*_MEAN_LINE-1 tokens
_MEAN_DOC = 40  # lines per Parquet document on average (1..2*_MEAN_DOC-1)
_ROW_GROUPS = 4  # row groups per Parquet file


def _zipf_cdf(distinct: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, distinct + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _lines(ranks: np.ndarray, rng: np.random.Generator) -> pa.Array:
    """The ranks as words `w{r}`, cut into lines joined by spaces."""
    words = pc.binary_join_element_wise("w", pc.cast(pa.array(ranks), pa.string()), "")
    ends = np.cumsum(rng.integers(1, 2 * _MEAN_LINE, size=ranks.size // _MEAN_LINE + 1))
    ends = np.append(ends[ends < ranks.size], ranks.size)  # the last line takes what is left
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words), " ")


def _join(items: pa.Array, sizes: np.ndarray, separator: str) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), items), separator)


def write_file(
    uri: str,
    index: int,
    files: int,
    distinct: int,
    tokens: int,
    exponent: float,
    seed: int,
    fmt: str,
    storage_options: dict,
) -> int:
    """Write file `index` of `files`; returns its token count (without <eos>)."""
    rng = np.random.default_rng([seed, index])
    cover = np.arange(index * distinct // files, (index + 1) * distinct // files, dtype=np.int64) + 1
    rng.shuffle(cover)
    n = tokens // files + (1 if index < tokens % files else 0)
    drawn = np.searchsorted(_zipf_cdf(distinct, exponent), rng.random(max(n - cover.size, 0)), side="right") + 1
    ranks = np.concatenate([cover, np.minimum(drawn, distinct)])
    lines = _lines(ranks, rng)
    if fmt == "parquet":
        sizes = rng.integers(1, 2 * _MEAN_DOC, size=len(lines) // _MEAN_DOC + 1)
        sizes = np.diff(np.minimum(np.concatenate([[0], np.cumsum(sizes)]), len(lines)))
        docs = _join(lines, sizes[sizes > 0], "\n")
        with storage.atomic_write(uri, storage_options) as f:
            pq.write_table(pa.table({"text": docs}), f, row_group_size=max(1, -(-len(docs) // _ROW_GROUPS)))
        return int(ranks.size)
    body = _join(lines, np.array([len(lines)]), "\n")[0].as_buffer().to_pybytes() + b"\n"
    with storage.atomic_write(uri, storage_options) as raw:
        if uri.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="wb") as f:
                f.write(body)
        else:
            raw.write(body)
    return int(ranks.size)


def write_corpus(
    output: str,
    distinct: int,
    tokens: int,
    files: int = 4,
    exponent: float = 1.0,
    seed: int = 0,
    fmt: str = "text",
    compress: bool = False,
    storage_options: dict[str, Any] | None = None,
    valid_files: int = 0,
    test_files: int = 0,
) -> list[str]:
    """Write `files` files under `output` in parallel (Ray tasks); returns their URIs.

    With `valid_files` or `test_files`, the last of the `files` go to `output/valid/` and
    `output/test/` and the others to `output/train/`: held-out text drawn from the same law.
    """
    if distinct < 1 or files < 1:
        raise ValueError(f"distinct and files must be >= 1, got distinct={distinct}, files={files}")
    if valid_files < 0 or test_files < 0 or valid_files + test_files >= files:
        raise ValueError(
            f"valid_files ({valid_files}) and test_files ({test_files}) must be >= 0 and leave at least one "
            f"of the {files} files for training"
        )
    if tokens < distinct:
        raise ValueError(f"tokens ({tokens}) must be >= distinct ({distinct}): every word is written at least once")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if compress and fmt == "parquet":
        raise ValueError("compress applies to text; Parquet files are compressed inside")
    suffix = ".parquet" if fmt == "parquet" else ".txt" + (".gz" if compress else "")
    so = dict(storage_options or {})
    train = files - valid_files - test_files
    split = ["train"] * train + ["valid"] * valid_files + ["test"] * test_files
    folders = [storage.join(output, name) if train < files else output for name in split]
    uris = [storage.join(folder, f"part-{i:05d}{suffix}") for i, folder in enumerate(folders)]
    task = ray.remote(write_file)
    ray.get([task.remote(u, i, files, distinct, tokens, exponent, seed, fmt, so) for i, u in enumerate(uris)])
    return uris
