"""Benchmarks: `python -m jobs.bench NAME [options] [--json]`.

Each benchmark prints a human-readable table; with --json its last line is one JSON
object with the figures. Speed and memory figures are measured side by side in one
run, so ratios are meaningful on a noisy machine.

    python -m jobs.bench size --vocab 10000000 --embed 1000 --hidden 1000 --layers 1 --json
    python -m jobs.bench step --vocab 1000000 --hidden 256 --models lightrnn,full,adaptive --json
    python -m jobs.bench realloc --vocab 1000000 --k 10 --method exact --json
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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="{" + ",".join(BENCHMARKS) + "}")
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", action="store_true", help="end with one JSON line of results")
        module.add_arguments(p)
    args = parser.parse_args(argv)
    result = modules[args.benchmark].run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
