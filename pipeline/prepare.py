"""The prepare stage: corpus text on storage -> vocabulary + Parquet token blocks + manifest.

Two Ray Data passes over the input files, one task per file:

    pass 1 (count)   file -> lines, tokens, word counts (train only)
    driver           merge counts -> Vocabulary.build -> vocab.parquet;
                     each file's first global token offset = sum of earlier files' tokens
    pass 2 (encode)  file -> int32 ids, cut at global multiples of block_len:

        split stream  |<- file 0 ------------->|<- file 1 ---------------------->|
        blocks        [ block 0   ][ block 1   ][ block 2   ][ block 3   ][ 4 ]
                                          ^^^^^ ^^^^^
                      blocks inside one file go to that file's shard; a block that
                      straddles files comes back as pieces, joined on the driver
                      into one "edges" shard per split.

    driver           write manifest.json last: the commit.

Concatenating a split's `tokens` in `block` order gives exactly the single-process
stream of `lightrnn.corpus.encode_file` (one `<eos>` after every line).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from lightrnn.vocab import EOS, Vocabulary, tokenize
from pipeline import storage
from pipeline.dataset import SHARD_SCHEMA, VOCAB_FILE
from pipeline.runconfig import DataConfig
from pipeline.textio import CorpusError, expand_inputs, iter_lines

SPLITS = ("train", "valid", "test")
SHARDS_DIR = "shards"
# Full blocks buffered per Parquet row group: 256 x 8192 int32 = 8 MiB per write.
_BLOCKS_PER_ROW_GROUP = 256


def _count_files(batch: pa.Table, lower: bool, storage_options: dict) -> pa.Table:
    """Pass 1 on each file of the batch: lines, tokens and (for train) word counts."""
    rows = []
    for item in batch.to_pylist():
        counts: Counter[str] = Counter()
        lines = tokens = 0
        error = ""
        try:
            for line in iter_lines(item["uri"], storage_options):
                words = tokenize(line, lower)
                lines += 1
                tokens += len(words) + 1
                if item["split"] == "train":
                    counts.update(words)
        except (CorpusError, OSError) as e:  # returned, so the driver can raise it without Ray's wrapping
            error = str(e)
        if item["split"] == "train" and lines:
            counts[EOS] += lines
        rows.append(
            {
                **item,
                "lines": lines,
                "tokens": tokens,
                "words": list(counts.keys()),
                "counts": list(counts.values()),
                "error": error,
            }
        )
    return pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("split", pa.string()),
                ("file_index", pa.int64()),
                ("uri", pa.string()),
                ("lines", pa.int64()),
                ("tokens", pa.int64()),
                ("words", pa.list_(pa.string())),
                ("counts", pa.list_(pa.int64())),
                ("error", pa.string()),
            ]
        ),
    )


_WORD_IDS: dict[str, tuple[dict[str, int], int, int]] = {}  # per worker process, keyed by vocab uri + run


def _word_ids(vocab_uri: str, run_id: str, storage_options: dict) -> tuple[dict[str, int], int, int]:
    key = f"{vocab_uri}#{run_id}"
    if key not in _WORD_IDS:
        _WORD_IDS.clear()
        with storage.open(vocab_uri, "rb", storage_options) as f:
            vocab = Vocabulary.load(f)
        _WORD_IDS[key] = ({w: i for i, w in enumerate(vocab.words)}, vocab.unk_id, vocab.eos_id)
    return _WORD_IDS[key]


class _ShardWriter:
    """Full blocks of one file -> one Parquet shard, written whole (atomic) in row groups."""

    def __init__(self, uri: str, split: str, storage_options: dict) -> None:
        self.uri, self.split, self.storage_options = uri, split, storage_options
        self.blocks: list[int] = []
        self.tokens: list[np.ndarray] = []
        self.written = 0
        self._file = self._writer = self._ctx = None

    def add(self, block: int, tokens: np.ndarray) -> None:
        self.blocks.append(block)
        self.tokens.append(tokens)
        if len(self.blocks) >= _BLOCKS_PER_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        if not self.blocks:
            return
        if self._writer is None:
            self._ctx = storage.atomic_write(self.uri, self.storage_options)
            self._file = self._ctx.__enter__()
            self._writer = pq.ParquetWriter(self._file, SHARD_SCHEMA)
        self._writer.write_table(_blocks_table(self.split, self.blocks, self.tokens))
        self.written += len(self.blocks)
        self.blocks, self.tokens = [], []

    def close(self) -> bool:
        """Commit the shard; False if it held no full block (no file written)."""
        self._flush()
        if self._writer is None:
            return False
        self._writer.close()
        self._ctx.__exit__(None, None, None)
        return True

    def abort(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def _blocks_table(split: str, blocks: list[int], tokens: list[np.ndarray]) -> pa.Table:
    offsets = np.zeros(len(tokens) + 1, dtype=np.int32)
    np.cumsum([len(t) for t in tokens], out=offsets[1:])
    values = pa.array(np.concatenate(tokens).astype(np.int32, copy=False), pa.int32())
    return pa.table(
        {
            "split": pa.array([split] * len(blocks), pa.string()),
            "block": pa.array(blocks, pa.int64()),
            "tokens": pa.ListArray.from_arrays(pa.array(offsets), values),
        },
        schema=SHARD_SCHEMA,
    )


def _encode_files(
    batch: pa.Table, lower: bool, block_len: int, vocab_uri: str, run_id: str, storage_options: dict
) -> pa.Table:
    """Pass 2 on each file of the batch: ids cut at global block boundaries (see module doc)."""
    ids_of, unk, eos = _word_ids(vocab_uri, run_id, storage_options)
    get = ids_of.get
    out = []
    for item in batch.to_pylist():
        start, split_total = item["start"], item["split_total"]
        writer = _ShardWriter(item["shard"], item["split"], storage_options)
        pieces: list[tuple[int, int, np.ndarray]] = []  # (block, offset in block, tokens)

        def emit(gstart: int, toks: list[int], writer=writer, pieces=pieces, split_total=split_total) -> None:
            block, offset = divmod(gstart, block_len)
            arr = np.asarray(toks, dtype=np.int32)
            if offset == 0 and (len(toks) == block_len or gstart + len(toks) == split_total):
                writer.add(block, arr)
            else:
                pieces.append((block, offset, arr))

        buf: list[int] = []
        buf_start = start
        block_end = (start // block_len + 1) * block_len
        error = ""
        try:
            for line in iter_lines(item["uri"], storage_options):
                buf.extend([get(w, unk) for w in tokenize(line, lower)])
                buf.append(eos)
                while buf_start + len(buf) >= block_end:
                    n = block_end - buf_start
                    emit(buf_start, buf[:n])
                    buf, buf_start, block_end = buf[n:], block_end, block_end + block_len
            if buf:
                emit(buf_start, buf)
            if buf_start + len(buf) != start + item["tokens"]:
                raise CorpusError(f"{item['uri']} changed while it was being prepared; re-run the stage")
            wrote = writer.close()
        except (CorpusError, OSError) as e:
            writer.abort()
            error, wrote = str(e), False
        out.append(
            {
                "split": item["split"],
                "file_index": item["file_index"],
                "shard": item["shard"] if wrote else "",
                "full_blocks": writer.written,
                "piece_block": [p[0] for p in pieces],
                "piece_offset": [p[1] for p in pieces],
                "piece_tokens": [p[2].tolist() for p in pieces],
                "error": error,
            }
        )
    return pa.Table.from_pylist(
        out,
        schema=pa.schema(
            [
                ("split", pa.string()),
                ("file_index", pa.int64()),
                ("shard", pa.string()),
                ("full_blocks", pa.int64()),
                ("piece_block", pa.list_(pa.int64())),
                ("piece_offset", pa.list_(pa.int64())),
                ("piece_tokens", pa.list_(pa.list_(pa.int32()))),
                ("error", pa.string()),
            ]
        ),
    )


def _run_per_file(items: list[dict], fn: Any, fn_kwargs: dict) -> pa.Table:
    """One Ray Data task per file (batch_size=1); the results gathered on the driver."""
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(fn, batch_size=1, batch_format="pyarrow", fn_kwargs=fn_kwargs)
    table = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    errors = [e for e in table.column("error").to_pylist() if e]
    if errors:
        raise CorpusError(errors[0] + (f" (and {len(errors) - 1} more files failed)" if len(errors) > 1 else ""))
    return table.sort_by([("split", "ascending"), ("file_index", "ascending")])


def _log(message: str) -> None:
    print(f"[prepare] {message}", flush=True)


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


def prepare(data: DataConfig, output: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the stage (Ray must be initialised); returns the manifest. Idempotent per config.

    `storage_options` are s3fs keywords (e.g. an endpoint) for the inputs and the output;
    they are never written out.
    """
    t0 = time.perf_counter()
    if output.startswith("memory://"):
        raise ValueError(f"{output}: memory:// lives in one process; Ray workers cannot see it")
    root, so = output.rstrip("/"), dict(storage_options or {})
    recorded = asdict(data)  # everything in it defines the dataset
    if storage.check_output(root, recorded, so):
        _log(f"{root} already holds this dataset (manifest found, same config): nothing to do")
        return {**storage.read_manifest(root, so), "skipped": True}
    _clear_unfinished(root, so)
    run_id = uuid.uuid4().hex[:8]  # in shard names, so a killed run's files are never mistaken for ours

    inputs = {s: expand_inputs(uri, so) for s, uri in data.inputs().items()}
    items = [{"split": s, "file_index": i, "uri": u} for s, uris in inputs.items() for i, u in enumerate(uris)]
    _log(f"pass 1/2: counting {len(items)} files")
    counted_table = _run_per_file(items, _count_files, {"lower": data.lower, "storage_options": so})
    phases = {"count": time.perf_counter() - t0}

    counts = _merge_counts(counted_table)
    counted = counted_table.drop_columns(["words", "counts"]).to_pylist()
    del counted_table
    for row in counted:
        row["shard"] = storage.join(root, SHARDS_DIR, f"{row['split']}-{row['file_index']:05d}-{run_id}.parquet")
    totals, lines = _place_files(counted, data)
    vocab = Vocabulary.build(counts, max_size=data.max_vocab, min_count=data.min_count)
    del counts
    vocab_uri = storage.join(root, VOCAB_FILE)
    with storage.atomic_write(vocab_uri, so) as f:
        vocab.save(f)
    phases["vocab"] = time.perf_counter() - t0 - sum(phases.values())

    _log(f"vocabulary: {len(vocab):,} words; pass 2/2: encoding {sum(totals.values()):,} tokens")
    kwargs = {"lower": data.lower, "block_len": data.block_len, "vocab_uri": vocab_uri, "run_id": run_id}
    encoded = _run_per_file(counted, _encode_files, {**kwargs, "storage_options": so}).to_pylist()
    phases["encode"] = time.perf_counter() - t0 - sum(phases.values())

    splits = {}
    for split, files in inputs.items():
        rows = [r for r in encoded if r["split"] == split]
        shards = _finish_split(split, rows, totals[split], root, run_id, data.block_len, so)
        splits[split] = {"tokens": totals[split], "lines": lines[split], "files": files, **shards}

    manifest = {
        "config": recorded,
        "vocab": {"path": VOCAB_FILE, "size": len(vocab)},
        "splits": splits,
        "seconds": round(time.perf_counter() - t0, 3),
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},  # where the time went
        "run_id": run_id,
    }
    storage.write_manifest(root, manifest, so)
    return {**storage.read_manifest(root, so), "skipped": False}


