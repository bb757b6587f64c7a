"""The whole pipeline: corpus -> phases of training with reallocations -> evaluation -> export.

    data -> train-0 -> costs-0 -> realloc-0 -> train-1 -> ... -> train-R -> evaluate -> export

`Pipeline.run` runs the stages of `pipeline.stages` in that order, each inside a nested
MLflow run under one parent, and commits each under the run root (`pipeline.layout`). A
committed stage is skipped on a re-run and hands on its recorded output; an interrupted
one runs again (a training phase continues from its latest checkpoint). Run with `until`,
it stops after that stage: a scheduler runs each stage as a job of its own, in order, by
running the same pipeline with `until` set to each name of `stage_names` in turn.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any, TypeVar

from lightrnn.config import from_dict
from pipeline import stages
from pipeline.layout import PipelineError, RunRoot
from pipeline.memory import peak_rss_mb, reset_peak
from pipeline.runconfig import MODEL_SECTIONS, RunConfig
from pipeline.stages import (
    CostsOutput,
    DataOutput,
    EvalOutput,
    ExportOutput,
    Metrics,
    PipelineOptions,
    ReallocOutput,
    StageContext,
    TrainOutput,
)
from pipeline.tracking import Tracker, default_tracking_uri, ui_command

__all__ = ["Pipeline", "PipelineError", "PipelineOptions", "check_stage", "run_pipeline", "stage_names"]

Output = TypeVar("Output")

# what each kind of stage adds to the parent run (one point per phase or round), and under which prefix
_PARENT_METRICS = {
    "data": ("", ("vocab_size", "train_tokens")),
    "train": ("phase_", ("valid_ppl", "words_per_s", "train_loss")),
    "realloc": ("realloc_", ("cost_before", "cost_after", "words_moved", "seconds")),
    "evaluate": ("final_", ("test_ppl", "valid_ppl", "test_unigram_ppl")),
    "export": ("", ("export_mb", "export_int8_mb")),
}
_PARENT_NAMES = {"realloc_seconds": "realloc_solve_seconds"}
# a stage's tokens in the stage_costs table: trained or scored, or the corpus's train split
_TOKEN_KEYS = ("tokens", "train_tokens", "test_tokens")


class UntilStageReachedError(Exception):
    """The run reached its `until` stage; the stages after it are left for a later run."""


def stage_names(config: RunConfig) -> list[str]:
    """The stages of `config`, in the order they run."""
    names = ["data"]
    for k in range(config.rounds + 1):
        names.append(f"train-{k}")
        if k < config.rounds:
            names += [f"costs-{k}", f"realloc-{k}"]
    return [*names, "evaluate", "export"]


def check_stage(config: RunConfig, stage: str) -> None:
    """Raise ValueError unless `stage` is one of `config`'s stages."""
    if stage not in stage_names(config):
        raise ValueError(f"{config.name} has no stage {stage!r}; its stages: {', '.join(stage_names(config))}")


# what stages report as the peak private memory of their workers or tasks (pipeline.memory)
_WORKER_PEAKS = ("peak_worker_mb", "peak_worker_rss_mb", "peak_rss_mb", "peak_task_mb")


def _worker_peak(metrics: Metrics) -> float | None:
    peaks = [metrics[k] for k in _WORKER_PEAKS if metrics.get(k) is not None]
    return max(peaks) if peaks else None


