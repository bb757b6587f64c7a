"""MLflow for the pipeline: where runs go, one parent run per pipeline, a nested run per stage, plots.

A pipeline root remembers its parent run's id (in `pipeline.json`), and each stage's
nested run carries the tag `lightrnn.stage`, so a re-run after a crash logs into the
same runs instead of starting new ones.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from lightrnn.allocation import Allocation
from pipeline import storage

STAGE_TAG = "lightrnn.stage"
# MLflow 3's UI can open an experiment in its GenAI view (traces, judges); this tag says it holds
# model training runs (the UI's constant for the training view); see also `experiment_page`
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def default_tracking_uri(root: str) -> str:
    """A sqlite store next to a local run root (ROOT/../mlflow.db), else in the working directory."""
    base = Path(root).resolve().parent if storage.is_local(root) else Path.cwd()
    return f"sqlite:///{base / 'mlflow.db'}"


def artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a new experiment in a sqlite store: `mlartifacts/` beside the database file."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a server decides (its --artifacts-destination or --default-artifact-root)


def experiment_page(base_url: str, experiment_id: str) -> str:
    """The experiment's runs in the UI's training view.

    MLflow 3.17's UI picks its view from the `workflowType` URL parameter (else the last one
    the user chose, GenAI by default), not from the experiment's tag; the link sets it.
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def ui_command(tracking_uri: str, experiment_id: str) -> str:
    """How to look at an experiment's runs: the server's page, or `mlflow ui` on a local store."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {experiment_page(tracking_uri, experiment_id)}"
    page = experiment_page("http://127.0.0.1:5000", experiment_id)
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000   # then open {page}"


def experiment_id(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created if needed; marked as holding training runs either way."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=artifact_location(tracking_uri), tags={EXPERIMENT_KIND_TAG: TRAINING_KIND}
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


class Tracker:
    """The pipeline's MLflow runs: the parent and a nested run per stage, resumable by id."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        self.experiment_id = experiment_id(self.client, experiment, tracking_uri)
        self.parent_id = ""

    def start_parent(self, run_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """Resume `run_id` when it exists in this store, else create the parent run; returns its id."""
        if run_id:
            try:
                self.client.get_run(run_id)
            except mlflow.exceptions.MlflowException:
                run_id = ""
        if not run_id:
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            run_id = run.info.run_id
            for key, value in params.items():  # log_batch caps params per call; one by one is plenty here
                self.client.log_param(run_id, key, str(value)[:6000])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent_id = run_id
        return run_id

    def stage_runs(self, pattern: str) -> list[tuple[str, str]]:
        """(stage, run id) of the parent's nested stage runs whose stage matches the SQL LIKE `pattern`."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{STAGE_TAG}` LIKE '{pattern}'",
        )
        return sorted(((r.data.tags[STAGE_TAG], r.info.run_id) for r in found), key=lambda r: (len(r[0]), r[0]))

    def stage_run(self, stage: str) -> str:
        """The nested run of `stage` under the parent: an earlier attempt's, or a new one."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_id}' and tags.`{STAGE_TAG}` = '{stage}'",
            max_results=1,
        )
        if found:
            self.client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
        run = self.client.create_run(
            self.experiment_id, run_name=stage, tags={"mlflow.parentRunId": self.parent_id, STAGE_TAG: stage}
        )
        return run.info.run_id

    @contextmanager
    def stage(self, stage: str) -> Iterator[str]:
        """A nested run for the duration of a stage: FINISHED on success, FAILED on an error."""
        run_id = self.stage_run(stage)
        try:
            yield run_id
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        self.client.set_terminated(run_id, status="FINISHED")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        for key, value in metrics.items():
            if value is not None and np.isfinite(value):
                self.client.log_metric(run_id, key, float(value), step=step)

    def finish(self, status: str = "FINISHED") -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status=status)

    def log_file(self, run_id: str, local_path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    def log_dir(self, run_id: str, local_dir: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)


def plot_learning_curves(tracker: Tracker, path: Path) -> None:
    """Train loss per step for each phase, and valid perplexity at phase ends, from the train stage runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    for stage, run_id in tracker.stage_runs("train-%"):
        history = sorted(tracker.client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
        if history:
            ax_loss.plot([m.step for m in history], [m.value for m in history], label=stage)
        valid = sorted(tracker.client.get_metric_history(run_id, "valid_ppl"), key=lambda m: m.step)
        if valid:
            ax_ppl.plot([m.step for m in valid], [m.value for m in valid], "o-", label=stage)
    ax_loss.set(xlabel="step", ylabel="train loss (nats/word)", title="training loss")
    ax_ppl.set(xlabel="step", ylabel="valid perplexity", title="validation perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_allocation(allocation: Allocation, counts_V: np.ndarray, title: str, path: Path) -> None:
    """The word table as an image: each cell coloured by log10 count of its word (white: empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = np.full((allocation.num_rows, allocation.num_cols), np.nan)
    image[allocation.row_of, allocation.col_of] = np.log10(np.asarray(counts_V, dtype=np.float64) + 1)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    shown = ax.imshow(image, cmap="viridis", interpolation="nearest", aspect="auto")
    fig.colorbar(shown, ax=ax, label="log10(word count + 1)")
    ax.set(xlabel="column", ylabel="row", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="lightrnn-mlflow-")
