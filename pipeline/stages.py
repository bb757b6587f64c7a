"""The pipeline's stages, each one function from typed inputs to a typed output and its metrics.

    data -> train-0 -> costs-0 -> realloc-0 -> train-1 -> ... -> train-R -> evaluate -> export

A stage reads what earlier stages wrote under the run root (`pipeline.layout`), writes its own
output there and returns where it is; `pipeline.orchestrate` runs the stages in order inside
their MLflow runs and commits each one. The learning-rate schedule and the data position run
across phases, as in `lightrnn.phases`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow

from lightrnn.export import save_model
from lightrnn.phases import initial_allocation, phase_bounds
from pipeline import storage, tasks
from pipeline.checkpoint import (
    checkpoint_step,
    has_run,
    latest_checkpoint,
    load_allocation,
    load_state,
    make_schedule,
    model_from_checkpoint,
)
from pipeline.cost_pass import run_cost_pass
from pipeline.dataset import TokenDataset, open_dataset
from pipeline.layout import PipelineError, RunRoot
from pipeline.mlflow_model import log_pyfunc_model
from pipeline.prepare import prepare
from pipeline.runconfig import RunConfig
from pipeline.tracking import Tracker, plot_allocation, plot_learning_curves, temp_dir
from pipeline.train import DistConfig, run_training

Metrics = dict[str, float]


@dataclass(frozen=True)
class PipelineOptions:
    """How and where to run; unlike RunConfig, none of this changes the trained model."""

    root: str
    workers: int = 2
    use_gpu: bool = False
    tracking_uri: str = ""  # "" = sqlite next to a local root (see pipeline.tracking)
    experiment: str = "lightrnn"
    checkpoint_every: int = 200
    max_failures: int = 1
    cost_tasks: int = 0  # Ray Train workers of the cost pass; 0 = the training workers

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cost_tasks < 0:
            raise ValueError(f"workers must be >= 1 and cost_tasks >= 0, got {self.workers}, {self.cost_tasks}")


@dataclass(frozen=True)
class StageContext:
    """What every stage may use: the run's root, settings and MLflow runs."""

    root: RunRoot
    config: RunConfig
    options: PipelineOptions
    tracker: Tracker
    run_id: str  # this stage's nested MLflow run


# -- outputs (what a commit records; field names are the commit file's keys) -----------------


@dataclass(frozen=True)
class DataOutput:
    dataset: str


@dataclass(frozen=True)
class TrainOutput:
    checkpoint: str
    allocation: str  # the table this phase trained with; "" for the baselines


@dataclass(frozen=True)
class CostsOutput:
    head_inputs: str


@dataclass(frozen=True)
class ReallocOutput:
    allocation: str  # the next phase's table


@dataclass(frozen=True)
class EvalOutput:
    checkpoint: str


@dataclass(frozen=True)
class ExportOutput:
    model: str
    model_int8: str
    mlflow_model: str


# -- the stages ------------------------------------------------------------------------


def prepare_data(ctx: StageContext) -> tuple[DataOutput, Metrics]:
    """Vocabulary and Parquet token blocks (`pipeline.prepare`); a vocabulary summary to MLflow."""
    manifest = prepare(ctx.config.data, ctx.root.data)
    vocab = manifest["vocab"]
    metrics = {f"{s}_tokens": float(info["tokens"]) for s, info in manifest["splits"].items()}
    metrics["vocab_size"] = float(vocab["size"])
    if "peak_rss_mb" in manifest:  # the largest task of the run that prepared it
        metrics["peak_worker_mb"] = float(manifest["peak_rss_mb"]["worker"])
    summary = {
        "vocab_size": vocab["size"],
        "tokens": {s: info["tokens"] for s, info in manifest["splits"].items()},
        "top_words": vocab.get("top_words", []),
        "words_seen_once": vocab.get("words_seen_once"),
    }
    client, parent = ctx.tracker.client, ctx.tracker.parent_id
    client.log_dict(ctx.run_id, summary, "vocab_summary.json")
    client.log_dict(parent, summary, "vocab_summary.json")
    client.log_dict(parent, ctx.config.as_dict(), "config.json")
    return DataOutput(ctx.root.data), metrics