def _merge_counts(counted: pa.Table) -> dict[str, int]:
    """Sum the per-file train word counts (Arrow's hash aggregation: C++, not a Python loop)."""
    train = counted.filter(pc.equal(counted["split"], "train"))
    flat = pa.table({"word": pc.list_flatten(train["words"]), "count": pc.list_flatten(train["counts"])})
    merged = flat.group_by("word").aggregate([("count", "sum")])
    return dict(zip(merged["word"].to_pylist(), merged["count_sum"].to_pylist(), strict=True))


def _place_files(counted: list[dict], data: DataConfig) -> tuple[dict[str, int], dict[str, int]]:
    """Give each file its first global token offset in its split; tokens and lines per split."""
    totals: dict[str, int] = defaultdict(int)
    lines: dict[str, int] = defaultdict(int)
    for row in counted:  # sorted by split, then file order
        row["start"] = totals[row["split"]]
        totals[row["split"]] += row["tokens"]
        lines[row["split"]] += row["lines"]
    for split in dict.fromkeys(row["split"] for row in counted):  # in split order
        if lines[split] == 0:
            raise CorpusError(f"the {split} corpus ({getattr(data, split)}) is empty: it needs at least one line")
    for row in counted:
        row["split_total"] = totals[row["split"]]
    return totals, lines


