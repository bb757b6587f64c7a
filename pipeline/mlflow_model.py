"""An export as an MLflow pyfunc model that scores sentences.

    uri = log_pyfunc_model("runs/ptb-demo")            # inside an active MLflow run
    scorer = mlflow.pyfunc.load_model(uri)             # or "models:/NAME/VERSION" once registered
    scorer.predict(pd.DataFrame({"text": ["the company said", "shares rose"]}))
    #    log_prob  tokens    ppl      one row per sentence, each scored on its own

The export folder (see `lightrnn.export`) is the model's one artifact, so the logged
model is also a plain export: `pipeline.models.load_model_uri(uri)` opens it. The
`lightrnn` package and this module travel with the model as code, so loading needs
only mlflow, torch, numpy, pyarrow and pandas.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, Schema

from lightrnn.export import load_model, verify_export
from lightrnn.infer import sentence_log_probs

EXPORT_ARTIFACT = "export"
# the model code: the lightrnn package and this one (the pickled scorer is pipeline.mlflow_model.SentenceScorer;
# loading imports only this module of it)
CODE_PATHS = [str(Path(__file__).resolve().parents[1] / name) for name in ("lightrnn", "pipeline")]
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "text")]),
    outputs=Schema([ColSpec("double", "log_prob"), ColSpec("long", "tokens"), ColSpec("double", "ppl")]),
)


class SentenceScorer(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with a `text` column) -> log_prob (natural log), tokens (words + `<eos>`), ppl."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model, self.vocab = load_model(context.artifacts[EXPORT_ARTIFACT])

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or "text" not in model_input.columns:
            raise ValueError("input must be a DataFrame with a 'text' column of sentences")
        texts = ["" if t is None else str(t) for t in model_input["text"].tolist()]
        log_probs, tokens = sentence_log_probs(self.model, self.vocab, texts)
        return pd.DataFrame({"log_prob": log_probs, "tokens": tokens, "ppl": np.exp(-log_probs / tokens)})


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "numpy", "pyarrow", "pandas")]


def log_pyfunc_model(export_dir: str | os.PathLike[str], name: str = "model") -> str:
    """Log the export at `export_dir` as a pyfunc model in the active MLflow run; returns its model URI."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_pyfunc_model needs an active MLflow run: call it inside mlflow.start_run()")
    verify_export(export_dir)  # never log a corrupt or half-written export
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=SentenceScorer(),
        artifacts={EXPORT_ARTIFACT: str(Path(export_dir).resolve())},
        code_paths=CODE_PATHS,  # for loading where this project is not installed
        signature=SIGNATURE,
        pip_requirements=_requirements(),  # explicit: inferring them loads the model in a subprocess
    )
    return info.model_uri
