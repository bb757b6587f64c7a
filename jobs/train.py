"""Data-parallel training on Ray Train from a prepared dataset, with checkpoints and resume.

python -m jobs.prepare --train data/ptb/ptb.train.txt.xz --valid data/ptb/ptb.valid.txt \
    --test data/ptb/ptb.test.txt --output /tmp/ptb-prepared --block-len 2048
python -m jobs.train --data /tmp/ptb-prepared --output /tmp/runs --name ptb2 --workers 2 --epochs 1 --json
python -m jobs.train --data /tmp/ptb-prepared --output /tmp/runs --name ptb2 --workers 2 --epochs 2 --resume
python -m jobs.train --data s3://corpus/prepared --output s3://runs --workers 8 --gpu --allocation s3://a.parquet

Model and schedule come from a preset of `jobs.configs` (its data section is unused:
--data names the prepared corpus); `train.batch_size` is the global batch in blocks.
Starts a local Ray with workers + 2 CPUs (room for Ray Data) unless RAY_ADDRESS is set.
"""

from __future__ import annotations

import argparse
import json
import sys

import ray

from jobs.configs import PRESETS, get_preset
from pipeline.cluster import connect_ray
from pipeline.storage import StorageError
from pipeline.train import DistConfig, run_training


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="prepared dataset root (jobs.prepare --output)")
    p.add_argument("--output", required=True, help="run storage root (local path or s3://)")
    p.add_argument("--name", default="lightrnn", help="run name; checkpoints go to OUTPUT/NAME")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (one process each)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker: NCCL and bf16 autocast")
    p.add_argument("--allocation", default="", help="LightRNN allocation Parquet URI (default: random by seed)")
    p.add_argument("--resume", action="store_true", help="continue OUTPUT/NAME from its latest checkpoint")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, help="optimizer steps in the budget")
    budget.add_argument("--epochs", type=float, help="passes over the train blocks")
    p.add_argument("--config", default="ptb", help=f"model/train preset: {', '.join(PRESETS)}")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    p.add_argument("--checkpoint-every", type=int, default=DistConfig.checkpoint_every, help="steps per checkpoint")
    p.add_argument("--max-failures", type=int, default=DistConfig.max_failures, help="automatic restarts (-1: any)")
    p.add_argument("--limit-blocks", type=int, default=0, help="train on the first N full blocks only")
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.epochs is not None:
        overrides += [f"train.epochs={args.epochs}", "train.max_steps=0"]
    try:
        preset = get_preset(args.config).with_overrides(overrides)
        job = DistConfig(
            data=args.data,
            output=args.output,
            name=args.name,
            workers=args.workers,
            use_gpu=args.gpu,
            allocation=args.allocation,
            checkpoint_every=args.checkpoint_every,
            max_failures=args.max_failures,
            limit_blocks=args.limit_blocks,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not ray.is_initialized():
        # Train holds one CPU per worker; Ray Data needs the rest or it deadlocks
        connect_ray(args.workers + 2)
        ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        summary = run_training(preset.model, preset.train, job, resume=args.resume)
    except (StorageError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
