"""The pipeline's Ray tasks between training phases: reallocation and evaluation.

Each reads a training checkpoint (`pipeline.checkpoint`) and the prepared dataset or the
cost pass's shards (`pipeline.cost_pass`) straight from storage, so the driver never holds
a model, the corpus or the costs:

    realloc-k  `reallocate`: one task with its CPUs and memory requested explicitly
               (`ResourcesConfig`, else from V, H and the solver's bytes per word), solving the
               word -> cell matching (`lightrnn.realloc.solve_reallocation`); its parallel
               work runs as 1-CPU tasks (`RayMapper`)
    evaluate   `evaluate_checkpoint`: valid and test perplexity of the final model
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import ray
import torch

from lightrnn.config import ReallocConfig, from_dict
from lightrnn.model import LightRNN
from lightrnn.realloc import AUTO_EXACT_WORDS, solve_reallocation
from lightrnn.realloc_two_stage import LEFTOVER_WORDS
from lightrnn.train import evaluate
from pipeline import storage
from pipeline.checkpoint import model_from_checkpoint
from pipeline.cost_pass import RUN_IDS, ShardedCosts, model_heads
from pipeline.dataset import open_dataset
from pipeline.memory import peak_rss_mb, reset_peak
from pipeline.runconfig import ResourcesConfig


@ray.remote(num_cpus=1)
def _apply(fn: Callable[[Any, Any], Any], shared: Any, item: Any) -> tuple[Any, float]:
    reset_peak()
    return fn(shared, item), peak_rss_mb()


class RayMapper:
    """A `lightrnn.realloc_common.Mapper` that runs each item as a 1-CPU Ray task.

    `shared` goes into the object store once (its numpy arrays are read there without a
    copy). At most `in_flight` tasks (default: twice the cluster's CPUs) are submitted or
    unread at a time, and results are yielded in item order as they arrive, so the object
    store holds a window of items and results, never all of them. `peak_task_mb` is the
    largest private memory any task of this mapper reached.
    """

    def __init__(self, in_flight: int | None = None) -> None:
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight must be >= 1 task, got {in_flight}")
        self.in_flight = in_flight
        self.peak_task_mb = 0.0
        self.tasks = 0

    def __call__(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> Iterator[Any]:
        window = self.in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        shared_ref = ray.put(shared)
        pending: deque[ray.ObjectRef] = deque()
        for item in items:
            pending.append(_apply.remote(fn, shared_ref, item))
            self.tasks += 1
            if len(pending) >= window:
                yield self._oldest(pending)
        while pending:
            yield self._oldest(pending)

    def _oldest(self, pending: deque[ray.ObjectRef]) -> Any:
        result, peak = ray.get(pending.popleft())
        self.peak_task_mb = max(self.peak_task_mb, peak)
        return result


# what the solve holds per word (candidates, matchings): two_stage peaked at 2,221 MiB at V = 3M and
# 6,227 MiB at V = 10M, H = 32 in the pipeline, about 0.5 GB plus 600 bytes a word
# (docs/scaling.md); exact needs more (docs/guide.md)
SOLVE_BYTES_PER_WORD = {"two_stage": 600, "exact": 2_000}
_SOLVE_BASE_BYTES = 512 * 2**20  # the worker process, torch and the model read from the checkpoint


def task_memory_bytes(vocab_size: int, hidden: int, method: str, resources: ResourcesConfig) -> int:
    """What the reallocation task asks Ray for: the config's figure, else the solve's bytes per word
    times V, plus the H-wide sums and the cost rows of a batch of scattered words, plus the process."""
    if resources.realloc_memory_mb:
        return resources.realloc_memory_mb * 2**20
    if method == "auto":
        method = "exact" if vocab_size <= AUTO_EXACT_WORDS else "two_stage"
    side = int(np.ceil(np.sqrt(vocab_size)))
    scattered = (RUN_IDS * hidden + LEFTOVER_WORDS * (hidden + 1 + side)) * 4
    return vocab_size * SOLVE_BYTES_PER_WORD.get(method, 2_000) + scattered + _SOLVE_BASE_BYTES


@ray.remote
def _reallocate(checkpoint: str, costs_root: str, config: dict[str, Any], threads: int, out_uri: str) -> dict[str, Any]:
    realloc = from_dict(ReallocConfig, config)
    torch.set_num_threads(threads)
    reset_peak()
    model = model_from_checkpoint(checkpoint)
    assert isinstance(model, LightRNN)
    current = model.allocation()
    costs = ShardedCosts(costs_root, model_heads(model), realloc.stay_bonus, current)
    mapper = RayMapper()
    allocation, stats = solve_reallocation(costs, None, current, method=realloc.method, k=realloc.k, mapper=mapper)
    with storage.atomic_write(out_uri) as f:
        allocation.save(f)
    return {**stats.as_dict(), "peak_rss_mb": peak_rss_mb(), "peak_task_mb": mapper.peak_task_mb}


def reallocate(
    checkpoint: str,
    costs_root: str,
    config: ReallocConfig,
    resources: ResourcesConfig,
    vocab_size: int,
    hidden: int,
    out_uri: str,
) -> dict:
    """Solve the reallocation in one Ray task sized by `resources` (its parallel work in 1-CPU
    tasks beside it); the costs come from the cost pass's shards, the new table goes to `out_uri`."""
    cpus = resources.realloc_cpus
    memory = task_memory_bytes(vocab_size, hidden, config.method, resources)
    task = _reallocate.options(num_cpus=cpus, memory=memory)
    stats = ray.get(task.remote(checkpoint, costs_root, asdict(config), cpus, out_uri))
    return {**stats, "memory_requested_mb": memory / 2**20}


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