def phase_plan(ctx: StageContext, dataset: TokenDataset) -> tuple[list[int], int]:
    """Step bounds of the phases and the schedule's total steps (the worker count sets them)."""
    train_blocks = dataset.manifest["splits"]["train"]["tokens"] // dataset.block_len
    total = make_schedule(train_blocks, dataset.block_len, ctx.options.workers, ctx.config.train).total_steps
    if ctx.config.rounds >= total:
        raise ValueError(f"{ctx.config.rounds} reallocation rounds need more than {total} training steps")
    return phase_bounds(total, ctx.config.rounds, ctx.config.realloc.span), total


def train_phase(
    ctx: StageContext, phase: int, previous: TrainOutput | None, allocation: str
) -> tuple[TrainOutput, Metrics]:
    """Phase `phase` on Ray Train: from `previous`'s checkpoint (None: fresh) with the table at `allocation`."""
    dataset = open_dataset(ctx.root.data)
    counts = dataset.vocab_counts() if allocation else None
    model_config = dataclasses.replace(ctx.config.model, vocab_size=dataset.vocab_size)
    bounds, total = phase_plan(ctx, dataset)
    if allocation and phase == 0 and not storage.exists(allocation):
        with storage.atomic_write(allocation) as f:
            initial_allocation(counts, ctx.config.realloc, ctx.config.train.seed).save(f)
    job = DistConfig(
        data=ctx.root.data,
        output=ctx.root.train_runs(),
        name=f"phase-{phase}",
        workers=ctx.options.workers,
        use_gpu=ctx.options.use_gpu,
        allocation=allocation,
        checkpoint_every=ctx.options.checkpoint_every,
        max_failures=ctx.options.max_failures,
        stop_step=bounds[phase + 1],
        init_checkpoint=previous.checkpoint if previous else "",
        mlflow_tracking_uri=ctx.tracker.tracking_uri,
        mlflow_run_id=ctx.run_id,
    )
    print(f"[train] phase {phase}: steps {bounds[phase]}..{bounds[phase + 1]} of {total}", flush=True)
    run_dir = storage.join(job.output, job.name)
    resume = has_run(run_dir)
    finished = latest_checkpoint(run_dir) if resume else None
    if finished and checkpoint_step(finished) >= job.stop_step:
        print(f"[train] phase {phase} had finished before the interruption: {finished}", flush=True)
        result = {"checkpoint": finished}
    else:
        result = run_training(model_config, ctx.config.train, job, resume=resume)
    if not result["checkpoint"]:
        raise PipelineError(f"phase {phase} left no checkpoint under {run_dir}")
    metrics = {
        k: float(result[k])
        for k in ("valid_ppl", "words_per_s", "steps", "train_seconds", "peak_worker_mb")
        if result.get(k) is not None and math.isfinite(float(result[k]))
    }
    if result.get("window_train_loss") is not None:
        metrics["train_loss"] = float(result["window_train_loss"])
    train = ctx.config.train  # the phase's steps of batch_size blocks x bptt targets
    metrics["tokens"] = float((bounds[phase + 1] - bounds[phase]) * train.batch_size * train.bptt)
    if allocation:
        _log_allocation(ctx, phase, allocation, counts)
    _log_curves(ctx)
    return TrainOutput(result["checkpoint"], allocation), metrics


def accumulate_costs(ctx: StageContext, phase: int, trained: TrainOutput) -> tuple[CostsOutput, Metrics]:
    """Per-word head-input sums of the phase's model over the train blocks, sharded by word range
    across Ray Train workers (`pipeline.cost_pass`), on the phase's devices."""
    out = ctx.root.costs(phase)
    t = ctx.config.train
    workers = ctx.options.cost_tasks or ctx.options.workers
    info = run_cost_pass(
        trained.checkpoint,
        ctx.root.data,
        out,
        workers,
        ctx.options.use_gpu,
        t.batch_size,
        t.bptt,
        ctx.config.realloc.cost_tokens,
    )
    print(
        f"[costs] {info['tokens']:,} targets, {info['words_seen']:,} distinct words, {workers} worker(s), "
        f"{info['sums_mb_per_worker']:,.0f} MB of sums per worker",
        flush=True,
    )
    return CostsOutput(out), {k: float(v) for k, v in info.items() if isinstance(v, int | float)}


