"""Word counts that no process holds whole, and the vocabulary selected from them.

    unit tasks    count the distinct words of their share of the corpus and cut them into P
                  pieces by hash(word) % P; a piece row is (word, count, hash)
    partition p   sums its pieces (Arrow group_by), keeps the words seen at least min_count
                  times in Ray's object store, and reports its totals and a histogram of counts
    cutoff        from the histograms alone: the count c* below which no word is kept, and
                  how many words of count c* are (ties go to the smaller word)
    select p      its words counted above c*, and its smallest `need` words counted c*
    finish        the chosen words plus <unk> (its own count and every word left out) and
                  <eos>, ordered by (count desc, word asc): the vocabulary, written as
                  vocab.parquet, and its `WordLookup` for the encoders

The driver holds histograms, never words; a task holds a unit's distinct words, one
partition's, or the vocabulary. The rule is `Vocabulary.build`'s, so the ids are the ones a
single process gives.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lightrnn.vocab import EOS, UNK, Vocabulary, WordLookup
from lightrnn.wordcodes import word_codes, word_hashes
from pipeline import storage
from pipeline.memory import peak_rss_mb, reset_peak

SPECIALS = (UNK, EOS)
COUNTS_SCHEMA = pa.schema([("word", pa.large_string()), ("count", pa.int64()), ("hash", pa.uint64())])
_ORDER = [("count", "descending"), ("word", "ascending")]  # Arrow compares UTF-8 bytes: code point order
_SUM_ROWS = 1 << 21  # piece rows summed at once, with the running total
_FETCH = 16  # pieces fetched at a time
_HISTOGRAM = 1 << 16  # counts below this are histogrammed; larger ones are listed
TOP_WORDS = 50  # words listed in the dataset summary


def unit_pieces(words: pa.Array, counts: np.ndarray, parts: int, hashes: np.ndarray) -> list[pa.Table]:
    """A unit's distinct words with their counts and seed-0 hashes, cut into `parts` pieces by hash % parts."""
    owner = hashes % np.uint64(parts)
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(parts + 1))
    table = pa.table(
        [words.cast(pa.large_string()), pa.array(counts, pa.int64()), pa.array(hashes)], schema=COUNTS_SCHEMA
    )
    table = table.take(pa.array(order))
    return [table.slice(int(a), int(b - a)) for a, b in itertools.pairwise(bounds)]


def _sum(tables: list[pa.Table]) -> pa.Table:
    """The per-word sums of several (word, count, hash) tables (`word_codes` numbers the words; far
    faster than Arrow's group_by on string keys)."""
    rows = pa.concat_tables(tables).combine_chunks()
    codes, words = word_codes(rows["word"])
    counts = np.bincount(codes, weights=rows["count"].to_numpy(), minlength=len(words)).astype(np.int64)
    hashes = np.empty(len(words), dtype=np.uint64)
    hashes[codes] = rows["hash"].to_numpy()  # a word's rows all carry its hash
    return pa.table([words, pa.array(counts), pa.array(hashes)], schema=COUNTS_SCHEMA)


@ray.remote(num_returns=2)
def reduce_partition(pieces: list[ray.ObjectRef], min_count: int) -> tuple[pa.Table, dict]:
    """One partition's words seen at least `min_count` times, and its totals and count histogram."""
    reset_peak()
    started = time.perf_counter()
    total: pa.Table | None = None
    batch: list[pa.Table] = []
    for i in range(0, len(pieces), _FETCH):  # a few pieces at a time: bounded memory
        batch.extend(ray.get(pieces[i : i + _FETCH]))
        if sum(t.num_rows for t in batch) >= _SUM_ROWS or i + _FETCH >= len(pieces):
            total = _sum(batch if total is None else [total, *batch])
            batch = []
    total = total if total is not None else COUNTS_SCHEMA.empty_table()
    special = pc.is_in(total["word"], pa.array(SPECIALS, pa.large_string()))
    specials = total.filter(special)
    found = dict(zip(specials["word"].to_pylist(), specials["count"].to_pylist(), strict=True))
    words = total.filter(pc.invert(special))
    kept = words.filter(pc.greater_equal(words["count"], min_count))
    counts = kept["count"].to_numpy()
    stats = {
        "words": words.num_rows,
        "word_tokens": int(pc.sum(words["count"]).as_py() or 0),
        "unk": int(found.get(UNK, 0)),
        "eos": int(found.get(EOS, 0)),
        "histogram": np.bincount(counts[counts < _HISTOGRAM], minlength=_HISTOGRAM),
        "large_counts": counts[counts >= _HISTOGRAM],
        "peak_rss_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - started,
    }
    return kept, stats


