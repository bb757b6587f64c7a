"""Data-parallel training on Ray Train: the driver side.

The driver opens the prepared dataset, hands Ray Train its train blocks as a lazy Ray
Dataset, and runs `TorchTrainer` with the worker loop of `pipeline.train_loop`. Each
worker gets its own fixed range of blocks in block order (`BlockRangeDataConfig`), so
the data a step reads does not depend on how Ray Data schedules the read. Checkpoints
(`pipeline.checkpoint`) go to `{output}/{name}`; a second run with the same output and name continues from the latest
one (Ray Train reads its snapshot there), and `FailureConfig(max_failures)` restarts a
failed worker group from it automatically.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from lightrnn.config import ModelConfig, TrainConfig
from pipeline import storage
from pipeline.checkpoint import Schedule, has_run, make_schedule
from pipeline.dataset import TokenDataset, open_dataset
from pipeline.train_loop import EDGES, DistConfig, train_loop_per_worker

__all__ = ["DistConfig", "RunExistsError", "run_training"]


class RunExistsError(storage.StorageError):
    """A new run would write over an existing one's checkpoints (or --resume found none)."""


class ProgressCallback(ray.train.UserCallback):
    """One line per report, printed by the Train controller (forwarded to the driver's console)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        m = metrics[0]  # every rank reports the same all-reduced figures
        line = (
            f"[train] step {m['step']:>6}/{m['total_steps']} epoch {m['epoch']:5.2f} loss {m['loss']:.3f} "
            f"lr {m['lr']:.2e} {m['words_per_s']:,.0f} words/s"
        )
        if "valid_ppl" in m:
            line += f" valid ppl {m['valid_ppl']:.2f}"
        if "test_ppl" in m:
            line += f" test ppl {m['test_ppl']:.2f}"
        if checkpoint is not None:
            line += " [checkpoint]"
        print(line, flush=True)


class BlockRangeDataConfig(ray.train.DataConfig):
    """Rank r streams the blocks `schedule.rank_range(r)` of each dataset ("train", the units'
    shards, and EDGES, the straddling blocks), each in block order.

    Ray Train's default `streaming_split` hands blocks to whichever worker asks next, so
    which blocks a rank reads (and in which order) changes from run to run and after every
    restart. Here each rank gets its own lazily read Dataset, filtered to its block range
    (the filter is pushed into the Parquet read, which skips the other row groups) and
    executed with `preserve_order`: a step's tokens are a function of the step alone,
    and every block is read once per epoch, before and after a restart.
    """

    def __init__(self, schedule: Schedule) -> None:
        super().__init__(datasets_to_split=[])
        self.schedule = schedule

    def configure(  # type: ignore[override]
        self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs: Any
    ) -> list[dict[str, Any]]:
        options = self.default_ingest_options()
        options.preserve_order = True
        output = []
        for rank in range(world_size):
            start, stop = self.schedule.rank_range(rank)
            iterators = {}
            for name, dataset in datasets.items():
                ranged = dataset.filter(expr=f"block >= {start} and block < {stop}")
                ranged.set_name(f"{name}-rank{rank}")
                ranged.context.execution_options = options
                iterators[name] = ranged.iterator()
            output.append(iterators)
        return output


def _absolute(uri: str) -> str:
    """Workers may run in another directory: pin local paths down."""
    return os.path.abspath(uri) if "://" not in uri else uri


def _plan(dataset: TokenDataset, train_config: TrainConfig, job: DistConfig) -> tuple[int, Schedule]:
    """The full train blocks the run reads and its schedule; refuses a dataset or budget that cannot work."""
    for split in ("train", "valid"):
        if split not in dataset.splits:
            raise ValueError(f"{job.data} has no {split!r} split; prepare it with --train and --valid")
    full_blocks = dataset.manifest["splits"]["train"]["tokens"] // dataset.block_len  # the last may be short
    train_blocks = min(full_blocks, job.limit_blocks) if job.limit_blocks else full_blocks
    schedule = make_schedule(train_blocks, dataset.block_len, job.workers, train_config)
    if job.stop_step > schedule.total_steps:
        raise ValueError(f"stop_step {job.stop_step} is past the schedule's {schedule.total_steps} steps")
    return train_blocks, schedule


def run_training(
    model_config: ModelConfig,
    train_config: TrainConfig,
    job: DistConfig,
    resume: bool = False,
    worker_loop: Callable[[dict], None] = train_loop_per_worker,
) -> dict[str, Any]:
    """Train on `job.data` with `job.workers` Ray Train workers; returns the final figures.

    Raises RunExistsError when `{output}/{name}` already holds a run and `resume` is False,
    or holds none and `resume` is True. `worker_loop` is what each worker runs (a wrapper
    of `train_loop_per_worker`, e.g. one that injects a failure).
    """
    job = DistConfig(**{**asdict(job), "data": _absolute(job.data), "output": _absolute(job.output)})
    dataset = open_dataset(job.data)
    train_blocks, schedule = _plan(dataset, train_config, job)  # fails before Ray starts work
    run_dir = storage.join(job.output, job.name)
    exists = has_run(run_dir)
    if exists and not resume:
        raise RunExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --name")
    if resume and not exists:
        raise RunExistsError(f"--resume: {run_dir} holds no checkpointed run to continue")

    # Ray Data reads lazily; each worker streams its own block range (BlockRangeDataConfig) from
    # the units' shards and, beside them, from the edges' shards, and merges the two by block id
    train_sets = {
        name: ds.select_columns(["block", "tokens"])
        for name, ds in (("train", dataset.ray_dataset("train", False)), (EDGES, dataset.ray_dataset("train", True)))
        if ds is not None
    }
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "model": asdict(model_config),
            "train": asdict(train_config),
            "dist": asdict(job),
            "train_blocks": train_blocks,
            "datasets": list(train_sets),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu),
        run_config=ray.train.RunConfig(
            storage_path=job.output,
            name=job.name,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.keep_checkpoints),
            callbacks=[ProgressCallback()],
        ),
        datasets=train_sets,
        dataset_config=BlockRangeDataConfig(schedule),
    )
    print(
        f"[run] {job.workers} worker(s), {train_blocks} blocks of {dataset.block_len} tokens, global batch "
        f"{train_config.batch_size} blocks, {schedule.steps_per_epoch} steps/epoch, {schedule.total_steps} steps "
        f"-> {run_dir}",
        flush=True,
    )
    summary = _summary(trainer.fit(), run_dir, job.workers)
    ppl = summary["valid_ppl"]
    print(
        f"[done] {summary['steps']} steps (from {summary['start_step']}), final loss "
        f"{summary['final_train_loss']:.3f}, valid ppl {ppl if ppl is None or math.isnan(ppl) else round(ppl, 2)}, "
        f"{summary['words_per_s'] or 0:,.0f} words/s on {job.workers} worker(s); checkpoint {summary['checkpoint']}",
        flush=True,
    )
    return summary


def _summary(result: ray.train.Result, run_dir: str, workers: int) -> dict[str, Any]:
    """The figures of a finished run, from the metrics of its last report with a checkpoint."""
    metrics = result.metrics or {}
    seconds = metrics.get("attempt_seconds")
    return {
        "run": run_dir,
        "workers": workers,
        "steps": metrics.get("step"),
        "start_step": metrics.get("start_step"),
        "epochs": metrics.get("epoch"),
        "final_train_loss": metrics.get("final_train_loss"),
        "window_train_loss": metrics.get("loss"),
        "valid_ppl": metrics.get("valid_ppl"),
        "test_ppl": metrics.get("test_ppl"),  # at the schedule's end, when the dataset has a test split
        "words_per_s": metrics["attempt_words"] / seconds if seconds else None,
        "train_words": metrics.get("attempt_words"),
        "train_seconds": seconds,
        "peak_worker_mb": metrics.get("peak_worker_mb"),  # the largest worker's private memory (pipeline.memory)
        # Checkpoint.path drops the URI scheme on remote storage: name it under the run instead
        "checkpoint": storage.join(run_dir, posixpath.basename(result.checkpoint.path.rstrip("/")))
        if result.checkpoint
        else None,
        # figures at each checkpoint Ray Train still keeps (num_to_keep), oldest first
        "history": sorted(
            (
                {k: m[k] for k in ("step", "loss", "valid_ppl", "start_step") if k in m}
                for _, m in result.best_checkpoints
            ),
            key=lambda m: m["step"],
        ),
    }