def _finish_split(
    split: str, rows: list[dict], total: int, root: str, run_id: str, block_len: int, storage_options: dict
) -> dict[str, Any]:
    """Write the split's straddling blocks; check every block exists; its manifest entry."""
    shards = [r["shard"] for r in rows if r["shard"]]
    edges = _join_pieces(split, rows)
    if edges:
        edges_uri = storage.join(root, SHARDS_DIR, f"{split}-edges-{run_id}.parquet")
        with storage.atomic_write(edges_uri, storage_options) as f:
            pq.write_table(_blocks_table(split, list(edges), list(edges.values())), f)
        shards.append(edges_uri)
    n_blocks = -(-total // block_len)
    if sum(r["full_blocks"] for r in rows) + len(edges) != n_blocks:
        raise RuntimeError(f"{split}: blocks written do not cover the stream; this is a bug")
    return {"blocks": n_blocks, "shards": [s[len(root) + 1 :] for s in shards]}  # relative: the dataset can move


def _join_pieces(split: str, rows: list[dict]) -> dict[int, np.ndarray]:
    """Blocks that straddle files, joined from their pieces in offset order."""
    pieces: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
    for r in rows:
        for block, offset, toks in zip(r["piece_block"], r["piece_offset"], r["piece_tokens"], strict=True):
            pieces[block].append((offset, np.asarray(toks, dtype=np.int32)))
    joined = {}
    for block in sorted(pieces):
        parts = sorted(pieces[block], key=lambda p: p[0])
        expected = 0
        for offset, toks in parts:
            if offset != expected:
                raise RuntimeError(f"{split} block {block}: pieces do not line up; this is a bug")
            expected += len(toks)
        joined[block] = np.concatenate([t for _, t in parts])
    return joined


def summary(manifest: Mapping[str, Any]) -> str:
    """One line a person can read."""
    parts = [f"{s} {manifest['splits'][s]['tokens']:,} tokens" for s in SPLITS if s in manifest["splits"]]
    return f"prepared {', '.join(parts)}; vocabulary {manifest['vocab']['size']:,} words; {manifest['seconds']:.1f} s"
