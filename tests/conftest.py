"""Shared fixtures: paths to the Penn Treebank copy shipped in the repository; clean MLflow state per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# One BLAS/OpenMP thread per process, for this process and the jobs and Ray workers it starts:
# on a 2-core machine two torch processes with 2 threads each spin against each other (10x+ slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
PTB = REPO / "data" / "ptb"


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    return PTB


@pytest.fixture(autouse=True)
def fresh_mlflow_state() -> Iterator[None]:
    """No test inherits another's active run, experiment or tracking URI (as MLflow's own suite does)."""
    yield
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.tracking.fluent._active_experiment_id = None  # set by mlflow.set_experiment
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.set_tracking_uri(None)
