"""Cost pass and reallocation from its shards: seconds, sums per worker, peak memory, at a real vocabulary size.

A synthetic Zipf corpus with --vocab distinct words is prepared (pipeline.prepare), a
LightRNN of that vocabulary (hidden size --hidden, one layer, untrained) is checkpointed,
and the pipeline's cost pass runs on --workers Ray Train workers over --cost-tokens
targets, writing word-range shards (pipeline.cost_pass). With --solve, the two_stage
solver then reads those shards block by block, its parallel work in Ray tasks, as the
pipeline's reallocation task does. Peak private memory is measured per process
(pipeline.memory): the driver, the largest cost-pass worker, the largest solver task.

    python -m jobs.bench costs --vocab 1000000 --hidden 256 --workers 2 --solve --json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray
import torch

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, TrainConfig
from lightrnn.model import LightRNN
from lightrnn.realloc import solve_reallocation
from pipeline.checkpoint import make_schedule, save_checkpoint
from pipeline.cost_pass import ShardedCosts, model_heads, run_cost_pass
from pipeline.dataset import open_dataset
from pipeline.memory import peak_rss_mb, reset_peak
from pipeline.prepare import prepare
from pipeline.runconfig import DataConfig
from pipeline.synth import write_corpus
from pipeline.tasks import RayMapper


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=1_000_000, help="distinct words of the corpus")
    parser.add_argument("--hidden", type=int, default=256, help="LSTM hidden size H")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of the cost pass")
    parser.add_argument("--tokens", type=int, default=0, help="corpus tokens (default: 2 x --vocab)")
    parser.add_argument("--cost-tokens", type=int, default=200_000, help="targets the cost pass reads")
    parser.add_argument("--batch", type=int, default=20, help="columns per worker")
    parser.add_argument("--bptt", type=int, default=35, help="segment length")
    parser.add_argument("--solve", action="store_true", help="also solve two_stage from the shards")
    parser.add_argument("--root", default="", help="working folder (default: a temporary one)")


def run(args: argparse.Namespace) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    reset_peak()
    with tempfile.TemporaryDirectory(dir=args.root or None) as tmp:
        t0 = time.perf_counter()
        corpus = os.path.join(tmp, "corpus")
        write_corpus(corpus, args.vocab, args.tokens or 2 * args.vocab, files=2)
        data = os.path.join(tmp, "data")
        prepare(DataConfig(train=corpus, block_len=8192), data)
        vocab = int(open_dataset(data).manifest["vocab"]["size"])
        prepared_s = time.perf_counter() - t0
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=vocab, embed_dim=32, hidden_dim=args.hidden, num_layers=1, dropout=0.0)
        model = LightRNN(config, Allocation.random(vocab, seed=0))
        checkpoint = os.path.join(tmp, "checkpoint")
        os.makedirs(checkpoint)
        train = TrainConfig(batch_size=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        save_checkpoint(checkpoint, model, optimizer, 0, make_schedule(2, 8192, 1, train), {})
        out = os.path.join(tmp, "costs")
        t0 = time.perf_counter()
        info = run_cost_pass(checkpoint, data, out, args.workers, False, args.batch, args.bptt, args.cost_tokens)
        pass_s = time.perf_counter() - t0
        result = {
            "vocab": vocab,
            "hidden": args.hidden,
            "workers": args.workers,
            "prepare_seconds": round(prepared_s, 1),
            "cost_pass_seconds": round(pass_s, 1),
            "cost_tokens": info["tokens"],
            "tokens_per_s": round(info["tokens"] / pass_s),
            "sums_mb_per_worker": round(info["sums_mb_per_worker"], 1),
            "all_sums_mb": round(2 * vocab * args.hidden * 4 / 2**20, 1),
            "peak_worker_mb": info["peak_worker_rss_mb"],
        }
        if args.solve:
            costs = ShardedCosts(out, model_heads(model))
            mapper = RayMapper()
            t0 = time.perf_counter()
            _, stats = solve_reallocation(costs, None, model.allocation(), method="two_stage", mapper=mapper)
            result.update(
                solve_seconds=round(time.perf_counter() - t0, 1),
                solve_words_moved=stats.words_moved,
                solve_cost_before=stats.cost_before,
                solve_cost_after=stats.cost_after,
                peak_solver_task_mb=mapper.peak_task_mb,
            )
        result["peak_driver_mb"] = peak_rss_mb()
    ray.shutdown()
    print(f"{'figure':<22}{'value':>16}")
    for key, value in result.items():
        print(f"{key:<22}{value:>16,}" if isinstance(value, int) else f"{key:<22}{value:>16,.1f}")
    return result
