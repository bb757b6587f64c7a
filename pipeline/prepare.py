"""The prepare stage: a corpus on storage -> vocabulary + Parquet token blocks + manifest.

    plan     a Ray task per file: its units of work (pipeline.sources: runs of row groups
             of Parquet, byte ranges of text)
    pass 1   a Ray task per unit: its lines, tokens and null documents; for the train
             split also its word counts, cut into hash partitions (pipeline.counting)
    vocab    partition tasks, a merge tree and a finishing task write vocab.parquet and
             put a WordLookup (sorted word hashes) in Ray's object store; each unit's
             first token offset in its split = the tokens of the units before it
    pass 2   a Ray task per unit: ids (one vectorised lookup per distinct word) with
             `<eos>` after every line, cut into blocks at global multiples of block_len
             (pipeline.blocks); blocks that straddle units are joined into "edges" shards
    commit   manifest.json, written last

Concatenating a split's blocks in `block` order gives exactly the single-process stream
(`lightrnn.corpus.encode_file` for text: one `<eos>` after every line). No process holds
the corpus or every distinct word: a task holds its unit, a partition, or the vocabulary.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from lightrnn.vocab import EOS, VocabularyError, WordLookup
from lightrnn.wordcodes import Encoded, word_codes, word_hashes
from pipeline import storage
from pipeline.blocks import BlockCutter, Piece, ShardWriter, join_pieces, write_edges
from pipeline.counting import select_vocabulary, unit_pieces
from pipeline.dataset import VOCAB_FILE, edges_shard_name
from pipeline.memory import peak_rss_mb, reset_peak
from pipeline.runconfig import DataConfig
from pipeline.sources import CorpusError, Unit, expand_inputs, plan_file, unit_chunks

SPLITS = ("train", "valid", "test")
SHARDS_DIR = "shards"
UNIT_MB = 64  # default unit of work: MB of text a task reads
CHUNK_MB = 16  # text tokenised at a time within a unit: its temporaries take 12-20 bytes a byte of text


@dataclass(frozen=True)
class Reading:
    """How every task reads and tokenises a unit (the same in both passes)."""

    lower: bool
    text_column: str
    chunk_bytes: int
    storage_options: dict[str, Any]


def _log(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


def _get(refs: Any) -> Any:
    """ray.get, raising a task's corpus error as itself (one line, no Ray traceback)."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, CorpusError | VocabularyError | storage.StorageError):
            raise e.cause from None
        raise


# -- the tasks -----------------------------------------------------------------------------


@ray.remote
def _plan_file(uri: str, split: str, index: int, unit_bytes: int, reading: Reading) -> list[Unit]:
    return plan_file(uri, split, index, unit_bytes, reading.text_column, reading.storage_options)


Chunk = tuple[np.ndarray, np.ndarray]  # (codes into the unit's distinct words, line offsets)


def _unit_dictionary(encoded: list[Encoded]) -> tuple[list[Chunk], pa.Array]:
    """The chunks of a unit with one dictionary of distinct words for the whole unit."""
    if len(encoded) == 1:
        codes, distinct, offsets = encoded[0]
        return [(codes, offsets)], distinct
    if not encoded:
        return [], pa.array([], pa.large_string())
    remap, distinct = word_codes(pa.concat_arrays([d for _, d, _ in encoded]))
    chunks, at = [], 0
    for codes, chunk_distinct, offsets in encoded:
        chunks.append((remap[at : at + len(chunk_distinct)][codes], offsets))
        at += len(chunk_distinct)
    return chunks, distinct


def _read_unit(unit: Unit, reading: Reading) -> tuple[list[Chunk], pa.Array, int]:
    """A unit's chunks as codes into its distinct words, the distinct words, and its null documents."""
    encoded, nulls = [], 0
    read = (reading.lower, reading.text_column, reading.chunk_bytes, reading.storage_options)
    for chunk, skipped in unit_chunks(unit, *read):
        encoded.append(chunk)
        nulls += skipped
    chunks, distinct = _unit_dictionary(encoded)
    return chunks, distinct, nulls


