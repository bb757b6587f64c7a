"""The whole pipeline: prepare, train in phases with reallocation, evaluate, export; tracked in MLflow.

python -m jobs.pipeline --config ptb                      # local Ray, runs/ptb, runs/mlflow.db
python -m jobs.pipeline --config ptb --set model.kind=full --root runs/ptb-full
python -m jobs.pipeline --config clueweb --root s3://bucket/runs/cw1 --workers 16 --gpu \\
    --tracking-uri http://mlflow.internal:5000 --set data.train=s3://bucket/clueweb/train/

Re-running the same command finishes an interrupted run: committed stages are skipped,
an interrupted training phase continues from its latest checkpoint. Starts a local Ray
with workers + 2 CPUs unless RAY_ADDRESS is set (as under `ray job submit`).

Each stage as a job of its own, as a scheduler runs them (infra/argo/lightrnn-stages.yaml):

python -m jobs.pipeline --config tiny --list-stages       # ["data", "train-0", ..., "export"]
python -m jobs.pipeline --config tiny --until data        # then --until train-0, and so on
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jobs.configs import PRESETS, get_preset
from pipeline.orchestrate import PipelineOptions, check_stage, run_pipeline, stage_names
from pipeline.sources import CorpusError
from pipeline.storage import StorageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help=f"named configuration: {', '.join(PRESETS)}")
    p.add_argument("--root", help="run root, local path or s3:// (default: runs/CONFIG)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    # MLflow's own variables, as every MLflow client reads them; a flag given on the command line wins
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", ""),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///ROOT/../mlflow.db)",
    )
    p.add_argument(
        "--experiment",
        default=os.environ.get("MLFLOW_EXPERIMENT_NAME") or PipelineOptions.experiment,
        help=f"MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else {PipelineOptions.experiment})",
    )
    p.add_argument("--workers", type=int, default=PipelineOptions.workers, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="one GPU per training worker: NCCL and bf16 autocast")
    p.add_argument("--checkpoint-every", type=int, default=PipelineOptions.checkpoint_every, help="steps")
    p.add_argument("--max-failures", type=int, default=PipelineOptions.max_failures, help="worker-group restarts")
    p.add_argument("--cost-tasks", type=int, default=0, help="Ray Train workers of each cost pass (default: --workers)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (sets AWS_ENDPOINT_URL for every stage)")
    p.add_argument("--until", default="", metavar="STAGE", help="stop after this stage (see --list-stages)")
    p.add_argument("--list-stages", action="store_true", help="print the stages as a JSON list and exit")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = get_preset(args.config).with_overrides(args.set)
        options = PipelineOptions(
            root=args.root or os.path.join("runs", config.name),
            workers=args.workers,
            use_gpu=args.gpu,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            checkpoint_every=args.checkpoint_every,
            max_failures=args.max_failures,
            cost_tasks=args.cost_tasks,
        )
        if args.until:
            check_stage(config, args.until)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.list_stages:
        print(json.dumps(stage_names(config)))  # the only line on stdout: a scheduler reads it as a list
        return 0
    job_env = {}
    if args.s3_endpoint:
        # the driver's own reads, and every Ray task's and worker's, on a local or a running cluster
        os.environ["AWS_ENDPOINT_URL"] = job_env["AWS_ENDPOINT_URL"] = args.s3_endpoint

    import ray

    from pipeline.cluster import connect_ray

    connect_ray(args.workers + 2, job_env)  # Train holds one CPU per worker; Ray Data needs the rest
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = run_pipeline(config, options, until=args.until)
    except (StorageError, CorpusError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "test_ppl" in summary:
        floors = (
            f" (a unigram model of the training counts: {summary['test_unigram_ppl']:.2f}; a uniform guess: "
            f"{summary['uniform_ppl']:,.0f})"
            if summary.get("test_unigram_ppl")
            else ""
        )
        print(
            f"[done] {summary['model']} on {summary['config']}: test ppl {summary['test_ppl']:.2f}{floors}, "
            f"valid ppl {summary['valid_ppl']:.2f}\n"
            f"       model: {summary['export']} (int8: {summary['export_int8']}; MLflow: {summary['mlflow_model']})",
            flush=True,
        )
    else:
        print(f"[done] {summary['config']} up to {args.until}: {', '.join(summary['stages_done'])}", flush=True)
    print(f"       MLflow run {summary['mlflow_run_id']}: {summary['mlflow_ui']}", flush=True)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
