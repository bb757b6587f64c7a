"""What every Ray Train worker runs: DDP training of a `lightrnn` model on its shard of blocks.

Each worker reads its share of the train split's Parquet blocks (Ray Data
`streaming_split(equal=True)`, through `get_dataset_shard`), takes them `B` at a time
(`B = batch_size // world_size`) and walks the (B, block_len) batch in BPTT segments,
carrying the LSTM state inside the blocks and starting afresh at each new batch:

    block b0: t0 t1 t2 ... t(L-1)    <- segment 1 reads columns 0..T-1, targets 1..T
    block b1: u0 u1 u2 ... u(L-1)       segment 2 reads T..2T-1, ...; ceil((L-1)/T) segments
    ...                                 the last token of a block is a target only

Every rank takes the same number of steps (the split is equal and each epoch is cut to
`batches_per_epoch` batches), so every rank reports the same number of times. A step's
data position is a function of the step, so a restored run continues where its
checkpoint was taken (the LSTM state starts afresh there, as in `lightrnn.train`).
Which blocks land on which rank is Ray Data's choice and can differ after a restart.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, TrainConfig, from_dict
from lightrnn.model import LanguageModel, LightRNN, State, build_model
from lightrnn.train import evaluate, lr_at, make_optimizer, segments, train_step
from pipeline import storage
from pipeline.dataset import open_dataset

STATE_FILE = "state.pt"
ALLOCATION_FILE = "allocation.parquet"
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class DistConfig:
    """Where and how a distributed run trains; the model and schedule live in Model/TrainConfig."""

    data: str  # prepared dataset root (pipeline.prepare), local path or s3://
    output: str  # run storage: checkpoints go to {output}/{name}
    name: str = "lightrnn"  # run name; the same name with resume=True continues the run
    workers: int = 2
    use_gpu: bool = False  # NCCL + bf16 autocast when True, gloo + fp32 on CPU
    allocation: str = ""  # Allocation.save URI for LightRNN; "" = Allocation.random(V, seed)
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # older ones are deleted by Ray Train
    max_failures: int = 2  # whole-group restarts from the latest checkpoint before giving up
    limit_blocks: int = 0  # train on the first N full blocks only (0 = all); debugging and tests
    optimizer: str = "adam"  # one of OPTIMIZERS; sgd makes one-step equivalence tests exact
    # phases of a longer schedule (pipeline): stop at this step (0 = the schedule's end), the
    # learning rate still following the whole schedule; a new run starts from `init_checkpoint`
    # (a checkpoint directory URI: weights, optimizer, step) with `allocation` replacing its table
    stop_step: int = 0
    init_checkpoint: str = ""
    mlflow_tracking_uri: str = ""  # rank 0 logs every report to this MLflow run when both are set
    mlflow_run_id: str = ""
    test_fail_at_step: int = 0  # test hook: the last rank exits at this step unless restored

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.stop_step < 0:
            raise ValueError(f"stop_step must be >= 0 (0 = the whole schedule), got {self.stop_step}")


@dataclass(frozen=True)
class Schedule:
    """Step counts every rank derives identically from the block count."""

    local_batch: int  # blocks per rank per step
    batches_per_epoch: int
    segments_per_batch: int
    total_steps: int

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch * self.segments_per_batch

    def position(self, step: int) -> tuple[int, int, int]:
        """(epoch, batch in epoch, segment in batch) at which `step` (0-based) reads."""
        epoch, rest = divmod(step, self.steps_per_epoch)
        batch, segment = divmod(rest, self.segments_per_batch)
        return epoch, batch, segment


def make_schedule(train_blocks: int, block_len: int, world: int, config: TrainConfig) -> Schedule:
    if config.batch_size % world:
        raise ValueError(
            f"train.batch_size={config.batch_size} (the global batch, in blocks) must be a multiple of "
            f"the {world} workers"
        )
    local = config.batch_size // world
    batches = (train_blocks // world) // local
    if batches < 1 or block_len < 2:
        raise ValueError(
            f"{train_blocks} full blocks of {block_len} tokens cannot give {world} workers a batch of {local}: "
            "lower train.batch_size or prepare the data with a smaller --block-len"
        )
    segments = math.ceil((block_len - 1) / config.bptt)
    total = config.max_steps or max(1, round(batches * segments * config.epochs))
    return Schedule(local, batches, segments, total)


def allocation_id(allocation: Allocation) -> str:
    """A short content hash, so a checkpoint names the allocation it was trained with."""
    return hashlib.sha1(np.ascontiguousarray(allocation.cell_of, dtype=np.int64).tobytes()).hexdigest()[:16]


def _load_allocation(uri: str) -> Allocation:
    with storage.open(uri, "rb") as f:
        return Allocation.load(f)


def _build(model_config: ModelConfig, job: DistConfig, seed: int, restored_dir: str | None) -> LanguageModel:
    torch.manual_seed(seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    if model_config.kind != "lightrnn":
        return build_model(model_config)
    if restored_dir is not None:
        allocation = Allocation.load(os.path.join(restored_dir, ALLOCATION_FILE))
    elif job.allocation:
        allocation = _load_allocation(job.allocation)
    else:
        allocation = Allocation.random(model_config.vocab_size, seed)
    if allocation.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"allocation covers {allocation.vocab_size} words but the dataset vocabulary has "
            f"{model_config.vocab_size}: build the allocation from this dataset's vocabulary"
        )
    return build_model(model_config, allocation)


def load_checkpoint_state(uri: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The `state.pt` of a checkpoint directory (local path or any fsspec URI)."""
    with storage.open(storage.join(uri, STATE_FILE), "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location=device, weights_only=True)


class _MetricLogger:
    """Rank 0's per-report metrics to one MLflow run (Ray Train V2 takes no MLflow callback)."""

    KEYS: ClassVar[dict[str, str]] = {
        "loss": "train_loss",
        "lr": "lr",
        "words_per_s": "words_per_s",
        "valid_ppl": "valid_ppl",
        "epoch": "epoch",
    }

    def __init__(self, job: DistConfig) -> None:
        self.client = None
        if job.mlflow_tracking_uri and job.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(job.mlflow_tracking_uri), job.mlflow_run_id

    def log(self, metrics: dict[str, Any]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(metrics["step"])
        batch = [
            Metric(name, float(metrics[key]), now, step)
            for key, name in self.KEYS.items()
            if key in metrics and math.isfinite(float(metrics[key]))
        ]
        self.client.log_batch(self.run_id, metrics=batch)


def _optimizer(model: torch.nn.Module, job: DistConfig, config: TrainConfig) -> torch.optim.Optimizer:
    if job.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return make_optimizer(model, config)


def _blocks_tensor(batch: pa.Table, block_len: int, device: torch.device) -> torch.Tensor:
    """(B, block_len) int64 ids from a pyarrow batch of full blocks."""
    flat = batch.column("tokens").combine_chunks().flatten().to_numpy()
    return torch.from_numpy(flat.astype(np.int64).reshape(batch.num_rows, block_len)).to(device)


def _save_checkpoint(
    model: LanguageModel, optimizer: torch.optim.Optimizer, step: int, schedule: Schedule, loop_config: dict
) -> str:
    directory = tempfile.mkdtemp(prefix="lightrnn-ckpt-")
    epoch, batch, segment = schedule.position(step)
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "data_position": {"epoch": epoch, "batch": batch, "segment": segment},
        "model_config": asdict(model.config),  # vocab_size resolved from the dataset
        "train_config": loop_config["train"],
        "dist_config": loop_config["dist"],
    }
    if isinstance(model, LightRNN):
        allocation = model.allocation()
        allocation.save(os.path.join(directory, ALLOCATION_FILE))
        state["allocation_id"] = allocation_id(allocation)
    torch.save(state, os.path.join(directory, STATE_FILE))
    return directory


def _quiet_report_lines() -> None:
    """Ray Train 2.60 logs every ray.train.report at INFO, metrics dict included, from every rank.

    The driver already prints one [train] line per report (ProgressCallback). The logger is
    named after Ray's private module file; if that moves, this is a no-op and the lines return.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; `loop_config` holds the asdict'ed model, train and dist configs."""
    job = from_dict(DistConfig, loop_config["dist"])
    _quiet_report_lines()
    train_config = from_dict(TrainConfig, loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    dataset = open_dataset(job.data)
    vocab = dataset.vocab()
    model_config = from_dict(ModelConfig, loop_config["model"])
    if model_config.vocab_size == 0:
        model_config = replace(model_config, vocab_size=len(vocab))
    schedule = make_schedule(loop_config["train_blocks"], dataset.block_len, world, train_config)

    checkpoint = ray.train.get_checkpoint()
    restored: dict[str, Any] | None = None
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as restored_dir:
        model = _build(model_config, job, train_config.seed, restored_dir).to(device)
        optimizer = _optimizer(model, job, train_config)
        if restored_dir is not None:
            restored = torch.load(os.path.join(restored_dir, STATE_FILE), map_location=device, weights_only=True)
            model.load_state_dict(restored["model"])
            optimizer.load_state_dict(restored["optimizer"])
    if restored is None and job.init_checkpoint:
        initial = load_checkpoint_state(job.init_checkpoint, device)
        model.load_state_dict(initial["model"])
        optimizer.load_state_dict(initial["optimizer"])
        if isinstance(model, LightRNN) and job.allocation:
            model.set_allocation(_load_allocation(job.allocation))  # the state dict held the old table
        start_step = int(initial["step"])
    else:
        start_step = int(restored["step"]) if restored else 0
    stop = job.stop_step or schedule.total_steps
    tracker = _MetricLogger(job) if rank == 0 else None
    # adaptive softmax leaves tail clusters without gradient in some batches; DDP must know
    ddp_kwargs = {"find_unused_parameters": True} if model_config.kind == "adaptive" else None
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if job.use_gpu else nullcontext()
    valid_stream = dataset.tokens("valid") if rank == 0 and "valid" in dataset.splits else None

    def valid_ppl() -> float:
        if valid_stream is None:
            return float("nan")
        return evaluate(
            model, valid_stream, vocab.eos_id, train_config.eval_batch_size, train_config.bptt, str(device)
        ).ppl

    shard = ray.train.get_dataset_shard("train")
    step = start_step
    window = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * words, words) since last report
    window_start = attempt_start = time.perf_counter()
    attempt_words, eval_seconds, final_loss, index = 0, 0.0, float("nan"), -1
    model.train()
    while step < stop:
        epoch, first_batch, first_segment = schedule.position(step)
        batches = shard.iter_batches(
            batch_size=schedule.local_batch, batch_format="pyarrow", drop_last=True, prefetch_batches=2
        )
        for index, batch in enumerate(batches):
            if index >= schedule.batches_per_epoch or step >= stop:
                break
            if index < first_batch:
                continue  # consumed before the checkpoint this run was restored from
            blocks_BL = _blocks_tensor(batch, dataset.block_len, device)
            if attempt_words == 0 and not window.any():  # time training, not Ray Data's start-up
                window_start = attempt_start = time.perf_counter()
            state: State | None = None
            first = first_segment if index == first_batch else 0
            for x_BT, y_BT in segments(blocks_BL.t(), train_config.bptt, first):
                lr = lr_at(step, schedule.total_steps, train_config)
                loss, state = train_step(ddp_model, optimizer, x_BT, y_BT, state, lr, train_config.clip, autocast)
                step += 1
                final_loss = float(loss)
                window += torch.tensor([final_loss * x_BT.numel(), x_BT.numel()], dtype=torch.float64, device=device)
                if job.test_fail_at_step and step == job.test_fail_at_step and rank == world - 1 and not restored:
                    # let Train commit the checkpoints reported so far, so the restart point is fixed
                    ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
                    os._exit(1)  # a lost worker, as a crash or preemption would leave it
                epoch_done = step % schedule.steps_per_epoch == 0
                last = step >= stop
                ckpt_due = step % job.checkpoint_every == 0 or last
                if not (step % train_config.log_every == 0 or ckpt_due or epoch_done):
                    continue
                if world > 1:
                    dist.all_reduce(window)  # global loss and words, the same figures on every rank
                now = time.perf_counter()
                loss_sum, words = window.tolist()
                attempt_words += int(words)
                metrics: dict[str, Any] = {
                    "step": step,
                    "epoch": step / schedule.steps_per_epoch,
                    "loss": loss_sum / words,
                    "lr": lr,
                    "words_per_s": words / (now - window_start),
                    "start_step": start_step,
                    "total_steps": schedule.total_steps,
                    "stop_step": stop,
                    "world_size": world,
                    "attempt_words": attempt_words,
                    "attempt_seconds": now - attempt_start - eval_seconds,
                    "final_train_loss": final_loss,
                }
                if epoch_done or last:
                    eval_start = time.perf_counter()
                    metrics["valid_ppl"] = valid_ppl()
                    model.train()
                    eval_seconds += time.perf_counter() - eval_start
                checkpoint_dir = None
                if ckpt_due and rank == 0:
                    checkpoint_dir = _save_checkpoint(model, optimizer, step, schedule, loop_config)
                if tracker is not None:
                    tracker.log(metrics)
                ray.train.report(
                    metrics,
                    checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None,
                )
                if checkpoint_dir:
                    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # SYNC upload has copied it
                window.zero_()
                window_start = time.perf_counter()
                if last:
                    break
        if step < stop and schedule.position(step)[0] == epoch:
            raise RuntimeError(
                f"rank {rank}: the train shard ran out after {index} batches in epoch {epoch}, "
                f"expected {schedule.batches_per_epoch}; the dataset changed under the run"
            )