class Pipeline:
    def __init__(self, config: RunConfig, options: PipelineOptions) -> None:
        self.root = RunRoot(options.root)
        self.options = options
        self.tracking_uri = options.tracking_uri or default_tracking_uri(self.root.uri)
        self.config = config
        self.metrics: dict[str, Metrics] = {}  # per stage, this run's or the commit's
        self.tracker: Tracker | None = None
        self.until = ""

    def run(self, until: str = "") -> dict[str, Any]:
        """Run (or finish) every stage, or the stages up to and including `until`; returns the summary."""
        if until:
            check_stage(self.config, until)
        self.until = "" if until == stage_names(self.config)[-1] else until  # up to the last stage: the whole run
        # the schedule (steps per epoch, phase bounds) depends on the worker count too
        state = self.root.check({**self.config.flat(MODEL_SECTIONS), "workers": self.options.workers})
        tracker = self.tracker = Tracker(self.tracking_uri, self.options.experiment)
        recorded_run = (
            state["mlflow"].get("run_id", "") if state["mlflow"].get("tracking_uri") == self.tracking_uri else ""
        )
        parent = tracker.start_parent(
            recorded_run,
            run_name=f"{self.config.name}-{posixpath.basename(self.root.uri)}",
            params={**self.config.flat(), "root": self.root.uri, "workers": self.options.workers},
            tags={"lightrnn.root": self.root.uri, "lightrnn.config": self.config.name},
        )
        state["mlflow"] = {"tracking_uri": self.tracking_uri, "experiment_id": tracker.experiment_id, "run_id": parent}
        self.root.write_state(state)
        print(
            f"[pipeline] {self.config.name} -> {self.root.uri}; MLflow run {parent} at {self.tracking_uri}", flush=True
        )
        try:
            exported = self._stages()
        except UntilStageReachedError:
            # the parent run ends with this job; the next job's run resumes it (Tracker.start_parent)
            tracker.finish()
            return self.progress()
        except BaseException:
            tracker.finish("FAILED")
            raise
        self._log_stage_costs()
        tracker.finish()
        return self.summary(exported)

    def _log_stage_costs(self) -> None:
        """The parent run's `stage_costs` table: each stage's seconds, peak memory, tokens and words."""
        assert self.tracker is not None
        rows = []
        for name in stage_names(self.config):
            record = self.root.committed(name) or {}
            metrics = record.get("metrics", {})
            rows.append(
                {
                    "stage": name,
                    "seconds": record.get("seconds"),
                    "peak_driver_mb": record.get("peak_driver_mb"),
                    "peak_worker_mb": record.get("peak_worker_mb"),
                    "tokens": next((metrics[k] for k in _TOKEN_KEYS if k in metrics), None),
                    "words": metrics.get("vocab_size", metrics.get("words_seen", metrics.get("words_moved"))),
                }
            )
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        self.tracker.client.log_table(self.tracker.parent_id, columns, "stage_costs.json")

    def _stages(self) -> ExportOutput:
        """Every stage in order; each gets the typed outputs of the stages it depends on."""
        self._stage("data", DataOutput, stages.prepare_data)
        allocation = self.root.allocation(0) if self.config.model.kind == "lightrnn" else ""
        trained: TrainOutput | None = None
        for k in range(self.config.rounds + 1):
            run = partial(stages.train_phase, phase=k, previous=trained, allocation=allocation)
            trained = self._stage(f"train-{k}", TrainOutput, run)
            if k < self.config.rounds:
                costs = self._stage(
                    f"costs-{k}", CostsOutput, partial(stages.accumulate_costs, phase=k, trained=trained)
                )
                run = partial(stages.reallocate, phase=k, trained=trained, costs=costs)
                allocation = self._stage(f"realloc-{k}", ReallocOutput, run).allocation
        assert trained is not None
        self._stage("evaluate", EvalOutput, partial(stages.evaluate, trained=trained))
        return self._stage("export", ExportOutput, partial(stages.export, trained=trained))

    def _stage(self, name: str, output: type[Output], run: Callable[[StageContext], tuple[Output, Metrics]]) -> Output:
        """Skip `name` if committed (returning its recorded output), else run it in its MLflow run and commit it."""
        record = self.root.committed(name)
        if record is not None:
            print(f"[skip] {name}: committed {record['finished']}", flush=True)
            self.metrics[name] = record["metrics"]
            result = from_dict(output, record["outputs"])
        else:
            result = self._run_stage(name, run)
        if name == self.until:
            raise UntilStageReachedError(name)
        return result

    def _run_stage(self, name: str, run: Callable[[StageContext], tuple[Output, Metrics]]) -> Output:
        """Run `name` in its MLflow run and commit it."""
        assert self.tracker is not None
        print(f"[stage] {name}", flush=True)
        started = time.perf_counter()
        reset_peak()
        with self.tracker.stage(name) as run_id:
            result, metrics = run(StageContext(self.root, self.config, self.options, self.tracker, run_id))
            # the driver's own peak, and the largest any of the stage's workers or tasks reported
            costs = {"peak_driver_mb": peak_rss_mb(), "peak_worker_mb": _worker_peak(metrics)}
            # a training phase's figures belong at its last step, beside rank 0's per-step ones
            step = int(metrics.get("steps", 0))
            figures = {**metrics, **costs, "stage_seconds": time.perf_counter() - started}
            self.tracker.log_metrics(run_id, figures, step)
        self.root.commit(
            name,
            {
                "stage": name,
                "outputs": asdict(result),
                "metrics": metrics,
                **costs,
                "seconds": round(time.perf_counter() - started, 3),
                "mlflow_run_id": run_id,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        self.metrics[name] = metrics
        self._log_parent(name, metrics)
        return result

    def _log_parent(self, stage: str, metrics: Metrics) -> None:
        assert self.tracker is not None
        kind, _, index = stage.partition("-")
        prefix, keep = _PARENT_METRICS.get(kind, ("", ()))
        chosen = {_PARENT_NAMES.get(prefix + k, prefix + k): metrics[k] for k in keep if k in metrics}
        self.tracker.log_metrics(self.tracker.parent_id, chosen, step=int(index) if index else 0)

    def progress(self) -> dict[str, Any]:
        """Where the run stands: its root, the stages committed so far, and its MLflow run."""
        return {
            "config": self.config.name,
            "model": self.config.model.kind,
            "root": self.root.uri,
            "stages_done": [s for s in stage_names(self.config) if s in self.metrics],
            "tracking_uri": self.tracking_uri,
            "mlflow_run_id": self.tracker.parent_id if self.tracker else None,
            "mlflow_ui": ui_command(self.tracking_uri, self.tracker.experiment_id) if self.tracker else "",
        }

    def summary(self, exported: ExportOutput) -> dict[str, Any]:
        """The finished run's results, besides its `progress`."""
        rounds = self.config.rounds
        evaluation = self.metrics["evaluate"]
        phases = [self.metrics[f"train-{k}"] for k in range(rounds + 1)]
        return {
            **self.progress(),
            "test_ppl": evaluation.get("test_ppl"),
            "valid_ppl": evaluation.get("valid_ppl"),
            "test_unigram_ppl": evaluation.get("test_unigram_ppl"),
            "uniform_ppl": evaluation.get("uniform_ppl"),
            "valid_ppl_per_phase": [p.get("valid_ppl") for p in phases],
            "words_moved": [self.metrics[f"realloc-{k}"].get("words_moved") for k in range(rounds)],
            "words_per_s": [p.get("words_per_s") for p in phases],
            "export": exported.model,
            "export_int8": exported.model_int8,
            "mlflow_model": exported.mlflow_model,
        }


def run_pipeline(config: RunConfig, options: PipelineOptions, until: str = "") -> dict[str, Any]:
    """Run (or finish) the pipeline for `config` under `options.root`, all of it or up to and
    including stage `until`; Ray must be initialised."""
    return Pipeline(config, options).run(until)