def cutoff(stats: list[dict], room: int | None) -> tuple[int, int]:
    """(c*, need): every word counted above c* is kept, and the `need` smallest words counted c*.

    Computed from the partitions' histograms alone. Without a limit (or when every word
    fits), c* = 0 and need = 0: all words seen at least min_count times are kept.
    """
    large = np.sort(np.concatenate([s["large_counts"] for s in stats]))[::-1]
    if room is None or sum(s["histogram"].sum() for s in stats) + large.size <= room:
        return 0, 0
    if large.size >= room:  # the cut falls among the listed large counts
        c_star = int(large[room - 1])
        return c_star, room - int((large > c_star).sum())
    histogram = np.sum([s["histogram"] for s in stats], axis=0)
    at_least = np.cumsum(histogram[::-1])[::-1] + large.size  # at_least[c]: words counted c or more
    c_star = int(np.flatnonzero(at_least >= room).max())
    above = int(at_least[c_star + 1]) if c_star + 1 < at_least.size else large.size
    return c_star, room - above


@ray.remote(num_returns=2)
def select_partition(kept: pa.Table, c_star: int, need: int) -> tuple[pa.Table, pa.Table]:
    """The partition's words counted above c*, and its `need` smallest words counted exactly c*."""
    above = kept.filter(pc.greater(kept["count"], c_star))
    if not need:
        return above, COUNTS_SCHEMA.empty_table()
    ties = kept.filter(pc.equal(kept["count"], c_star)).sort_by("word")
    return above, ties.slice(0, need)


@ray.remote(num_returns=2)
def finish_vocabulary(
    chosen: list[ray.ObjectRef], ties: list[ray.ObjectRef], need: int, stats: list[dict], where: tuple[str, dict]
) -> tuple[dict, WordLookup]:
    """Write the vocabulary (chosen words, the smallest `need` ties, <unk>, <eos>); its summary and lookup."""
    reset_peak()
    started = time.perf_counter()
    uri, storage_options = where
    tied = pa.concat_tables(ray.get(ties)).sort_by("word").slice(0, need) if need else COUNTS_SCHEMA.empty_table()
    words = pa.concat_tables([*ray.get(chosen), tied])
    kept_tokens = int(pc.sum(words["count"]).as_py() or 0)
    unk = sum(s["unk"] for s in stats) + sum(s["word_tokens"] for s in stats) - kept_tokens
    eos = sum(s["eos"] for s in stats)
    if unk + eos + kept_tokens == 0:
        raise ValueError("cannot build a vocabulary from an empty corpus: no words were counted")
    specials = pa.table(
        [
            pa.array(SPECIALS, pa.large_string()),
            pa.array([unk, eos], pa.int64()),
            pa.array(word_hashes(pa.array(SPECIALS, pa.large_string()), 0)),
        ],
        schema=COUNTS_SCHEMA,
    )
    table = pa.concat_tables([words, specials]).sort_by(_ORDER)
    del words, tied
    vocab_table = pa.table({"word": table["word"].cast(pa.string()), "count": table["count"]})
    with storage.atomic_local_path(uri, storage_options, ".parquet") as path:
        pq.write_table(vocab_table.replace_schema_metadata(Vocabulary.TABLE_METADATA), path)
    del vocab_table
    words_V = table["word"].combine_chunks()
    unk_id = int(pc.index(words_V, UNK).as_py())
    summary = {
        "size": table.num_rows,
        "unk_id": unk_id,
        "eos_id": int(pc.index(words_V, EOS).as_py()),
        "top_words": [
            [w, int(c)]
            for w, c in zip(words_V[:TOP_WORDS].to_pylist(), table["count"][:TOP_WORDS].to_pylist(), strict=True)
        ],
        "words_seen_once": int(pc.sum(pc.equal(table["count"], 1)).as_py() or 0),
        "distinct_words": sum(s["words"] for s in stats) + len(SPECIALS),
    }
    lookup = WordLookup.build(words_V, unk_id, table["hash"].to_numpy())
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary, lookup


def select_vocabulary(
    pieces: list[list[ray.ObjectRef]], max_vocab: int, min_count: int, uri: str, storage_options: Mapping[str, Any]
) -> tuple[dict, ray.ObjectRef, list[dict]]:
    """From the units' pieces (pieces[u][p]) to the vocabulary at `uri`.

    Returns its summary, the ObjectRef of its WordLookup, and each partition's totals.
    """
    parts = len(pieces[0]) if pieces else 0
    reduced = [reduce_partition.remote([u[p] for u in pieces], min_count) for p in range(parts)]
    stats = ray.get([s for _, s in reduced])
    c_star, need = cutoff(stats, max_vocab - len(SPECIALS) if max_vocab else None)
    selected = [select_partition.remote(kept, c_star, need) for kept, _ in reduced]
    where = (uri, dict(storage_options))
    summary_ref, lookup_ref = finish_vocabulary.remote(
        [a for a, _ in selected], [t for _, t in selected], need, stats, where
    )
    return (
        ray.get(summary_ref),
        lookup_ref,
        [{k: v for k, v in s.items() if k not in ("histogram", "large_counts")} for s in stats],
    )
