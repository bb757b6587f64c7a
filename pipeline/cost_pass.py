"""The cost pass on Ray Train workers: per-word head-input sums, sharded by word range.

Reallocation needs, for every word w, the sums H_w and H'_w of the hidden states that fed
the row and column heads at its occurrences, and its count n_w (`lightrnn.costs`). At
V = 10M and H = 1024 those sums are 82 GB, so no process holds them for all words:

- the pass runs on N Ray Train workers (GPUs with `use_gpu`, where the phase trained),
  each reading every N-th train block of the dataset, up to its share of the token budget;
- rank r owns the sums of words [bounds[r], bounds[r+1]) (equal ranges of ids). After every
  segment each rank sends each (word, h_row, h_col) to the word's owner (`all_to_all`, gloo
  on CPU, NCCL on GPU), which adds them to its V/N x H shard, in fp32 whatever the forward's
  precision;
- each rank writes its shard as raw little-endian arrays, and rank 0 writes
  `manifest.json` last, once every shard is on storage: it commits the pass.

    ROOT/costs-K/row_sums-RRRRR.f32   (words, H) float32, row-major
    ROOT/costs-K/col_sums-RRRRR.f32   (words, H) float32
    ROOT/costs-K/counts-RRRRR.i64     (words,) int64
    ROOT/costs-K/manifest.json        vocab size, hidden size, each shard's word range and files

`ShardedCosts` reads them back for the solver as a `costs(start, stop)` source: a block of
words is a byte range of each file (a ranged read on object storage), so the solver, too,
holds only the blocks it works on.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

from lightrnn.allocation import Allocation
from lightrnn.costs import subtract_stay_bonus
from lightrnn.model import LightRNN
from lightrnn.train import batchify
from pipeline import storage
from pipeline.checkpoint import model_from_checkpoint
from pipeline.memory import peak_rss_mb, reset_peak

MANIFEST = "manifest.json"
FORMAT = "lightrnn-head-input-shards-1"
_KINDS = {"row_sums": ("f32", np.float32), "col_sums": ("f32", np.float32), "counts": ("i64", np.int64)}

__all__ = ["CostShardError", "ShardedCosts", "owner_bounds", "run_cost_pass"]


class CostShardError(storage.StorageError):
    """A cost pass's shards are missing, incomplete or damaged."""


def owner_bounds(vocab_size: int, world: int) -> np.ndarray:
    """(world + 1,) word-id bounds: rank r owns [bounds[r], bounds[r + 1])."""
    return np.linspace(0, vocab_size, world + 1).round().astype(np.int64)


def shard_file(kind: str, rank: int) -> str:
    return f"{kind}-{rank:05d}.{_KINDS[kind][0]}"


# -- the worker -------------------------------------------------------------------------------


def train_slice(data_root: str, part: int, parts: int, max_tokens: int) -> np.ndarray:
    """The train tokens of every `parts`-th block from `part`, in stream order, at most `max_tokens` + 1."""
    from pipeline.dataset import open_dataset

    dataset = open_dataset(data_root)
    shards = dataset.shard_uris("train")
    pieces: list[np.ndarray] = []
    have = 0
    if len(shards) >= parts:  # whole shards per rank: each reads only its own files
        for uri in shards[part::parts]:
            table = dataset.read_shard(uri).sort_by("block")
            pieces.append(table.column("tokens").combine_chunks().flatten().to_numpy())
            have += pieces[-1].size
            if max_tokens and have > max_tokens:
                break
    else:
        table = dataset.read_blocks("train")
        keep = np.flatnonzero(table.column("block").to_numpy() % parts == part)
        pieces.append(table.take(pa.array(keep)).column("tokens").combine_chunks().flatten().to_numpy())
    stream = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    return stream[: max_tokens + 1] if max_tokens else stream