def reallocate(
    ctx: StageContext, phase: int, trained: TrainOutput, costs: CostsOutput
) -> tuple[ReallocOutput, Metrics]:
    """The next phase's word table: the matching solved in one Ray task from the cost pass's shards."""
    out = ctx.root.allocation(phase + 1)
    realloc = ctx.config.realloc
    vocab_size = int(open_dataset(ctx.root.data).manifest["vocab"]["size"])
    hidden = ctx.config.model.hidden_dim
    stats = tasks.reallocate(
        trained.checkpoint, costs.head_inputs, realloc, ctx.config.resources, vocab_size, hidden, out
    )
    print(
        f"[realloc] {stats['words_moved']:,} words moved; cost {stats['cost_before']:.6g} -> "
        f"{stats['cost_after']:.6g} in {stats['seconds']:.1f}s ({realloc.method})",
        flush=True,
    )
    numeric = {k: float(v) for k, v in stats.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return ReallocOutput(out), numeric


def evaluate(ctx: StageContext, trained: TrainOutput) -> tuple[EvalOutput, Metrics]:
    """Valid and test perplexity of the final model (every token scored).

    The last training phase scored both splits on its workers at the schedule's end
    (`pipeline.train_eval.evaluate_split`) and stored the figures in its final checkpoint;
    only a checkpoint written without them is scored here, in one Ray task.
    """
    metrics = load_state(trained.checkpoint).get("evaluation")
    if not metrics:
        t = ctx.config.train
        metrics = tasks.evaluate_checkpoint(trained.checkpoint, ctx.root.data, t.eval_batch_size, t.bptt)
    dataset = open_dataset(ctx.root.data)
    if "test" in dataset.splits:  # beside the model's figure: a unigram model's, and a uniform guess's
        metrics = {**metrics, "test_unigram_ppl": dataset.unigram_ppl("test"), "uniform_ppl": float(dataset.vocab_size)}
    print("[evaluate] " + ", ".join(f"{k} {v:,.2f}" for k, v in metrics.items()), flush=True)
    return EvalOutput(trained.checkpoint), metrics


def export(ctx: StageContext, trained: TrainOutput) -> tuple[ExportOutput, Metrics]:
    """fp32 and int8 exports (lightrnn.export) to ROOT/export*, to MLflow, and as a pyfunc model."""
    model = model_from_checkpoint(trained.checkpoint)
    vocab = open_dataset(ctx.root.data).vocab()
    outputs: dict[str, str] = {}
    metrics: Metrics = {}
    tracker = ctx.tracker
    with temp_dir() as tmp:
        for key, quantize in (("model", None), ("model_int8", "int8")):
            local = Path(tmp) / key
            save_model(local, model, vocab, quantize=quantize)
            out = ctx.root.export(quantize)
            files = sorted(p for p in local.iterdir() if p.is_file())
            # manifest.json last: it marks a complete export (lightrnn.export)
            for path in sorted(files, key=lambda p: p.name == "manifest.json"):
                storage.write_bytes(storage.join(out, path.name), path.read_bytes())
            metrics[f"{key.replace('model', 'export')}_mb"] = sum(p.stat().st_size for p in files) / 1e6
            outputs[key] = out
            # the files as they are; `model` is the name of the pyfunc model below
            artifact = "export" if quantize is None else "export-int8"
            tracker.log_dir(ctx.run_id, local, artifact)
            tracker.log_dir(tracker.parent_id, local, artifact)
        with mlflow.start_run(run_id=tracker.parent_id):
            outputs["mlflow_model"] = log_pyfunc_model(Path(tmp) / "model", name="model")
    print(
        f"[export] {outputs['model']} ({metrics['export_mb']:.1f} MB), {outputs['model_int8']} "
        f"({metrics['export_int8_mb']:.1f} MB), MLflow model {outputs['mlflow_model']}",
        flush=True,
    )
    return ExportOutput(**outputs), metrics


# -- plots -------------------------------------------------------------------------------


def _log_allocation(ctx: StageContext, phase: int, allocation_uri: str, counts_V: object) -> None:
    """The phase's word table to its run (Parquet) and as an image to the parent run."""
    allocation = load_allocation(allocation_uri)
    with temp_dir() as tmp:
        table = Path(tmp) / f"allocation_phase-{phase}.parquet"
        allocation.save(table)
        ctx.tracker.log_file(ctx.run_id, table, "allocation")
        image = Path(tmp) / f"allocation_phase-{phase}.png"
        plot_allocation(allocation, counts_V, f"word table, phase {phase}", image)
        ctx.tracker.log_file(ctx.tracker.parent_id, image, "plots")


def _log_curves(ctx: StageContext) -> None:
    """Redraw the learning curves of every phase so far on the parent run."""
    with temp_dir() as tmp:
        image = Path(tmp) / "learning_curves.png"
        plot_learning_curves(ctx.tracker, image)
        ctx.tracker.log_file(ctx.tracker.parent_id, image, "plots")
