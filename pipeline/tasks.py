"""The pipeline's Ray tasks between training phases: cost accumulation, reallocation, evaluation.

Each reads a training checkpoint (`pipeline.checkpoint`) and the prepared dataset straight
from storage, so the driver never holds a model or the corpus:

    costs-k    `accumulate_costs`: N tasks, one per slice of the train blocks, each
               summing the head inputs per word (`lightrnn.costs`); the driver adds them
    realloc-k  `reallocate`: one task with its CPUs and memory requested explicitly (`ResourcesConfig`),
               solving the word -> cell matching (`lightrnn.realloc.solve_reallocation`)
    evaluate   `evaluate_checkpoint`: valid and test perplexity of the final model
"""

from __future__ import annotations

import io
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from lightrnn.config import ReallocConfig, from_dict
from lightrnn.costs import HeadInputSums, accumulate_head_inputs, cost_blocks
from lightrnn.model import LightRNN
from lightrnn.realloc import solve_reallocation
from lightrnn.train import evaluate
from pipeline import storage
from pipeline.checkpoint import model_from_checkpoint
from pipeline.dataset import open_dataset
from pipeline.runconfig import ResourcesConfig


def _train_slice(data_root: str, part: int, parts: int) -> np.ndarray:
    """The train tokens of every `parts`-th block starting at `part`, blocks in stream order."""
    dataset = open_dataset(data_root)
    shards = dataset.shard_uris("train")
    if len(shards) >= parts:  # whole shards per task: each reads only its own files
        tables = [dataset.read_shard(uri) for uri in shards[part::parts]]
        table = pa.concat_tables(tables).sort_by("block")
    else:
        table = dataset.read_blocks("train")
        keep = np.flatnonzero(table.column("block").to_numpy() % parts == part)
        table = table.take(pa.array(keep))
    return table.column("tokens").combine_chunks().flatten().to_numpy()


@ray.remote(num_cpus=1)
def _accumulate_part(
    checkpoint: str, data_root: str, part: int, parts: int, batch_size: int, bptt: int, max_tokens: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    torch.set_num_threads(1)
    model = model_from_checkpoint(checkpoint)
    if not isinstance(model, LightRNN):
        raise ValueError(f"cost accumulation needs a LightRNN checkpoint, {checkpoint} holds {model.config.kind!r}")
    stream = _train_slice(data_root, part, parts)
    if stream.shape[0] < 2:
        raise ValueError(f"cost slice {part}/{parts} of {data_root} holds {stream.shape[0]} tokens")
    batch = max(1, min(batch_size, (stream.shape[0] - 1) // 2))
    sums = accumulate_head_inputs(model, stream, batch, bptt, max_tokens)
    return sums.row_sum_VH.numpy(), sums.col_sum_VH.numpy(), sums.count_V.numpy()


def accumulate_costs(
    checkpoint: str, data_root: str, parts: int, batch_size: int, bptt: int, cost_tokens: int, out_uri: str
) -> dict[str, Any]:
    """Head-input sums over the train blocks, computed by `parts` Ray tasks and saved to `out_uri` (.npz)."""
    per_part = -(-cost_tokens // parts) if cost_tokens else 0
    refs = [_accumulate_part.remote(checkpoint, data_root, i, parts, batch_size, bptt, per_part) for i in range(parts)]
    total: HeadInputSums | None = None
    for row, col, count in ray.get(refs):
        part = HeadInputSums(torch.from_numpy(row), torch.from_numpy(col), torch.from_numpy(count))
        total = part if total is None else total.merge(part)
    assert total is not None
    buffer = io.BytesIO()
    np.savez(buffer, row_sum_VH=total.row_sum_VH.numpy(), col_sum_VH=total.col_sum_VH.numpy(), count_V=total.count_V)
    storage.write_bytes(out_uri, buffer.getvalue())
    return {"tokens": int(total.count_V.sum()), "words_seen": int((total.count_V > 0).sum()), "tasks": parts}


def load_sums(uri: str) -> HeadInputSums:
    with storage.open(uri, "rb") as f:
        arrays = np.load(io.BytesIO(f.read()))
        return HeadInputSums(*(torch.from_numpy(arrays[k]) for k in ("row_sum_VH", "col_sum_VH", "count_V")))


def task_memory_bytes(vocab_size: int, resources: ResourcesConfig) -> int:
    """What the reallocation task asks Ray for: the config's figure, else ~4 KB per word (>= 512 MB)."""
    if resources.realloc_memory_mb:
        return resources.realloc_memory_mb * 2**20
    return max(512 * 2**20, vocab_size * 4096)


@ray.remote
def _reallocate(checkpoint: str, sums_uri: str, config: dict[str, Any], threads: int, out_uri: str) -> dict[str, Any]:
    realloc = from_dict(ReallocConfig, config)
    torch.set_num_threads(threads)
    model = model_from_checkpoint(checkpoint)
    assert isinstance(model, LightRNN)
    sums = load_sums(sums_uri)
    allocation, stats = solve_reallocation(
        cost_blocks(model, sums), None, model.allocation(), method=realloc.method, k=realloc.k
    )
    with storage.atomic_write(out_uri) as f:
        allocation.save(f)
    return stats.as_dict()


def reallocate(
    checkpoint: str, sums_uri: str, config: ReallocConfig, resources: ResourcesConfig, vocab_size: int, out_uri: str
) -> dict:
    """Solve the reallocation in one Ray task sized by `resources`; the new table goes to `out_uri`."""
    cpus = resources.realloc_cpus
    task = _reallocate.options(num_cpus=cpus, memory=task_memory_bytes(vocab_size, resources))
    return ray.get(task.remote(checkpoint, sums_uri, asdict(config), cpus, out_uri))


@ray.remote(num_cpus=1)
def _evaluate(checkpoint: str, data_root: str, batch_size: int, bptt: int) -> dict[str, float]:
    torch.set_num_threads(1)
    model = model_from_checkpoint(checkpoint)
    dataset = open_dataset(data_root)
    eos = dataset.vocab().eos_id
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        if split in dataset.splits:
            result = evaluate(model, dataset.tokens(split), eos, batch_size, bptt)
            out[f"{split}_ppl"], out[f"{split}_tokens"] = result.ppl, float(result.tokens)
    return out


def evaluate_checkpoint(checkpoint: str, data_root: str, batch_size: int, bptt: int) -> dict[str, float]:
    """Valid and test perplexity (every token scored, state carried) in one Ray task."""
    return ray.get(_evaluate.remote(checkpoint, data_root, batch_size, bptt))
