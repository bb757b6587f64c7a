"""Where a pipeline run lives: the run root's folders, its config of record and the stage commits.

Everything lands under one run root (a local path or s3://):

    ROOT/pipeline.json                  the config of record and the MLflow parent run id
    ROOT/data/                          the prepared dataset (pipeline.prepare; manifest.json commits it)
    ROOT/allocation/phase-K.parquet     the word table phase K trains with
    ROOT/train/phase-K/checkpoint_*     Ray Train checkpoints of phase K (pipeline.checkpoint; resumable)
    ROOT/costs-K/                       per-word head-input sums after phase K
    ROOT/export/, ROOT/export-int8/     the final model (lightrnn.export)
    ROOT/stages/NAME.json               written last by each stage: its commit

A stage whose commit file exists is done; a re-run skips it.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline import storage

PIPELINE_FILE = "pipeline.json"
STAGES_DIR = "stages"


class PipelineError(storage.StorageError):
    """The run root cannot be used as asked (another config's run, a damaged stage)."""


class RunRoot:
    """The folders and commit files of one pipeline run."""

    def __init__(self, root: str) -> None:
        root = root.rstrip("/")
        self.uri = os.path.abspath(root) if "://" not in root else root

    def path(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    @property
    def data(self) -> str:
        return self.path("data")

    def allocation(self, phase: int) -> str:
        return self.path("allocation", f"phase-{phase}.parquet")

    def train_runs(self) -> str:
        """The Ray Train storage path; phase K's run is named `phase-K` under it."""
        return self.path("train")

    def costs(self, phase: int) -> str:
        return self.path(f"costs-{phase}")

    def export(self, quantize: str | None = None) -> str:
        return self.path("export" if quantize is None else f"export-{quantize}")

    # -- stage commits -------------------------------------------------------------------

    def committed(self, stage: str) -> dict[str, Any] | None:
        """The commit record of `stage`, or None if it has not finished."""
        uri = self.path(STAGES_DIR, f"{stage}.json")
        if not storage.exists(uri):
            return None
        try:
            with storage.open(uri, "rb") as f:
                return json.loads(f.read())
        except json.JSONDecodeError as e:
            raise PipelineError(f"{uri} is damaged ({e}); delete it to run the stage {stage!r} again") from e

    def commit(self, stage: str, record: dict[str, Any]) -> None:
        storage.write_bytes(self.path(STAGES_DIR, f"{stage}.json"), json.dumps(record, indent=2).encode())

    # -- the config of record ------------------------------------------------------------

    def check(self, recorded: dict[str, Any]) -> dict[str, Any]:
        """The root's pipeline.json; refuses a root that holds a run of other settings.

        A key the root never recorded (a run from before it existed) or one this version no
        longer has is not a difference.
        """
        recorded = _jsonable(recorded)
        uri = self.path(PIPELINE_FILE)
        if not storage.exists(uri):
            return {"config": recorded, "mlflow": {}}
        with storage.open(uri, "rb") as f:
            existing = json.loads(f.read())
        old = existing.get("config", {})
        differ = sorted(k for k in old if k in recorded and old[k] != recorded[k])
        if differ:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {recorded.get(k)!r}" for k in differ[:6])
            raise PipelineError(
                f"{self.uri} holds a pipeline run with other settings ({changes}); "
                "choose another --root, or delete it to start over"
            )
        return existing

    def write_state(self, state: dict[str, Any]) -> None:
        storage.write_bytes(self.path(PIPELINE_FILE), json.dumps(state, indent=2).encode())


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))
