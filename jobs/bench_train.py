"""Training words/s on Ray Train with 1, 2, ... CPU workers on the same data and global batch.

Every setting runs `pipeline.train.run_training` for the same steps in one local Ray
(started outside the timing); words/s counts every worker's words over training time
only (from the first batch, validation excluded). Without --data, PTB is prepared into
a temporary directory first.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

import ray

from jobs.configs import PRESETS, get_preset
from pipeline.prepare import prepare
from pipeline.runconfig import DataConfig
from pipeline.train import DistConfig, run_training

PTB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "ptb")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", default="1,2", help="worker counts to compare, comma-separated")
    parser.add_argument("--data", help="prepared dataset root (default: PTB prepared into a temp dir)")
    parser.add_argument("--config", default="ptb", help=f"model/train preset: {', '.join(PRESETS)}")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per setting")
    parser.add_argument("--batch-size", type=int, default=20, help="global batch in blocks (a multiple of workers)")
    parser.add_argument("--block-len", type=int, default=2048, help="tokens per block when preparing PTB")


def run(args: argparse.Namespace) -> dict:
    counts = [int(w) for w in args.workers.split(",")]
    preset = get_preset(args.config)
    # validation would be timed out anyway; a fixed schedule keeps every setting's work equal
    train = dataclasses.replace(preset.train, max_steps=args.steps, batch_size=args.batch_size, log_every=args.steps)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(counts) + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict[int, dict] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            data = args.data
            if not data:
                data = os.path.join(tmp, "ptb")
                ptb = DataConfig(
                    train=os.path.join(PTB, "ptb.train.txt.xz"),
                    valid=os.path.join(PTB, "ptb.valid.txt"),
                    block_len=args.block_len,
                )
                prepare(ptb, data)
            for n in counts:
                job = DistConfig(data=data, output=os.path.join(tmp, "runs"), name=f"w{n}", workers=n, max_failures=0)
                results[n] = run_training(preset.model, train, job)
    finally:
        ray.shutdown()
    base = results[counts[0]]["words_per_s"]
    print(f"{args.config} model, global batch {args.batch_size} blocks x bptt {train.bptt}, {args.steps} steps")
    print(f"{'workers':>8}{'words/s':>12}{'speedup':>9}{'final loss':>12}")
    for n, r in results.items():
        print(f"{n:>8}{r['words_per_s']:>12,.0f}{r['words_per_s'] / base:>9.2f}{r['final_train_loss']:>12.3f}")
    return {
        "benchmark": "train",
        "config": args.config,
        "steps": args.steps,
        "global_batch_blocks": args.batch_size,
        "bptt": train.bptt,
        **{f"words_per_s_{n}w": round(r["words_per_s"], 1) for n, r in results.items()},
        **{f"final_train_loss_{n}w": round(r["final_train_loss"], 4) for n, r in results.items()},
    }
