"""One comparison, one table: full softmax, adaptive softmax and LightRNN variants on the same data and LSTM.

python -m jobs.compare --config ptb --epochs 2 --json
python -m jobs.compare --config ptb --budget-minutes 2

Variants (same LSTM size, data, seed and schedule; the output layer / word table differs, and
each model kind trains with its own tuned dropout and learning rate, `jobs.configs.TUNED`):

    full                  full softmax over V words
    adaptive              adaptive softmax (model.adaptive_cutoffs)
    lightrnn-random       LightRNN, fixed random word table
    lightrnn-frequency    LightRNN, fixed frequency-ordered table
    lightrnn-realloc      LightRNN, random table reallocated realloc.rounds times (2 if the config has 0)

--epochs gives every variant the same number of epochs: the controlled comparison, the same
batches in the same order for every variant. --budget-minutes gives every variant the same
training time instead (`jobs.time_budget`): each trains until M minutes of its clock are
spent (--clock cpu, the default: its own CPU time, so that other jobs on the machine cost it
steps, not seconds), its learning-rate schedule following the elapsed share of the budget;
lightrnn-realloc's cost passes and solves are paid out of the same budget. The table shows
every variant's steps, training seconds and reallocation seconds.

Each variant trains in its own process (`jobs.train_local`; --parallel N at a time, one
CPU thread each) and becomes a nested MLflow run under one parent, so the MLflow UI's
compare view sets them side by side; the table is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from jobs.configs import PRESETS, RunConfig, get_preset, tuned_overrides
from jobs.time_budget import CLOCKS
from pipeline.tracking import ui_command

VARIANTS = ("full", "adaptive", "lightrnn-random", "lightrnn-frequency", "lightrnn-realloc")


def variant_overrides(name: str, config: RunConfig) -> list[str]:
    rounds = config.realloc.rounds or 2
    return {
        "full": ["model.kind=full", "realloc.rounds=0"],
        "adaptive": ["model.kind=adaptive", "realloc.rounds=0"],
        "lightrnn-random": ["model.kind=lightrnn", "realloc.rounds=0", "realloc.initial=random"],
        "lightrnn-frequency": ["model.kind=lightrnn", "realloc.rounds=0", "realloc.initial=frequency"],
        "lightrnn-realloc": ["model.kind=lightrnn", f"realloc.rounds={rounds}", "realloc.initial=random"],
    }[name]


def _train(config: str, overrides: list[str], budget: list[str], log_path: Path) -> dict[str, Any]:
    """One `jobs.train_local` process; its JSON summary and its [train] lines (step, loss)."""
    command = [sys.executable, "-m", "jobs.train_local", "--config", config, "--json", *budget]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log_path.open("w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    log_path.write_text(log_path.read_text() + done.stdout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {log_path}")
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    summary["curve"] = [
        (int(parts[2]), float(parts[6]))
        for parts in (line.split() for line in lines if line.startswith("[train] step"))
    ]
    return summary


def compare(
    config_name: str,
    variants: list[str],
    overrides: list[str],
    epochs: float | None,
    budget_minutes: float | None,
    parallel: int,
    out: Path,
    clock: str = "cpu",
) -> list[dict[str, Any]]:
    config = get_preset(config_name).with_overrides(overrides)
    out.mkdir(parents=True, exist_ok=True)
    plans: dict[str, list[str]] = {}
    for name in variants:
        variant = variant_overrides(name, config)
        kind = config.with_overrides(variant).model.kind
        plan = [*tuned_overrides(config_name, kind), *overrides, *variant]
        if epochs is not None:
            plan += [f"train.epochs={epochs}", "train.max_steps=0"]
        plans[name] = plan
    budget = [] if budget_minutes is None else ["--budget-seconds", str(budget_minutes * 60), "--clock", clock]
    started = time.perf_counter()
    with ThreadPoolExecutor(parallel) as pool:
        futures = {
            name: pool.submit(_train, config_name, plan, budget, out / f"{name}.log") for name, plan in plans.items()
        }
        results = []
        for name, future in futures.items():
            summary = future.result()
            summary["variant"] = name
            results.append(summary)
            print(
                f"[variant] {name}: test ppl {summary['test_ppl']:.2f}, valid {summary['valid_ppl']:.2f}; "
                f"{summary['steps']:,} steps, {summary['train_seconds']:.1f}s training + "
                f"{summary['realloc_seconds']:.1f}s reallocation ({summary['clock']} clock)",
                flush=True,
            )
    print(f"[compare] {len(results)} variants in {time.perf_counter() - started:.0f}s", flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The comparison as Markdown; seconds are on each run's clock (CPU or wall, the last column)."""
    full = next((r["test_ppl"] for r in results if r["variant"] == "full"), None)
    lines = [
        "| variant | parameters | embeddings + heads | steps | train s | realloc s | words/s | valid ppl | test ppl "
        "| test ppl / full | clock |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ratio = f"{r['test_ppl'] / full:.3f}" if full else "-"
        realloc = f"{r['realloc_seconds']:.1f}" if r["realloc_rounds"] else "-"
        lines.append(
            f"| {r['variant']} | {r['params']:,} | {r['embed_head_bytes'] / 1e6:.2f} MB | {r['steps']:,} | "
            f"{r['train_seconds']:.1f} | {realloc} | {r['words_per_s']:,.0f} | {r['valid_ppl']:.2f} | "
            f"{r['test_ppl']:.2f} | {ratio} | {r['clock']} |"
        )
    return "\n".join(lines)


def log_to_mlflow(
    results: list[dict[str, Any]], config_name: str, args: argparse.Namespace, tracking_uri: str, experiment: str
) -> str:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import experiment_id

    client = MlflowClient(tracking_uri)
    exp = experiment_id(client, experiment, tracking_uri)
    budget = f"{args.budget_minutes}min" if args.budget_minutes is not None else f"{args.epochs}ep"
    parent = client.create_run(exp, run_name=f"compare-{config_name}-{budget}").info.run_id
    settings = {
        "config": config_name,
        "epochs": args.epochs,
        "budget_minutes": args.budget_minutes,
        "clock": args.clock,
    }
    for key, value in settings.items():
        client.log_param(parent, key, str(value))
    for item in args.set:
        key, _, value = item.partition("=")
        client.log_param(parent, key, value)
    for r in results:
        run = client.create_run(exp, run_name=r["variant"], tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_param(run, "variant", r["variant"])
        client.log_param(run, "model.kind", r["model"])
        client.log_param(run, "steps", r["steps"])
        now = int(time.time() * 1000)
        figures = (
            "valid_ppl",
            "test_ppl",
            "words_per_s",
            "params",
            "embed_head_bytes",
            "train_seconds",
            "realloc_seconds",
        )
        metrics = [Metric(k, float(r[k]), now, 0) for k in figures]
        metrics += [Metric("train_loss", loss, now, step) for step, loss in r["curve"]]
        metrics += [Metric("phase_valid_ppl", v, now, i) for i, v in enumerate(r["valid_ppl_per_phase"])]
        for start in range(0, len(metrics), 1000):
            client.log_batch(run, metrics=metrics[start : start + 1000])
        client.log_metric(parent, f"test_ppl_{r['variant'].replace('-', '_')}", float(r["test_ppl"]))
        client.set_terminated(run)
    client.log_text(parent, table(results), "comparison.md")
    client.log_dict(parent, [{k: v for k, v in r.items() if k != "curve"} for r in results], "comparison.json")
    client.set_terminated(parent)
    return parent


def experiment_of(tracking_uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(tracking_uri).get_experiment_by_name(name)
    return experiment.experiment_id if experiment else "0"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.compare", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help=f"named configuration: {', '.join(PRESETS)}")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=float, help="the same number of epochs for every variant")
    budget.add_argument("--budget-minutes", type=float, help="the same training time for every variant")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu", help="--budget-minutes on CPU or wall time")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override for all")
    p.add_argument("--parallel", type=int, default=1, help="variants trained at once (one CPU thread each)")
    p.add_argument("--out", default="", help="folder for logs and comparison.json (default runs/compare-CONFIG)")
    p.add_argument("--tracking-uri", default="", help="MLflow URI (default sqlite:///runs/mlflow.db)")
    p.add_argument("--experiment", default="lightrnn-compare", help="MLflow experiment")
    p.add_argument("--json", action="store_true", help="end with one JSON line: the rows of the table")
    args = p.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.parallel < 1 or (args.budget_minutes is not None and args.budget_minutes <= 0):
        p.error("--parallel must be >= 1 and --budget-minutes > 0")
    try:
        get_preset(args.config).with_overrides(args.set)
    except ValueError as e:
        p.error(str(e))
    out = Path(args.out or os.path.join("runs", f"compare-{args.config}"))
    results = compare(args.config, variants, args.set, args.epochs, args.budget_minutes, args.parallel, out, args.clock)
    tracking_uri = args.tracking_uri or f"sqlite:///{out.resolve().parent / 'mlflow.db'}"
    parent = log_to_mlflow(results, args.config, args, tracking_uri, args.experiment)
    rows = [{k: v for k, v in r.items() if k != "curve"} for r in results]
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    print(table(results))
    print(f"[done] {out / 'comparison.json'}; MLflow run {parent} in {tracking_uri}", flush=True)
    print(f"       {ui_command(tracking_uri, experiment_of(tracking_uri, args.experiment))}", flush=True)
    if args.json:
        print(json.dumps(rows, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
