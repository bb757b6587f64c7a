"""What every Ray Train worker runs: DDP training of a `lightrnn` model on its shard of blocks.

Each worker streams its own range of the train split's Parquet blocks in block order
(Ray Data, one lazily read dataset per rank: `pipeline.train.BlockRangeDataConfig`), takes
them `B` at a time (`B = batch_size // world_size`) and walks the (B, block_len) batch in
BPTT segments, carrying the LSTM state inside the blocks and starting afresh at each new
batch:

    block b0: t0 t1 t2 ... t(L-1)    <- segment 1 reads columns 0..T-1, targets 1..T
    block b1: u0 u1 u2 ... u(L-1)       segment 2 reads T..2T-1, ...; ceil((L-1)/T) segments
    ...                                 the last token of a block is a target only

Every rank takes the same number of steps (`batches_per_epoch` batches of its range per
epoch), so every rank reports the same number of times. Resume is exact: the blocks a step
reads are a function of the step and the rank (`Schedule.batch_blocks`, checked on every
batch), dropout masks are drawn from a seed of (seed, rank, step), and a checkpoint taken
inside a batch carries every rank's LSTM state. On the CPU a run killed and restored ends
with the same weights, bit for bit, as one that was never interrupted.

What the loop does so that it runs well on GPUs:

- precision: bf16 autocast for the heads, the LSTM in `DistConfig.lstm_dtype`
  (float32 by default, TF32 allowed) and its carried state in float32 (`lightrnn.model`);
- randomness: identical initial weights on every rank, then a seed per rank and step, so the
  ranks draw different dropout masks and a restored run draws the same ones;
- communication: the gradient all-reduce only; the word-table buffers are built
  identically on every rank from the same allocation file and never broadcast;
- host syncs: none per step. Ids are checked per batch of blocks on the host, losses are
  summed on the device and read at report steps, and Adam's step counters stay on the CPU.

Held-out evaluation is data-parallel too: each rank scores its share of the evaluation
columns on its own device and the sums are all-reduced (`pipeline.train_eval`). At the end of the
schedule the test split is scored as well and the figures go into the last checkpoint.

The loop's parts: `start_state` (the weights and optimizer a worker starts from),
`segment_stream` (the data position of every step, `pipeline.train_stream`), `Reporter`
(metrics, evaluation, checkpoints and MLflow at report steps).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, TrainConfig, from_dict
from lightrnn.model import LSTM_DTYPES, LanguageModel, State, build_model, set_lstm_dtype
from lightrnn.train import EvalResult, lr_at, make_optimizer, train_step
from pipeline.checkpoint import (
    Schedule,
    checkpoint_allocation,
    load_allocation,
    load_state,
    make_schedule,
    save_checkpoint,
)
from pipeline.dataset import open_dataset
from pipeline.memory import peak_rss_mb, reset_peak
from pipeline.train_eval import evaluator
from pipeline.train_stream import segment_stream

OPTIMIZERS = ("adam", "sgd")
EDGES = "train_edges"  # the Ray Train dataset of the train split's straddling blocks (pipeline.dataset)


@dataclass(frozen=True)
class DistConfig:
    """Where and how a distributed run trains; the model and schedule live in Model/TrainConfig."""

    data: str  # prepared dataset root (pipeline.prepare), local path or s3://
    output: str  # run storage: checkpoints go to {output}/{name}
    name: str = "lightrnn"  # run name; the same name with resume=True continues the run
    workers: int = 2
    use_gpu: bool = False  # NCCL + bf16 autocast when True, gloo + fp32 on CPU
    lstm_dtype: str = "float32"  # the LSTM's compute dtype (LSTM_DTYPES); autocast never picks it
    allocation: str = ""  # Allocation.save URI for LightRNN; "" = Allocation.random(V, seed)
    checkpoint_every: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # older ones are deleted by Ray Train
    max_failures: int = 2  # whole-group restarts from the latest checkpoint before giving up
    limit_blocks: int = 0  # train on the first N full blocks only (0 = all); debugging and tests
    optimizer: str = "adam"  # one of OPTIMIZERS; sgd makes one-step equivalence tests exact
    # phases of a longer schedule (pipeline): stop at this step (0 = the schedule's end), the
    # learning rate still following the whole schedule; a new run starts from `init_checkpoint`
    # (a checkpoint folder URI: weights, optimizer, step) with `allocation` as its word table
    stop_step: int = 0
    init_checkpoint: str = ""
    mlflow_tracking_uri: str = ""  # rank 0 logs every report to this MLflow run when both are set
    mlflow_run_id: str = ""

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
        if self.lstm_dtype not in LSTM_DTYPES:
            raise ValueError(f"lstm_dtype must be one of {', '.join(LSTM_DTYPES)}; got {self.lstm_dtype!r}")


# -- the starting point ------------------------------------------------------------------


@dataclass
class StartState:
    """What a worker trains from: the model, its optimizer and the first step."""

    model: LanguageModel
    optimizer: torch.optim.Optimizer
    step: int
    restored: bool  # from Ray Train's latest checkpoint of this run (a restart), not a fresh start
    lstm_state: State | None = None  # carried into `step` (restored mid-batch)


def _optimizer(model: torch.nn.Module, job: DistConfig, config: TrainConfig) -> torch.optim.Optimizer:
    if job.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return make_optimizer(model, config)


def start_state(
    model_config: ModelConfig,
    train_config: TrainConfig,
    job: DistConfig,
    device: torch.device,
    rank: int,
    checkpoint: ray.train.Checkpoint | None,
) -> StartState:
    """Ray Train's latest `checkpoint` of this run after a restart; else the previous phase's
    weights (`job.init_checkpoint`) with this phase's word table (`job.allocation`); else a
    fresh model. A checkpoint's table is its own allocation.parquet.

    Every rank builds the same weights (seeded with `train_config.seed`); the training loop
    reseeds at every step (`step_seed`). A restart inside a batch takes this rank's LSTM
    state from the checkpoint. Checkpoints are read on
    the CPU: the optimizer moves its moments beside the parameters and keeps Adam's `step`
    counters on the CPU, where reading them costs no device sync.
    """
    lightrnn = model_config.kind == "lightrnn"
    state: dict[str, Any] | None = None
    allocation: Allocation | None = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(folder)
            allocation = checkpoint_allocation(folder) if lightrnn else None
    elif job.init_checkpoint:
        state = load_state(job.init_checkpoint)
        if lightrnn:
            table = job.allocation or None
            allocation = load_allocation(table) if table else checkpoint_allocation(job.init_checkpoint)
    elif lightrnn:
        table = job.allocation
        allocation = load_allocation(table) if table else Allocation.random(model_config.vocab_size, train_config.seed)
    if allocation is not None and allocation.vocab_size != model_config.vocab_size:
        raise ValueError(
            f"allocation covers {allocation.vocab_size} words but the dataset vocabulary has "
            f"{model_config.vocab_size}: build the allocation from this dataset's vocabulary"
        )
    torch.manual_seed(train_config.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(model_config, allocation).to(device)
    set_lstm_dtype(model, job.lstm_dtype)
    optimizer = _optimizer(model, job, train_config)
    lstm_state = None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if checkpoint is not None:
            lstm_state = _rank_lstm_state(state, rank, device)
    return StartState(model, optimizer, int(state["step"]) if state else 0, checkpoint is not None, lstm_state)


def _rank_lstm_state(state: dict[str, Any], rank: int, device: torch.device) -> State | None:
    """This rank's (h, c) from a checkpoint taken inside a batch; None when it holds none.

    A checkpoint written with another number of workers cannot hold this rank's state
    (the schedule gives other blocks to each rank then); its run continues with the state
    afresh, as at a batch start.
    """
    saved = state.get("lstm_state")
    world = ray.train.get_context().get_world_size()
    if not saved or saved["h"].shape[0] != world:
        return None
    return saved["h"][rank].to(device), saved["c"][rank].to(device)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of `rank`'s random draws (dropout) at `step`: a restored run draws the same masks."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


# -- reports -----------------------------------------------------------------------------


class MetricLogger:
    """Rank 0's per-report metrics to one MLflow run (Ray Train V2 takes no MLflow callback)."""

    KEYS: ClassVar[dict[str, str]] = {
        "loss": "train_loss",
        "lr": "lr",
        "words_per_s": "words_per_s",
        "valid_ppl": "valid_ppl",
        "test_ppl": "test_ppl",
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


class Reporter:
    """Loss and words since the last report, and what happens at a report step.

    Every rank reports at the same steps (every `log_every`, every checkpoint, each epoch's
    end and the last step) with the same all-reduced figures; rank 0 attaches the checkpoint
    and logs to MLflow. Sums stay on the device between reports: no host sync per step.
    """

    def __init__(
        self,
        job: DistConfig,
        config: TrainConfig,
        schedule: Schedule,
        start: StartState,
        stop: int,
        world: tuple[int, int],
        device: torch.device,
        evaluate: Callable[[str], EvalResult | None],
        checkpoint_configs: dict[str, Any],
    ) -> None:
        self.job, self.config, self.schedule, self.start, self.stop = job, config, schedule, start, stop
        self.rank, self.world = world
        self.evaluate = evaluate
        self.checkpoint_configs = checkpoint_configs
        self.window = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * words, words)
        self.last_loss = torch.full((), math.nan, device=device)
        self.tracker = MetricLogger(job) if self.rank == 0 else None
        self.words = 0
        self.eval_seconds = 0.0
        self.window_start = self.attempt_start = time.perf_counter()
        self.timing = False

    def start_timing(self) -> None:
        """Called when data arrives: the time before (Ray Data's start-up) is not training time."""
        if not self.timing:
            self.window_start = self.attempt_start = time.perf_counter()
            self.timing = True

    def add(self, loss: torch.Tensor, words: int) -> None:
        self.window[0] += loss.double() * words
        self.window[1] += words
        self.last_loss = loss

    def due(self, step: int) -> bool:
        return (
            step % self.config.log_every == 0
            or step % self.job.checkpoint_every == 0
            or step % self.schedule.steps_per_epoch == 0
            or step >= self.stop
        )

    def report(self, step: int, lr: float, lstm_state: State | None) -> None:
        """All-reduce the window, evaluate at epoch ends and the last step, checkpoint, report.

        Valid perplexity at epoch ends and at the run's last step; at the schedule's end also
        test perplexity, and both go into the checkpoint as its `evaluation`. A checkpoint
        taken inside a batch also holds every rank's `lstm_state` (gathered to rank 0).
        """
        peak = torch.tensor([peak_rss_mb()], dtype=torch.float64, device=self.window.device)
        if self.world > 1:
            dist.all_reduce(self.window)  # global loss and words, the same figures on every rank
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)  # the largest worker's private memory so far
        now = time.perf_counter()
        loss_sum, words = self.window.tolist()
        self.words += int(words)
        metrics: dict[str, Any] = {
            "step": step,
            "epoch": step / self.schedule.steps_per_epoch,
            "loss": loss_sum / words,
            "lr": lr,
            "words_per_s": words / (now - self.window_start),
            "start_step": self.start.step,
            "total_steps": self.schedule.total_steps,
            "stop_step": self.stop,
            "world_size": self.world,
            "attempt_words": self.words,
            "attempt_seconds": now - self.attempt_start - self.eval_seconds,
            "final_train_loss": float(self.last_loss),
            "peak_worker_mb": float(peak),
        }
        evaluation: dict[str, float] = {}
        if step % self.schedule.steps_per_epoch == 0 or step >= self.stop:
            eval_start = time.perf_counter()
            splits = ("valid", "test") if step >= self.schedule.total_steps else ("valid",)
            for split in splits:
                result = self.evaluate(split)
                if result is not None:
                    evaluation[f"{split}_ppl"], evaluation[f"{split}_tokens"] = result.ppl, float(result.tokens)
            metrics["valid_ppl"] = evaluation.get("valid_ppl", math.nan)
            if "test_ppl" in evaluation:
                metrics["test_ppl"] = evaluation["test_ppl"]
            self.eval_seconds += time.perf_counter() - eval_start
        folder = None
        checkpointing = step % self.job.checkpoint_every == 0 or step >= self.stop
        states = gather_states(lstm_state, self.world) if checkpointing and self.schedule.position(step)[2] else None
        if checkpointing and self.rank == 0:
            folder = tempfile.mkdtemp(prefix="lightrnn-ckpt-")
            configs = {**self.checkpoint_configs, "evaluation": evaluation} if evaluation else self.checkpoint_configs
            save_checkpoint(folder, self.start.model, self.start.optimizer, step, self.schedule, configs, states)
        if self.tracker is not None:
            self.tracker.log(metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)  # the SYNC upload has copied it
        self.window.zero_()
        self.window_start = time.perf_counter()


