"""The distributed stages on Ray Data, Ray Train and Ray tasks, tracked in MLflow.

Storage and layout: `storage` (fsspec URIs, atomic writes, manifests), `layout` (a run root).
Stages: `prepare` (corpus -> dataset), `train`/`train_loop` (Ray Train driver and worker),
`checkpoint` (the checkpoint format and schedule), `tasks` (cost pass, reallocation,
evaluation), `stages` and `orchestrate` (the whole pipeline), `tracking` (MLflow).
Models at any URI: `models`; as an MLflow pyfunc: `mlflow_model`.

Depends on `lightrnn`, never the other way round.
"""
