"""Benchmarks: `python -m jobs.bench NAME [options] [--json]`.

Each benchmark prints a human-readable table; with --json its last line is one JSON
object with the figures. Speed and memory figures are measured side by side in one
run, so ratios are meaningful on a noisy machine.

    python -m jobs.bench size --vocab 10000000 --embed 1000 --hidden 1000 --layers 1 --json
    python -m jobs.bench step --vocab 1000000 --hidden 256 --models lightrnn,full,adaptive --json
    python -m jobs.bench realloc --vocab 1000000 --k 10 --method exact --json
    python -m jobs.bench costs --vocab 1000000 --hidden 256 --workers 2 --solve --json
    python -m jobs.bench infer --vocab 100000,1000000 --json
    python -m jobs.bench train --workers 2 --vocab 1000000 --hidden 64 --json
    python -m jobs.bench gpu-smoke --json    # on a machine with 2+ GPUs
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# name -> module implementing add_arguments(parser) and run(args) -> dict
BENCHMARKS = {
    "size": "jobs.bench_size",
    "step": "jobs.bench_step",
    "realloc": "jobs.bench_realloc",
    "costs": "jobs.bench_costs",
    "ingest": "jobs.bench_ingest",
    "train": "jobs.bench_train",
    "infer": "jobs.bench_infer",
    "gpu-smoke": "jobs.bench_gpu_smoke",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="which benchmark to run")
    if not argv or argv[0] not in BENCHMARKS:
        parser.parse_args(argv[:1])  # prints usage and the valid names, exits 2
    # import only the chosen benchmark, so one benchmark's needs never block another
    module = importlib.import_module(BENCHMARKS[argv[0]])
    sub = argparse.ArgumentParser(
        prog=f"python -m jobs.bench {argv[0]}", description=(module.__doc__ or "").strip().splitlines()[0]
    )
    sub.add_argument("--json", action="store_true", help="end with one JSON line of results")
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    result = module.run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