def _exchange(
    words: torch.Tensor, payload: torch.Tensor, bounds: torch.Tensor, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each (word, payload row) to the rank owning the word; returns what this rank received."""
    owner = torch.bucketize(words, bounds[1:-1], right=True)
    order = torch.argsort(owner, stable=True)
    words, payload = words[order], payload[order]
    send = torch.bincount(owner, minlength=world)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    send_sizes, recv_sizes = send.tolist(), recv.tolist()
    got_words = words.new_empty(sum(recv_sizes))
    got_payload = payload.new_empty((sum(recv_sizes), payload.shape[1]))
    dist.all_to_all_single(got_words, words, recv_sizes, send_sizes)
    dist.all_to_all_single(got_payload, payload, recv_sizes, send_sizes)
    return got_words, got_payload


def cost_pass_per_worker(config: dict[str, Any]) -> None:
    """One rank of the cost pass (see the module docstring)."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    reset_peak()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    model = model_from_checkpoint(config["checkpoint"], device=device)
    if not isinstance(model, LightRNN):
        raise ValueError(f"the cost pass needs a LightRNN checkpoint, {config['checkpoint']} holds another model")
    model.eval()
    vocab, hidden = model.vocab_size, model.config.hidden_dim
    bounds = owner_bounds(vocab, world)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    bounds_t = torch.from_numpy(bounds).to(device)
    row_sums = torch.zeros(hi - lo, hidden, dtype=torch.float32, device=device)
    col_sums = torch.zeros(hi - lo, hidden, dtype=torch.float32, device=device)
    counts = torch.zeros(hi - lo, dtype=torch.int64, device=device)

    stream = train_slice(config["data"], rank, world, config["max_tokens"])
    if stream.size and (int(stream.min()) < 0 or int(stream.max()) >= vocab):
        raise ValueError(
            f"{config['data']} holds word ids outside [0, {vocab}) of {config['checkpoint']}'s vocabulary: "
            "the dataset and the checkpoint come from different runs"
        )
    batch = max(1, min(config["batch_size"], (stream.shape[0] - 1) // 2))
    data_NB = batchify(stream, batch).to(device) if stream.shape[0] >= 2 * batch + 1 else None
    bptt = config["bptt"]
    mine = 0 if data_NB is None else -(-(data_NB.shape[0] - 1) // bptt)
    steps = torch.tensor([mine], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)  # every rank takes part in every exchange
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["use_gpu"])
    state = None
    with torch.no_grad():
        for i in range(int(steps.item())):
            if i < mine:
                assert data_NB is not None
                t0 = i * bptt
                t = min(bptt, data_NB.shape[0] - 1 - t0)
                tokens_BT, targets_BT = data_NB[t0 : t0 + t].t(), data_NB[t0 + 1 : t0 + 1 + t].t()
                with autocast:
                    # ids were checked once above, so no step reads values back from the device
                    h_row, h_col, state = model.head_inputs(tokens_BT, targets_BT, state, check=False)
                words = targets_BT.reshape(-1)
                payload = torch.cat((h_row.reshape(-1, hidden), h_col.reshape(-1, hidden)), dim=1).float()
            else:  # this rank's slice is done: it still receives its words from the others
                words = torch.empty(0, dtype=torch.int64, device=device)
                payload = torch.empty(0, 2 * hidden, dtype=torch.float32, device=device)
            got_words, got = _exchange(words, payload, bounds_t, world)
            local = got_words - lo
            row_sums.index_add_(0, local, got[:, :hidden])
            col_sums.index_add_(0, local, got[:, hidden:])
            counts.index_add_(0, local, torch.ones_like(local))

    out = config["output"]
    arrays = {"row_sums": row_sums, "col_sums": col_sums, "counts": counts}
    for kind, tensor in arrays.items():
        with storage.atomic_write(storage.join(out, shard_file(kind, rank))) as f:
            f.write(tensor.cpu().numpy().astype(_KINDS[kind][1], copy=False).tobytes())
    figures = torch.tensor([float(counts.sum()), float((counts > 0).sum())], device=device)
    dist.all_reduce(figures)
    peak = torch.tensor([peak_rss_mb(), float(row_sums.numel() * 8 + counts.numel() * 8) / 2**20], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.barrier()  # every shard is written
    tokens, words_seen = figures.tolist()
    if rank == 0:
        figures_of_pass = {
            "tokens": int(tokens),
            "words_seen": int(words_seen),
            "workers": world,
            "peak_worker_rss_mb": round(float(peak[0]), 1),
            "sums_mb_per_worker": round(float(peak[1]), 1),
        }
        write_manifest(out, vocab, hidden, bounds, config["checkpoint"], figures_of_pass)


def write_manifest(
    out: str, vocab: int, hidden: int, bounds: np.ndarray, checkpoint: str, figures: dict[str, Any]
) -> None:
    """The pass's commit: its shards' word ranges and files, and its figures; written last."""
    world = len(bounds) - 1
    manifest = {
        "format": FORMAT,
        "vocab_size": vocab,
        "hidden": hidden,
        **figures,
        "checkpoint": checkpoint,
        "shards": [
            {"rank": r, "start": int(bounds[r]), "stop": int(bounds[r + 1]), **{k: shard_file(k, r) for k in _KINDS}}
            for r in range(world)
        ],
    }
    with storage.atomic_write(storage.join(out, MANIFEST)) as f:
        f.write(json.dumps(manifest, indent=1).encode())


def run_cost_pass(
    checkpoint: str,
    data_root: str,
    output: str,
    workers: int,
    use_gpu: bool,
    batch_size: int,
    bptt: int,
    max_tokens: int,
) -> dict[str, Any]:
    """Head-input sums of `checkpoint`'s model over the train blocks, by `workers` Ray Train
    workers, as word-range shards under `output` (committed by its manifest); the figures."""
    abs_output = os.path.abspath(output) if "://" not in output else output
    abs_data = os.path.abspath(data_root) if "://" not in data_root else data_root
    per_worker = -(-max_tokens // workers) if max_tokens else 0
    trainer = TorchTrainer(
        cost_pass_per_worker,
        train_loop_config={
            "checkpoint": checkpoint,
            "data": abs_data,
            "output": abs_output,
            "use_gpu": use_gpu,
            "batch_size": batch_size,
            "bptt": bptt,
            "max_tokens": per_worker,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(storage_path=abs_output, name="ray"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with storage.open(storage.join(abs_output, MANIFEST), "rb") as f:
        manifest = json.loads(f.read())
    keys = ("tokens", "words_seen", "workers", "peak_worker_rss_mb", "sums_mb_per_worker")
    return {key: manifest[key] for key in keys}


# -- reading the shards back ------------------------------------------------------------------


RUN_IDS = 65_536  # ids whose sums ShardedCosts reads at once for the costs of scattered words


class ShardedCosts:
    """The solver's cost source over a cost pass's shards and the model's heads.

    `costs(start, stop)` gives (A, B) for words [start, stop) in float32;
    `row_costs_of` and `column_costs_of` give one side (`lightrnn.realloc_common` uses them
    when present). Picklable: Ray tasks of the solver each read the blocks they need.
    `stay_bonus` > 0 takes that many nats per occurrence off each word's row and column in
    `current` (`lightrnn.costs.subtract_stay_bonus`).
    """

    def __init__(
        self, root: str, heads: dict[str, np.ndarray], stay_bonus: float = 0.0, current: Allocation | None = None
    ) -> None:
        if stay_bonus and current is None:
            raise ValueError("stay_bonus needs the current allocation (current=...)")
        self.root = root
        self.stay_bonus = stay_bonus
        # each word's current row and column, for the stay bonus (int32: 80 MB at V = 10M)
        self.current = (
            {"row": current.row_of.astype(np.int32), "col": current.col_of.astype(np.int32)} if stay_bonus else {}
        )
        manifest_uri = storage.join(root, MANIFEST)
        if not storage.exists(manifest_uri):
            raise CostShardError(
                f"{manifest_uri} not found: the cost pass under {root} did not finish; run the pipeline "
                "again to redo it"
            )
        with storage.open(manifest_uri, "rb") as f:
            self.manifest = json.loads(f.read())
        if self.manifest.get("format") != FORMAT:
            raise CostShardError(f"{manifest_uri} is not a cost-pass manifest ({FORMAT})")
        self.vocab_size, self.hidden = int(self.manifest["vocab_size"]), int(self.manifest["hidden"])
        self.starts = np.array([s["start"] for s in self.manifest["shards"]], dtype=np.int64)
        self.heads = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in heads.items()}
        for name, side in (("row", "w_row"), ("col", "w_col")):
            if self.heads[side].shape[1] != self.hidden:
                raise CostShardError(
                    f"{root}: the sums have hidden size {self.hidden}, the model's {name} head "
                    f"{self.heads[side].shape[1]}"
                )
        # -[W, b] per side: a word's costs are [sums, count] times it, one product with no (n, R) temporaries
        self._neg_heads = {
            side: -np.hstack([self.heads[f"w_{side}"], self.heads[f"b_{side}"][:, None]]) for side in ("row", "col")
        }
        self.check()

    def check(self) -> None:
        """Every shard file exists with the size its word range implies; raises naming the first bad one."""
        for shard in self.manifest["shards"]:
            words = shard["stop"] - shard["start"]
            for kind, (_, dtype) in _KINDS.items():
                uri = storage.join(self.root, shard[kind])
                width = 1 if kind == "counts" else self.hidden
                expected = words * width * np.dtype(dtype).itemsize
                fs, path = storage.filesystem(uri)
                if not fs.exists(path):
                    raise CostShardError(f"cost shard {uri} is missing: run the pipeline again to redo the cost pass")
                size = fs.size(path)
                if size != expected:
                    raise CostShardError(
                        f"cost shard {uri} is damaged: {size:,} bytes, expected {expected:,} for words "
                        f"[{shard['start']:,}, {shard['stop']:,}); delete {self.root} and run the pipeline again"
                    )

    def _read(self, kind: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one kind of sum, across shards."""
        dtype = _KINDS[kind][1]
        width = 1 if kind == "counts" else self.hidden
        item = width * np.dtype(dtype).itemsize
        out = np.empty((stop - start, width), dtype=dtype)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for shard in self.manifest["shards"][first:]:
            if shard["start"] >= stop:
                break
            lo, hi = max(start, shard["start"]), min(stop, shard["stop"])
            if hi <= lo:
                continue
            uri = storage.join(self.root, shard[kind])
            with storage.open(uri, "rb") as f:
                f.seek((lo - shard["start"]) * item)
                data = f.read((hi - lo) * item)
            if len(data) != (hi - lo) * item:
                raise CostShardError(f"cost shard {uri} is damaged: short read for words [{lo:,}, {hi:,})")
            out[lo - start : hi - start] = np.frombuffer(data, dtype=dtype).reshape(hi - lo, width)
        return out if width > 1 else out[:, 0]

    def _cost(self, side: str, sums: np.ndarray, count: np.ndarray, current: np.ndarray | None) -> np.ndarray:
        """-(sums W^T + count b) for n words, float32 (n, R or C), with the stay bonus taken off."""
        lhs = np.empty((sums.shape[0], self.hidden + 1), dtype=np.float32)
        lhs[:, :-1], lhs[:, -1] = sums, count
        cost = lhs @ self._neg_heads[side].T
        if self.stay_bonus:
            subtract_stay_bonus(cost, current, count, self.stay_bonus)
        return cost

    def _side(self, side: str, start: int, stop: int) -> np.ndarray:
        sums = self._read(f"{side}_sums", start, stop)
        count = self._read("counts", start, stop).astype(np.float32)
        current = self.current[side][start:stop] if self.stay_bonus else None
        return self._cost(side, sums, count, current)

    def _side_of(self, side: str, words: np.ndarray) -> np.ndarray:
        """One side's costs of the given words, any order: each run of ids is read once (sums are
        H floats a word) and only the given words' costs are computed."""
        words = np.asarray(words, dtype=np.int64)
        width = self._neg_heads[side].shape[0]
        out = np.empty((words.size, width), dtype=np.float32)
        order = np.argsort(words, kind="stable")
        ascending = words[order]
        i = 0
        while i < ascending.size:
            start = int(ascending[i])
            j = int(np.searchsorted(ascending, start + RUN_IDS))
            stop = int(ascending[j - 1]) + 1
            picked = ascending[i:j] - start
            sums = self._read(f"{side}_sums", start, stop)[picked]
            count = self._read("counts", start, stop)[picked].astype(np.float32)
            current = self.current[side][ascending[i:j]] if self.stay_bonus else None
            out[order[i:j]] = self._cost(side, sums, count, current)
            i = j
        return out

    def __call__(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        return self._side("row", start, stop), self._side("col", start, stop)

    def row_costs_of(self, words: np.ndarray) -> np.ndarray:
        return self._side_of("row", words)

    def column_costs_of(self, words: np.ndarray) -> np.ndarray:
        return self._side_of("col", words)


def model_heads(model: LightRNN) -> dict[str, np.ndarray]:
    """The row and column heads' weights and biases, as the solver's cost source takes them."""
    return {
        "w_row": model.row_head.weight.detach().float().cpu().numpy(),
        "b_row": model.row_head.bias.detach().float().cpu().numpy(),
        "w_col": model.col_head.weight.detach().float().cpu().numpy(),
        "b_col": model.col_head.bias.detach().float().cpu().numpy(),
    }
