"""A synthetic Zipf corpus for scale tests at ClueWeb-like vocabulary sizes (10M words).

Word of rank r (1-based) is spelled `w{r}` and drawn with probability proportional to
1 / r**exponent (Zipf's law; natural text has exponent close to 1). So that a test of
a V-word vocabulary gets exactly V words, file k first spells its 1/K share of all words
once each (shuffled), then draws the rest of its tokens from the Zipf law; `tokens`
must therefore be at least `vocab`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from pipeline import storage

_MEAN_LINE = 20  # tokens per line on average; lines are 1..2*_MEAN_LINE-1 tokens


def _zipf_cdf(vocab: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def write_file(
    uri: str, index: int, files: int, vocab: int, tokens: int, exponent: float, seed: int, storage_options: dict
) -> int:
    """Write file `index` of `files`; returns its token count (without <eos>)."""
    rng = np.random.default_rng([seed, index])
    cover = np.arange(index * vocab // files, (index + 1) * vocab // files) + 1
    rng.shuffle(cover)
    n = tokens // files + (1 if index < tokens % files else 0)
    drawn = np.searchsorted(_zipf_cdf(vocab, exponent), rng.random(max(n - cover.size, 0)), side="right") + 1
    ranks = np.concatenate([cover, np.minimum(drawn, vocab)])
    ends = np.cumsum(rng.integers(1, 2 * _MEAN_LINE, size=ranks.size // _MEAN_LINE + 1))
    ends = np.append(ends[ends < ranks.size], ranks.size)  # the last line takes what is left
    with storage.atomic_write(uri, storage_options) as raw:
        f = raw
        if uri.endswith(".gz"):
            import gzip

            f = gzip.GzipFile(fileobj=raw, mode="wb")
        start = 0
        for end in ends:
            if end > start:
                f.write((" ".join("w" + r for r in ranks[start:end].astype(str)) + "\n").encode())
            start = end
        if f is not raw:
            f.close()
    return int(ranks.size)


def write_corpus(
    output: str,
    vocab: int,
    tokens: int,
    files: int = 4,
    exponent: float = 1.0,
    seed: int = 0,
    compress: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write `files` text files under `output` in parallel (Ray tasks); returns their URIs."""
    if vocab < 1 or files < 1:
        raise ValueError(f"vocab and files must be >= 1, got vocab={vocab}, files={files}")
    if tokens < vocab:
        raise ValueError(f"tokens ({tokens}) must be >= vocab ({vocab}): every word is written at least once")
    so = dict(storage_options or {})
    uris = [storage.join(output, f"part-{i:05d}.txt" + (".gz" if compress else "")) for i in range(files)]
    task = ray.remote(write_file)
    ray.get([task.remote(u, i, files, vocab, tokens, exponent, seed, so) for i, u in enumerate(uris)])
    return uris
