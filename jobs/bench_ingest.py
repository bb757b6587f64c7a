"""Tokens per second of the whole prepare stage on a synthetic Zipf corpus, side by side for several Ray CPU counts.

The corpus is written once (`pipeline.synth`); then each CPU count runs the stage in a
fresh process with a fresh local Ray of that many CPUs, so its driver's peak memory is its
own. Ray's start-up is outside the clock, and so is the first import of the stage's code
in each worker process (one task per CPU before the clock starts): what is timed is the
stage end to end (plan, count, vocabulary, encode, write, manifest), with its phases. The
peaks are the driver's and the largest worker task's resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import ray

from pipeline.counting import SPECIALS
from pipeline.sources import kind_of
from pipeline.synth import FORMATS, write_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="parquet", help="corpus files: text or Parquet")
    parser.add_argument("--distinct", type=int, default=200_000, help="distinct words in the corpus")
    parser.add_argument("--vocab", type=int, default=0, help="--max-vocab of the stage (0: keep every word)")
    parser.add_argument("--tokens", type=int, default=16_000_000, help="tokens (without <eos>)")
    parser.add_argument("--files", type=int, default=8, help="corpus files")
    parser.add_argument("--cpus", default="1,2", help="Ray CPU counts to compare, comma-separated")
    parser.add_argument("--block-len", type=int, default=8192)
    parser.add_argument("--unit-mb", type=int, default=64, help="MB of text per task (--unit-mb of the stage)")
    parser.add_argument("--corpus", help="an existing corpus folder to read instead of writing one")
    parser.add_argument("--lower", action="store_true", help="lower-case the words, as --lower of the stage")


def measure(corpus: str, out: str, cpus: int, max_vocab: int, block_len: int, unit_mb: int, lower: bool) -> dict:
    """The stage once, in this process, on a fresh local Ray of `cpus` CPUs (see the module docstring)."""
    from pipeline.prepare import prepare
    from pipeline.runconfig import DataConfig

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.get([_warm_up.remote() for _ in range(cpus)])
    try:
        data = DataConfig(train=corpus, max_vocab=max_vocab, block_len=block_len, lower=lower)
        return prepare(data, out, unit_mb=unit_mb)
    finally:
        ray.shutdown()


@ray.remote
def _warm_up() -> None:
    import pipeline.prepare  # noqa: F401  (what every task of the stage imports)


def _prepare(corpus: str, out: str, cpus: int, args: argparse.Namespace) -> dict:
    call = f"measure({corpus!r}, {out!r}, {cpus}, {args.vocab}, {args.block_len}, {args.unit_mb}, {args.lower})"
    script = f"import json; from jobs.bench_ingest import measure; print(json.dumps({call}))"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the stage with {cpus} CPU(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    cpus = [int(c) for c in args.cpus.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        corpus = args.corpus
        if not corpus:
            corpus = os.path.join(tmp, "corpus")
            ray.init(address="local", num_cpus=max(cpus), include_dashboard=False, log_to_driver=False)
            write_corpus(corpus, args.distinct, args.tokens, args.files, fmt=args.format)
            ray.shutdown()
        for n in cpus:
            results[n] = _prepare(corpus, os.path.join(tmp, f"out-{n}"), n, args)
    base = results[cpus[0]]["seconds"]
    first = results[cpus[0]]
    files = first["splits"]["train"]["files"]  # what was read, also for an existing --corpus
    fmt, distinct = kind_of(files[0]), first["vocab"]["distinct_words"] - len(SPECIALS)
    print(
        f"corpus: {first['splits']['train']['tokens']:,} tokens with <eos>, {distinct:,} distinct words, "
        f"{len(files)} {fmt} files; vocabulary {first['vocab']['size']:,}"
    )
    print(
        f"{'ray cpus':>8}{'seconds':>9}{'tokens/s':>13}{'per cpu':>12}{'speedup':>9}   plan / count / vocab / encode s"
        f"   peak MB driver / worker"
    )
    for n, r in results.items():
        p, rate = r["phase_seconds"], r["splits"]["train"]["tokens"] / r["seconds"]
        print(
            f"{n:>8}{r['seconds']:>9.2f}{rate:>13,.0f}{rate / n:>12,.0f}{base / r['seconds']:>9.2f}"
            f"   {p['plan']:.1f} / {p['count']:.1f} / {p['vocab']:.1f} / {p['encode']:.1f}"
            f"   {r['peak_rss_mb']['driver']:,.0f} / {r['peak_rss_mb']['worker']:,.0f}"
        )
    return {
        "benchmark": "ingest",
        "format": fmt,
        "vocab_words": distinct,
        "max_vocab": args.vocab,
        "lower": args.lower,
        "files": len(files),
        "tokens": first["splits"]["train"]["tokens"],
        "vocab_size": first["vocab"]["size"],
        **{f"seconds_{n}cpu": round(r["seconds"], 3) for n, r in results.items()},
        **{f"tokens_per_s_{n}cpu": round(r["splits"]["train"]["tokens"] / r["seconds"]) for n, r in results.items()},
        **{f"phase_seconds_{n}cpu": r["phase_seconds"] for n, r in results.items()},
        **{f"driver_peak_rss_mb_{n}cpu": r["peak_rss_mb"]["driver"] for n, r in results.items()},
        **{f"worker_peak_rss_mb_{n}cpu": r["peak_rss_mb"]["worker"] for n, r in results.items()},
    }
