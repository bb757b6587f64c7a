"""A smoke test of the GPU path on one machine with 2+ GPUs: the tiny run end to end, then clueweb-shaped steps.

    python -m jobs.bench gpu-smoke --json        # a few minutes on 2 GPUs

1. `tiny`: the corpus stage on the PTB sample, then `pipeline.train.run_training` on 2 GPU
   workers (NCCL, bf16 autocast, the LSTM in float32) to the end of its schedule; prints
   the loss, valid and test perplexity (scored across both workers) and words/s.
2. clueweb-shaped steps (`jobs.bench train --gpu`): V = 1M with H = 1024, 2 layers, 16
   blocks of 8,192 tokens per worker as `clueweb` has at 16 workers, once with the LSTM in
   float32 (TF32) and once in bfloat16; then V = 10M with the LSTM in bfloat16. Each prints
   words/s, the step split into data/forward/broadcast/backward/all-reduce/optimizer, the
   peak GPU memory and the dtypes of the LSTM's output and carried state.

Fails (exit 1) when fewer than 2 GPUs are visible, a loss or perplexity is not finite, or
the carried state is not float32.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any

import ray
import torch

from jobs import bench_train
from jobs.configs import get_preset
from pipeline.prepare import prepare
from pipeline.train import DistConfig, run_training

# (name, vocab, hidden, LSTM dtype): what the clueweb preset trains, at two vocabulary sizes
SHAPES = (
    ("clueweb V=1M fp32 LSTM", 1_000_000, 1024, "float32"),
    ("clueweb V=1M bf16 LSTM", 1_000_000, 1024, "bfloat16"),
    ("clueweb V=10M bf16 LSTM", 10_000_000, 1024, "bfloat16"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="GPU workers (one GPU each)")
    parser.add_argument("--batch", type=int, default=16, help="blocks per worker per step (clueweb at 16 workers)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--skip-tiny", action="store_true", help="only the clueweb-shaped steps")


def _tiny(workers: int) -> dict[str, Any]:
    preset = get_preset("tiny")
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        data = os.path.join(tmp, "data")
        prepare(preset.data, data)
        job = DistConfig(data=data, output=os.path.join(tmp, "runs"), name="tiny", workers=workers, use_gpu=True)
        summary = run_training(preset.model, preset.train, job)
    return {k: summary.get(k) for k in ("steps", "final_train_loss", "valid_ppl", "test_ppl", "words_per_s")}


def _args(workers: int, vocab: int, hidden: int, dtype: str, args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        workers=workers,
        gpu=True,
        vocab=vocab,
        hidden=hidden,
        layers=2,
        model="lightrnn",
        batch=args.batch,
        bptt=35,
        block_len=8192,
        steps=args.steps,
        rounds=args.rounds,
        lstm_dtype=dtype,
        broadcast_buffers="both",
        cpus_per_worker=1.0,
    )


def run(args: argparse.Namespace) -> dict:
    gpus = torch.cuda.device_count()
    if gpus < args.workers:
        raise SystemExit(f"the GPU smoke test needs {args.workers} GPUs; this machine shows {gpus}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out: dict[str, Any] = {"benchmark": "gpu-smoke", "gpus": gpus, "gpu_name": torch.cuda.get_device_name(0)}
    problems = []
    if not args.skip_tiny:
        print("[tiny] the corpus stage and 2-GPU training to the end of the schedule", flush=True)
        tiny = out["tiny"] = _tiny(args.workers)
        print(f"[tiny] {tiny}", flush=True)
        if not all(isinstance(v, float) and math.isfinite(v) for k, v in tiny.items() if k != "steps"):
            problems.append(f"tiny: a figure is missing or not finite: {tiny}")
    for name, vocab, hidden, dtype in SHAPES:
        print(f"[{name}]", flush=True)
        figures = out[name] = bench_train.run(_args(args.workers, vocab, hidden, dtype, args))
        for variant, f in figures["variants"].items():
            if f.get("lstm_output_dtype") != f"torch.{dtype}":
                problems.append(f"{name} {variant}: the LSTM ran in {f.get('lstm_output_dtype')}, not {dtype}")
            if f.get("carried_state_dtype") != "torch.float32":
                problems.append(f"{name} {variant}: carried state is {f.get('carried_state_dtype')}, not float32")
    if problems:
        raise SystemExit("GPU smoke test failed:\n  " + "\n  ".join(problems))
    return out
