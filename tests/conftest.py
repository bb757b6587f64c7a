"""Shared fixtures: paths to the Penn Treebank copy shipped in the repository; clean MLflow state per
test; a real S3-compatible server (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import socket
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


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on a free local port; its endpoint URL. Test credentials are put in the
    environment for its lifetime (before any ray.init, so Ray workers and subprocesses inherit them)."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*S3_CREDENTIALS, "AWS_PROFILE"]}
    os.environ.update(S3_CREDENTIALS)
    os.environ.pop("AWS_PROFILE", None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