@ray.remote
def _scan(unit: Unit, reading: Reading, parts: int) -> tuple:
    """Pass 1: (info, chunks, hashes, *pieces) of a unit, kept in Ray's object store.

    info: lines, tokens with `<eos>`, null documents. chunks: the words as codes into the
    unit's distinct words; hashes: the seed-0 hash of each distinct word (what pass 2 looks
    up). pieces (the train split, `parts` > 0): the distinct words with their counts and
    hashes, plus the unit's line ends as `<eos>`, cut into `parts` hash partitions.
    """
    reset_peak()
    started = time.perf_counter()
    chunks, distinct, nulls = _read_unit(unit, reading)
    hashes = word_hashes(distinct, 0)
    counts = np.zeros(len(distinct), dtype=np.int64)
    for codes, _ in chunks:
        counts += np.bincount(codes, minlength=len(distinct))
    lines = sum(offsets.size - 1 for _, offsets in chunks)
    info = {"lines": lines, "tokens": int(counts.sum()) + lines, "null_documents": nulls}
    pieces: list[pa.Table] = []
    if parts:
        words = pa.concat_arrays([distinct.cast(pa.large_string()), pa.array([EOS], pa.large_string())])
        pieces = unit_pieces(words, np.append(counts, lines), parts, np.append(hashes, word_hashes(words[-1:], 0)))
    info.update(seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    return (info, chunks, hashes, *pieces)


@ray.remote(num_returns=2)
def _encode(
    where: tuple[Unit, str, Reading],
    place: tuple[int, int, int],
    eos_id: int,
    lookup: WordLookup,
    chunks: list[Chunk],
    hashes: np.ndarray,
) -> tuple[dict, list[Piece]]:
    """Pass 2: a unit's ids, cut into blocks; (info, pieces of the blocks it shares with its neighbours).

    Each distinct word of the unit is looked up once, by the hash pass 1 computed; if the
    lookup had to use another hash seed (its words collided under seed 0), the unit is read
    again for its words.
    """
    reset_peak()
    started = time.perf_counter()
    unit, shard, reading = where
    start, total, block_len = place
    if lookup.seed == 0:
        local = lookup.ids_of_hashes(hashes)  # the id of each of the unit's distinct words
    else:
        chunks, distinct, _ = _read_unit(unit, reading)
        local = lookup.ids_of_distinct(distinct)
    writer = ShardWriter(shard, unit.split, reading.storage_options)
    cutter = BlockCutter(start, total, block_len, writer)
    tokens = 0
    try:
        for codes, offsets in chunks:
            ids = with_line_ends(local[codes], offsets, eos_id)
            tokens += ids.size
            cutter.add(ids)
        edge_pieces = cutter.close()
        wrote = writer.close()
    except BaseException:
        writer.abort()
        raise
    info = {"tokens": tokens, "full_blocks": writer.written, "shard": shard if wrote else ""}
    info.update(seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    return info, edge_pieces


def with_line_ends(ids: np.ndarray, offsets: np.ndarray, eos_id: int) -> np.ndarray:
    """The word ids of N lines (line i holds ids[offsets[i]:offsets[i+1]]) with `<eos>` after each line."""
    lines = offsets.size - 1
    out = np.empty(ids.size + lines, dtype=np.int32)
    ends = offsets[1:] + np.arange(lines)  # where each line's <eos> lands
    word = np.ones(out.size, dtype=bool)
    word[ends] = False
    out[word] = ids
    out[ends] = eos_id
    return out


# -- the driver ----------------------------------------------------------------------------


def _clear_unfinished(root: str, storage_options: dict) -> None:
    """Remove what an unfinished earlier run left; refuse a root holding anything else."""
    names = [n for n in storage.listdir(root, storage_options) if not n.startswith(".tmp-")]
    foreign = [n for n in names if n not in (SHARDS_DIR, VOCAB_FILE)]
    if foreign:
        raise storage.StorageError(
            f"{root} is not empty and holds no dataset manifest (found {', '.join(foreign[:5])}); "
            "choose an empty --output or delete these files"
        )
    if names:
        _log(f"removing an unfinished earlier run's files under {root}")
    for name in names:
        storage.remove(storage.join(root, name), storage_options)


def _plan(data: DataConfig, reading: Reading, unit_bytes: int) -> tuple[dict[str, list[str]], dict[str, list[Unit]]]:
    """Every split's files and units, in stream order."""
    files = {s: expand_inputs(uri, reading.storage_options) for s, uri in data.inputs().items()}
    refs = {
        s: [_plan_file.remote(u, s, i, unit_bytes, reading) for i, u in enumerate(uris)] for s, uris in files.items()
    }
    return files, {s: [unit for units in _get(r) for unit in units] for s, r in refs.items()}


Kept = tuple[ray.ObjectRef, ray.ObjectRef]  # a unit's chunks and hashes, for pass 2


def _scan_all(
    units: dict[str, list[Unit]], reading: Reading, parts: int
) -> tuple[dict[str, list[dict]], dict[str, list[Kept]], list[list[ray.ObjectRef]]]:
    """Pass 1 over every unit: each unit's info, refs to its chunks and hashes, and the train
    units' count pieces (pieces[u][p])."""
    infos, kept, pieces = {}, {}, []
    for split, split_units in units.items():
        count = parts if split == "train" else 0  # only the train split is counted
        refs = [_scan.options(num_returns=3 + count).remote(u, reading, count) for u in split_units]
        infos[split], kept[split] = [r[0] for r in refs], [(r[1], r[2]) for r in refs]
        if count:
            pieces = [list(r[3:]) for r in refs]
    return {s: _get(r) for s, r in infos.items()}, kept, pieces


def _check_not_empty(data: DataConfig, infos: dict[str, list[dict]]) -> None:
    for split, split_infos in infos.items():
        if sum(i["lines"] for i in split_infos) == 0:
            raise CorpusError(f"the {split} corpus ({getattr(data, split)}) is empty: it needs at least one line")


def _encode_split(
    split: str,
    units: list[Unit],
    scanned: tuple[list[dict], list[Kept]],
    vocab: tuple[ray.ObjectRef, int],
    reading: Reading,
    layout: tuple[str, str, int],
) -> tuple[dict[str, Any], list[dict]]:
    """Pass 2 over one split: its shards (units' and edges'), block count, and the tasks' infos."""
    root, run_id, block_len = layout
    infos, kept = scanned
    total = sum(i["tokens"] for i in infos)
    refs, start = [], 0
    for unit, info, (chunks, hashes) in zip(units, infos, kept, strict=True):
        shard = storage.join(root, SHARDS_DIR, f"{split}-{unit.file_index:05d}-{unit.part:05d}-{run_id}.parquet")
        where, place = (unit, shard, reading), (start, total, block_len)
        refs.append(_encode.remote(where, place, vocab[1], vocab[0], chunks, hashes))
        start += info["tokens"]
    encoded = _get([r[0] for r in refs])
    for unit, before, after in zip(units, infos, encoded, strict=True):
        if before["tokens"] != after["tokens"]:
            raise CorpusError(f"{unit.uri} changed while it was being prepared; re-run the stage")

    def pieces() -> Any:  # fetched a window of units at a time: the driver never holds them all
        for i in range(0, len(refs), 256):
            for edge_pieces in _get([r[1] for r in refs[i : i + 256]]):
                yield from edge_pieces

    def edge_uri(i: int) -> str:
        return storage.join(root, SHARDS_DIR, edges_shard_name(split, i, run_id))

    edges, edge_blocks = write_edges(split, join_pieces(split, pieces()), edge_uri, reading.storage_options)
    shards = [e["shard"] for e in encoded if e["shard"]] + edges
    blocks = -(-total // block_len)
    if sum(e["full_blocks"] for e in encoded) + edge_blocks != blocks:
        raise RuntimeError(f"{split}: blocks written do not cover the stream; this is a bug")
    return {"blocks": blocks, "shards": [s[len(root) + 1 :] for s in shards]}, encoded  # relative: it can move


PARTITION_BYTES = 64 << 20  # train text per word-count partition by default: its distinct words stay small
MAX_PARTITIONS = 1024


def _default_partitions(units: list[Unit]) -> int:
    """Enough partitions that each sums the words of about PARTITION_BYTES of text, and at least
    two per CPU of the cluster, so the partition tasks spread evenly."""
    by_size = -(-sum(u.size for u in units) // PARTITION_BYTES)
    return int(min(MAX_PARTITIONS, max(4, 2 * int(ray.cluster_resources().get("CPU", 1)), by_size)))


def prepare(
    data: DataConfig,
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    unit_mb: int = UNIT_MB,
    partitions: int = 0,
    chunk_mb: int = CHUNK_MB,
) -> dict[str, Any]:
    """Run the stage (Ray must be initialised); returns the manifest. Idempotent per config.

    `storage_options` are s3fs keywords (e.g. an endpoint) for the inputs and the output;
    `unit_mb` sizes the units of text, `chunk_mb` the text tokenised at a time within a unit;
    `partitions` is the number of word-count partitions (0: one per PARTITION_BYTES of train
    text, at least two per cluster CPU). None of these changes the dataset, so none is recorded.
    """
    t0 = time.perf_counter()
    reset_peak()
    if output.startswith("memory://"):
        raise ValueError(f"{output}: memory:// lives in one process; Ray workers cannot see it")
    if unit_mb < 1 or chunk_mb < 1 or partitions < 0:
        raise ValueError(
            f"unit_mb and chunk_mb must be >= 1 and partitions >= 0, got {unit_mb}, {chunk_mb} and {partitions}"
        )
    root, so = output.rstrip("/"), dict(storage_options or {})
    recorded = asdict(data)  # everything in it defines the dataset
    if storage.check_output(root, recorded, so):
        _log(f"{root} already holds this dataset (manifest found, same config): nothing to do")
        return {**storage.read_manifest(root, so), "skipped": True}
    _clear_unfinished(root, so)
    run_id = uuid.uuid4().hex[:8]  # in shard names, so a killed run's files are never mistaken for ours
    reading = Reading(data.lower, data.text_column, min(unit_mb, chunk_mb) << 20, so)
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return round(clock[-1] - clock[-2], 3)

    files, units = _plan(data, reading, unit_mb << 20)
    parts = partitions or _default_partitions(units["train"])
    phases = {"plan": lap()}
    _log(
        f"pass 1/2: {sum(map(len, units.values()))} units of {sum(map(len, files.values()))} files, {parts} partitions"
    )
    infos, kept, pieces = _scan_all(units, reading, parts)
    _check_not_empty(data, infos)
    phases["count"] = lap()
    vocab, lookup, stats = select_vocabulary(pieces, data.max_vocab, data.min_count, storage.join(root, VOCAB_FILE), so)
    del pieces  # the count pieces leave the object store; pass 2 needs only codes and hashes
    phases["vocab"] = lap()
    tokens = {s: sum(i["tokens"] for i in split_infos) for s, split_infos in infos.items()}
    _log(f"vocabulary: {vocab['size']:,} words; pass 2/2: encoding {sum(tokens.values()):,} tokens")
    splits, worker_peaks = {}, [vocab["peak_rss_mb"], *(s["peak_rss_mb"] for s in stats)]
    busy = {
        "count": sum(i["seconds"] for split_infos in infos.values() for i in split_infos),
        "reduce": sum(s["seconds"] for s in stats),
        "finish": vocab.pop("seconds"),
        "encode": 0.0,
    }
    for split, split_units in units.items():
        layout = (root, run_id, data.block_len)
        scanned = (infos[split], kept.pop(split))  # each unit's codes leave the object store once encoded
        blocks, encoded = _encode_split(split, split_units, scanned, (lookup, vocab["eos_id"]), reading, layout)
        split_infos = infos[split]
        splits[split] = {
            "tokens": tokens[split],
            "lines": sum(i["lines"] for i in split_infos),
            "null_documents": sum(i["null_documents"] for i in split_infos),
            "files": files[split],
            "units": len(split_units),
            **blocks,
        }
        worker_peaks += [i["peak_rss_mb"] for i in [*split_infos, *encoded]]
        busy["encode"] += sum(e["seconds"] for e in encoded)
    phases["encode"] = lap()
    manifest = {
        "config": recorded,
        "vocab": {"path": VOCAB_FILE, **{k: v for k, v in vocab.items() if k != "peak_rss_mb"}},
        "splits": splits,
        "seconds": round(time.perf_counter() - t0, 3),
        "phase_seconds": phases,  # where the time went
        "task_seconds": {k: round(v, 3) for k, v in busy.items()},  # summed over the unit tasks
        "partitions": parts,
        "peak_rss_mb": {"driver": round(peak_rss_mb(), 1), "worker": round(max(worker_peaks), 1)},
        "run_id": run_id,
    }
    storage.write_manifest(root, manifest, so)
    return {**storage.read_manifest(root, so), "skipped": False}


def summary(manifest: Mapping[str, Any]) -> str:
    """One line a person can read."""
    parts = [f"{s} {manifest['splits'][s]['tokens']:,} tokens" for s in SPLITS if s in manifest["splits"]]
    return f"prepared {', '.join(parts)}; vocabulary {manifest['vocab']['size']:,} words; {manifest['seconds']:.1f} s"
