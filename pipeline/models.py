"""Trained models at any URI: a local export folder, an object store (fsspec) or MLflow.

    model, vocab = load_model_uri("runs/ptb/export")
    model, vocab = load_model_uri("s3://bucket/models/ptb")
    model, vocab = load_model_uri("runs:/RUN_ID/model")        # or models:/NAME/VERSION

Remote exports are downloaded to a temporary folder and read by `lightrnn.export.load_model`,
which verifies every checksum. An MLflow pyfunc model logged by `pipeline.mlflow_model`
holds a plain export, which is found inside it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightrnn.export import ExportError, load_model, save_model
from lightrnn.model import LanguageModel
from lightrnn.vocab import Vocabulary
from pipeline import storage

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def _find_export(root: Path, uri: str) -> Path:
    """The folder holding manifest.json: `root` itself, or the export inside an MLflow pyfunc model."""
    if (root / "manifest.json").exists():
        return root
    found = sorted(p.parent for p in root.rglob("manifest.json"))
    if len(found) != 1:
        raise ExportError(f"{uri} holds {len(found)} model exports (looked for manifest.json); expected exactly one")
    return found[0]


@contextmanager
def fetch_export(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder holding the export at `uri`, downloaded to a temporary folder if remote.

    Local paths and file:// are used in place; runs:/ and models:/ go through
    mlflow.artifacts.download_artifacts; anything else through fsspec.
    """
    text = os.fspath(uri)
    if "://" not in text and not text.startswith(MLFLOW_SCHEMES):
        yield Path(text)
        return
    if text.startswith("file://"):
        yield Path(text[len("file://") :])
        return
    with tempfile.TemporaryDirectory(prefix="lightrnn-model-") as tmp:
        if text.startswith(MLFLOW_SCHEMES):
            import mlflow.artifacts  # only needed for MLflow URIs

            yield _find_export(Path(mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=tmp)), text)
            return
        fs, root = storage.filesystem(text)
        root = root.rstrip("/")
        paths = fs.find(root)
        if not paths:
            raise FileNotFoundError(f"nothing found at {text}")
        for remote in paths:
            target = Path(tmp) / os.path.relpath(remote, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
        yield Path(tmp)


def load_model_uri(uri: str | os.PathLike[str], map_location: str = "cpu") -> tuple[LanguageModel, Vocabulary]:
    """`lightrnn.export.load_model` for a local folder, an fsspec URI (s3://...) or an MLflow URI."""
    with fetch_export(uri) as local:
        return load_model(local, map_location)


def quantize_export(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Write an int8 copy of the export at `source` (any URI `load_model_uri` takes) to the folder `target`."""
    model, vocab = load_model_uri(source)
    return save_model(target, model, vocab, quantize="int8")