def gather_states(lstm_state: State | None, world: int) -> State | None:
    """Every rank's (h, c), stacked on a leading rank axis, on every rank (a collective when world > 1).

    Inside a batch every rank carries a state (the same steps on every rank), so either all
    ranks pass one or none does.
    """
    if lstm_state is None:
        return None
    if world == 1:
        return lstm_state[0].unsqueeze(0), lstm_state[1].unsqueeze(0)
    gathered = []
    for part in lstm_state:
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        gathered.append(torch.stack(parts))
    return gathered[0], gathered[1]


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


# -- the loop ----------------------------------------------------------------------------


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's device: its GPU (float32 matmuls and the cuDNN LSTM may use TF32), else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ray.train.torch.get_device()


def training_autocast(use_gpu: bool) -> AbstractContextManager:
    """bf16 autocast on GPUs for all but the LSTM, whose dtype `lightrnn.model` sets; none on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_gpu else nullcontext()


def ddp_options(model_config: ModelConfig) -> dict[str, Any]:
    """DistributedDataParallel's options for this model.

    `broadcast_buffers=False`: by default DDP re-sends every buffer from rank 0 before each
    forward; the word-table lookups (`row_of`, `col_of`, `occupied_RC`, 90 MB at V = 10M) are
    built identically on every rank from the same allocation file, so that would only add
    their size to every step's traffic. The adaptive softmax leaves tail clusters without
    gradient in some batches, which DDP must be told (`find_unused_parameters`).
    """
    return {"broadcast_buffers": False, "find_unused_parameters": model_config.kind == "adaptive"}


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point; `loop_config` holds the asdict'ed model, train and dist configs."""
    reset_peak()
    job = from_dict(DistConfig, loop_config["dist"])
    _quiet_report_lines()
    train_config = from_dict(TrainConfig, loop_config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(job.use_gpu)
    dataset = open_dataset(job.data)
    model_config = from_dict(ModelConfig, loop_config["model"])
    if model_config.vocab_size == 0:
        model_config = replace(model_config, vocab_size=int(dataset.manifest["vocab"]["size"]))
    schedule = make_schedule(loop_config["train_blocks"], dataset.block_len, world, train_config)
    start = start_state(model_config, train_config, job, device, rank, ray.train.get_checkpoint())
    stop = job.stop_step or schedule.total_steps
    ddp_model = ray.train.torch.prepare_model(start.model, parallel_strategy_kwargs=ddp_options(model_config))
    autocast = training_autocast(job.use_gpu)
    reporter = Reporter(
        job,
        train_config,
        schedule,
        start,
        stop,
        (rank, world),
        device,
        evaluator(start.model, dataset, train_config, (rank, world)),
        {"train_config": loop_config["train"], "dist_config": loop_config["dist"]},
    )
    start.model.train()
    step, state = start.step, start.lstm_state
    shards = [ray.train.get_dataset_shard(name) for name in loop_config["datasets"]]
    steps = segment_stream(
        shards, schedule, dataset.block_len, model_config.vocab_size, train_config.bptt, (step, stop), device, rank
    )
    for x_BT, y_BT, segment in steps:
        reporter.start_timing()
        if segment == 0:
            state = None  # a new batch of blocks
        torch.manual_seed(step_seed(train_config.seed, rank, step))
        lr = lr_at(step, schedule.total_steps, train_config)
        loss, state = train_step(ddp_model, start.optimizer, x_BT, y_BT, state, lr, train_config.clip, autocast)
        step += 1
        reporter.add(loss, x_BT.numel())
        if reporter.due(step):
            reporter.report(step, lr, state)
