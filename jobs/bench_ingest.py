"""Tokens per second of the whole prepare stage on a synthetic Zipf corpus, 1 vs 2 Ray CPUs.

Each setting gets a fresh local Ray (started outside the timing) and a fresh output;
the time is `pipeline.prepare.prepare` end to end: both passes, vocabulary, shards, manifest.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import ray

from pipeline.prepare import prepare
from pipeline.runconfig import DataConfig
from pipeline.synth import write_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=100_000, help="distinct words in the synthetic corpus")
    parser.add_argument(
        "--tokens", type=int, default=16_000_000, help="tokens (without <eos>); fixed costs hide scaling below ~10M"
    )
    parser.add_argument("--files", type=int, default=8, help="corpus files (the unit of parallelism)")
    parser.add_argument("--cpus", default="1,2", help="Ray CPU counts to compare, comma-separated")
    parser.add_argument("--block-len", type=int, default=8192)


def _init(num_cpus: int) -> None:
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def run(args: argparse.Namespace) -> dict:
    cpus = [int(c) for c in args.cpus.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        corpus = os.path.join(tmp, "corpus")
        _init(max(cpus))
        write_corpus(corpus, args.vocab, args.tokens, args.files)
        ray.shutdown()
        for n in cpus:
            _init(n)
            t0 = time.perf_counter()
            manifest = prepare(DataConfig(train=corpus, block_len=args.block_len), os.path.join(tmp, f"out-{n}"))
            seconds = time.perf_counter() - t0
            ray.shutdown()
            tokens = manifest["splits"]["train"]["tokens"]
            results[n] = {
                "seconds": seconds,
                "tokens": tokens,
                "vocab": manifest["vocab"]["size"],
                "phases": manifest["phase_seconds"],
            }
    base = results[cpus[0]]["seconds"]
    print(f"corpus: {args.tokens:,} tokens (+<eos>), {args.vocab:,} words, {args.files} files")
    print(f"{'ray cpus':>8}{'seconds':>10}{'tokens/s':>14}{'speedup':>9}   count / vocab / encode s")
    for n, r in results.items():
        p = r["phases"]
        print(
            f"{n:>8}{r['seconds']:>10.2f}{r['tokens'] / r['seconds']:>14,.0f}{base / r['seconds']:>9.2f}"
            f"   {p['count']:.2f} / {p['vocab']:.2f} / {p['encode']:.2f}"
        )
    return {
        "benchmark": "ingest",
        "vocab_words": args.vocab,
        "files": args.files,
        "tokens": results[cpus[0]]["tokens"],
        "vocab_size": results[cpus[0]]["vocab"],
        **{f"seconds_{n}cpu": round(r["seconds"], 3) for n, r in results.items()},
        **{f"tokens_per_s_{n}cpu": round(r["tokens"] / r["seconds"]) for n, r in results.items()},
        **{f"phase_seconds_{n}cpu": r["phases"] for n, r in results.items()},
    }
