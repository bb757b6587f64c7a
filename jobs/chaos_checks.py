"""What `jobs.chaos` checks after a drill: the finished run against the reference, and its MLflow runs."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline import storage


def mlflow_check(tracking_uri: str, root: str, stages: list[str]) -> list[str]:
    """Problems with the MLflow runs of the run at `root`: one parent, one FINISHED nested run per stage."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parents = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], filter_string=f"tags.`lightrnn.root` = '{root}'")
    ]
    if len(parents) != 1:
        return [f"{len(parents)} parent runs for {root}"]
    parent = parents[0]
    problems = [] if parent.info.status == "FINISHED" else [f"parent run is {parent.info.status}"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage: dict[str, list[str]] = {}
    for child in children:
        by_stage.setdefault(child.info.run_name, []).append(child.info.status)
    for stage in stages:
        statuses = by_stage.pop(stage, [])
        if statuses != ["FINISHED"]:
            problems.append(f"stage {stage}: runs {statuses or 'none'}")
    problems += [f"unexpected nested runs {name}: {statuses}" for name, statuses in by_stage.items()]
    return problems


@contextlib.contextmanager
def local_copy(uri: str, options: dict[str, Any]) -> Iterator[Path]:
    """`uri` (a file or a folder) as a local path: itself when local, else a temporary download."""
    if "://" not in uri or uri.startswith("file://"):
        yield Path(uri.removeprefix("file://"))
        return
    fs, path = storage.filesystem(uri, options)
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        target = Path(tmp, PurePosixPath(path).name)
        fs.get(path, str(target), recursive=fs.isdir(path))
        yield target


def compare(
    reference: dict[str, Any],
    drill: dict[str, Any],
    rounds: int,
    ppl_tolerance: float,
    weights_tolerance: float,
    options: dict[str, Any] | None = None,
) -> list[dict]:
    """Rows of (what, reference, drill, verdict) for the final allocation, the weights and the test ppl;
    `options` open an s3:// root (its endpoint)."""
    from lightrnn.allocation import Allocation
    from lightrnn.export import load_model

    options = options or {}
    rows = []
    allocations = []
    for run in (reference, drill):
        with local_copy(f"{run['root']}/allocation/phase-{rounds}.parquet", options) as path:
            allocations.append(Allocation.load(path))
    ref_alloc, got_alloc = allocations
    moved = int(np.sum(ref_alloc.cell_of != got_alloc.cell_of))
    rows.append(("allocation", f"phase-{rounds}", f"{moved} words elsewhere", moved == 0))
    with local_copy(reference["export"], options) as ref_dir, local_copy(drill["export"], options) as got_dir:
        ref_model, _ = load_model(ref_dir)
        got_model, _ = load_model(got_dir)
    ref_state, got_state = ref_model.state_dict(), got_model.state_dict()
    diff = max(float((ref_state[k].float() - got_state[k].float()).abs().max()) for k in ref_state)
    rows.append(("export weights", "", f"max |diff| {diff:.3g}", diff <= weights_tolerance))
    ref_ppl, got_ppl = reference["test_ppl"], drill["test_ppl"]
    rel = abs(got_ppl - ref_ppl) / ref_ppl
    ok = rel <= ppl_tolerance
    rows.append(("test ppl", f"{ref_ppl:.4f}", f"{got_ppl:.4f} ({rel:.2%})", ok))
    return [{"what": w, "reference": r, "drill": d, "ok": ok} for w, r, d, ok in rows]
