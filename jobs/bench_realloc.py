"""Reallocation solver: seconds, peak memory and cost of exact vs two_stage on low-rank costs.

Costs are shaped like real ones (lightrnn/costs.py: A = -(W_row H_w + n_w b_row), a product
of per-word sums and the head weights): A = -(U Wr^T) + noise and B = -(U' Wc^T) + noise
with gaussian factors of rank --rank, generated block by block (float32, as a model's
would be), so V x R is never held. With --counts zipf (the default) each word's costs are
also scaled by a Zipf-distributed occurrence count and carry the heads' shared bias term
(-n_w b), as sums over a corpus do: they then span orders of magnitude from rare to
frequent words and most words prefer the same few rows, the case that defeats naive
candidate selection. --counts none gives every word the same scale. Each method runs in
a fresh spawned process, so the peak RSS it reports is its own. --vs-dense also solves the full V x (R*C) matrix with
scipy (the exact optimum; V up to about 12,000) and reports each method's optimality gap.

    python -m jobs.bench realloc --vocab 1000000 --method exact,two_stage --json
    python -m jobs.bench realloc --vocab 10000 --method all --vs-dense --json
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import scipy.optimize

from lightrnn.allocation import Allocation, table_shape
from lightrnn.realloc import (
    AUTO_EXACT_WORDS,
    DEFAULT_K,
    DEFAULT_PRICE_ROUNDS,
    METHODS,
    allocation_cost,
    auto_cells_per_word,
    solve_reallocation,
)

ORACLE_MAX_ENTRIES = 150_000_000  # V x (R*C) float64 entries for --vs-dense (1.2 GB; V=10k is 1e8)
COUNTS = ("zipf", "none")
_NOISE_ROWS = 4096  # noise comes from a fixed table: cheap, deterministic per word


class LowRankCosts:
    """Picklable `costs(start, stop) -> (A, B)`: gaussian low-rank costs plus a little noise."""

    def __init__(self, vocab_size: int, rank: int, noise: float, seed: int, counts: str = "zipf") -> None:
        if counts not in COUNTS:
            raise ValueError(f"counts must be one of {', '.join(COUNTS)}, got {counts!r}")
        rows, cols = table_shape(vocab_size)
        rng = np.random.default_rng(seed)
        self.u_row = rng.standard_normal((vocab_size, rank), dtype=np.float32)
        self.u_col = rng.standard_normal((vocab_size, rank), dtype=np.float32)
        self.w_row = rng.standard_normal((rows, rank), dtype=np.float32)
        self.w_col = rng.standard_normal((cols, rank), dtype=np.float32)
        # signal entries have standard deviation sqrt(rank); noise is `noise` times that
        scale = np.float32(noise * math.sqrt(rank))
        self.noise_row = scale * rng.standard_normal((_NOISE_ROWS, rows), dtype=np.float32)
        self.noise_col = scale * rng.standard_normal((_NOISE_ROWS, cols), dtype=np.float32)
        self.count = np.ones(vocab_size, dtype=np.float32)
        self.bias_row = np.zeros(rows, dtype=np.float32)
        self.bias_col = np.zeros(cols, dtype=np.float32)
        if counts == "zipf":
            # word ids are frequency ranks, as in a built vocabulary: n_w = 1e6 / (w + 1), at least 1
            self.count = np.maximum(1.0, 1e6 / np.arange(1, vocab_size + 1, dtype=np.float64)).astype(np.float32)
            self.bias_row = np.float32(math.sqrt(rank)) * rng.standard_normal(rows, dtype=np.float32)
            self.bias_col = np.float32(math.sqrt(rank)) * rng.standard_normal(cols, dtype=np.float32)

    def __call__(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        words = np.arange(start, stop, dtype=np.int64)
        return self.row_costs_of(words), self.column_costs_of(words)

    def row_costs_of(self, words: np.ndarray) -> np.ndarray:
        """A of the given words: the costs of a block are those of its words, in any order."""
        # a multiplicative hash spreads neighbouring words over the noise table
        pick = (words.astype(np.int64) * 2_654_435_761) % _NOISE_ROWS
        return self.count[words, None] * (-(self.u_row[words] @ self.w_row.T) - self.bias_row + self.noise_row[pick])

    def column_costs_of(self, words: np.ndarray) -> np.ndarray:
        pick = (words.astype(np.int64) * 2_654_435_761) % _NOISE_ROWS
        return self.count[words, None] * (-(self.u_col[words] @ self.w_col.T) - self.bias_col + self.noise_col[pick])


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status (Linux only)")


def _current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


def _run_method(
    method: str, vocab: int, rank: int, noise: float, seed: int, counts: str, options: dict, cpus: int = 1
) -> dict:
    """One solve in this (fresh) process; its stats and memory. `options` go to the solver.

    With `cpus` > 1 a local Ray instance of that many CPUs runs two_stage's parallel work as
    tasks; their largest private memory is reported beside this process's peak."""
    from pipeline.memory import peak_rss_mb, reset_peak

    reset_peak()  # private memory (RssAnon), sampled: VmHWM also counts object-store pages read
    costs = LowRankCosts(vocab, rank, noise, seed, counts)
    current = Allocation.random(vocab, seed)
    inputs_mb = _current_rss_mb()
    mapper = None
    if cpus > 1 and (method == "two_stage" or (method == "auto" and vocab > AUTO_EXACT_WORDS)):
        import ray

        from pipeline.tasks import RayMapper

        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        mapper = RayMapper()
        options = {**options, "mapper": mapper}
    allocation, stats = solve_reallocation(costs, None, current, method=method, **options)
    result = stats.as_dict()
    result["cpus"] = cpus if mapper is not None else 1
    result["peak_task_mb"] = mapper.peak_task_mb if mapper is not None else None
    result["tasks"] = mapper.tasks if mapper is not None else 0
    # an independent recount of the returned allocation's cost
    result["cost_after_check"] = allocation_cost(costs, None, allocation)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["peak_private_mb"] = peak_rss_mb()
    result["inputs_rss_mb"] = inputs_mb
    return result


def _run_oracle(vocab: int, rank: int, noise: float, seed: int, counts: str) -> dict:
    """The exact optimum: scipy's linear_sum_assignment on the full V x (R*C) matrix."""
    costs = LowRankCosts(vocab, rank, noise, seed, counts)
    t0 = time.perf_counter()
    a, b = costs(0, vocab)
    full = (a.astype(np.float64)[:, :, None] + b.astype(np.float64)[:, None, :]).reshape(vocab, -1)
    words, cells = scipy.optimize.linear_sum_assignment(full)
    return {
        "cost": math.fsum(full[words, cells]),
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": _peak_rss_mb(),
    }


def _in_fresh_process(fn: Callable[..., dict], *args: object) -> dict:
    # spawn, not fork: the child starts empty, so its peak RSS is the solver's own
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _methods(spec: str) -> list[str]:
    if spec == "all":
        return ["exact", "two_stage"]
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--method takes 'all' or a comma list of {', '.join(METHODS)}; got {spec!r}")
    return methods


def _cells_per_word(spec: str, vocab: int, k: int) -> int | None:
    if spec == "auto":
        return auto_cells_per_word(vocab, k)
    try:
        value = int(spec)
    except ValueError:
        raise ValueError(f"--cells-per-word takes 'auto' or an integer (0: all k^2), got {spec!r}") from None
    return None if value == 0 else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=10_000, help="vocabulary size V")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="candidate rows and columns per word")
    parser.add_argument(
        "--cells-per-word",
        default="auto",
        help="exact: cheapest cells kept of each word's k x k grid (0: all k^2; auto: all while "
        "V x k^2 fits lightrnn.realloc.ARC_BUDGET arcs, else fewer)",
    )
    parser.add_argument(
        "--price-rounds",
        type=int,
        default=DEFAULT_PRICE_ROUNDS,
        help="steps setting the row/column prices that rank candidates (0: raw costs)",
    )
    parser.add_argument(
        "--keep-empty-cells",
        action="store_true",
        help="exact: words only trade cells occupied now (square problem, faster when R*C > V)",
    )
    parser.add_argument(
        "--method",
        default="auto",
        help=f"one of {', '.join(METHODS)}, a comma list, or 'all' (exact,two_stage); auto: exact up to "
        f"{AUTO_EXACT_WORDS:,} words, else two_stage",
    )
    parser.add_argument(
        "--cpus", type=int, default=1, help="two_stage: CPUs of a local Ray instance running its parallel work"
    )
    parser.add_argument("--rank", type=int, default=16, help="rank of the structured random costs")
    parser.add_argument("--noise", type=float, default=0.1, help="noise, relative to the low-rank part")
    parser.add_argument("--seed", type=int, default=0, help="seed of costs and the current allocation")
    parser.add_argument(
        "--counts",
        choices=COUNTS,
        default="zipf",
        help="zipf: scale each word's costs by a Zipf occurrence count and add a shared bias, as sums "
        "over a corpus do; none: every word on the same scale",
    )
    parser.add_argument(
        "--vs-dense",
        action="store_true",
        help="also solve the full matrix with scipy (small V) and report each method's optimality gap",
    )


def run(args: argparse.Namespace) -> dict:
    methods = _methods(args.method)
    cells_per_word = _cells_per_word(args.cells_per_word, args.vocab, args.k)
    options = {
        "k": args.k,
        "cells_per_word": cells_per_word,
        "price_rounds": args.price_rounds,
        "keep_empty_cells": args.keep_empty_cells,
    }
    rows, cols = table_shape(args.vocab)
    print(
        f"V={args.vocab:,} table {rows} x {cols}; k={args.k} cells_per_word={cells_per_word or 'all'} "
        f"price_rounds={args.price_rounds} rank={args.rank} noise={args.noise} counts={args.counts} seed={args.seed}"
    )
    per_method = {}
    for method in methods:
        per_method[method] = _in_fresh_process(
            _run_method, method, args.vocab, args.rank, args.noise, args.seed, args.counts, options, args.cpus
        )
    dense = None
    if args.vs_dense:
        entries = args.vocab * rows * cols
        if entries > ORACLE_MAX_ENTRIES:
            print(f"--vs-dense skipped: {entries:,} matrix entries > ORACLE_MAX_ENTRIES={ORACLE_MAX_ENTRIES:,}")
        else:
            dense = _in_fresh_process(_run_oracle, args.vocab, args.rank, args.noise, args.seed, args.counts)
            for result in per_method.values():
                result["optimality_gap"] = (result["cost_after"] - dense["cost"]) / abs(dense["cost"])

    print(
        f"{'method':<11}{'seconds':>9}{'solver_s':>10}{'peak_rss_mb':>13}{'cost_before':>16}{'cost_after':>16}"
        f"{'words_moved':>13}{'arcs':>12}{'tiers':>7}{'gap':>11}{'private_mb':>12}{'task_peak_mb':>14}"
    )
    for method, r in per_method.items():
        gap = f"{r['optimality_gap']:.2e}" if "optimality_gap" in r else "-"
        print(
            f"{method:<11}{r['seconds']:>9.2f}{r['solver_seconds']:>10.2f}{r['peak_rss_mb']:>13.0f}{r['cost_before']:>16.6g}"
            f"{r['cost_after']:>16.6g}{r['words_moved']:>13,}{r['num_candidate_arcs']:>12,}{r['tiers']:>7}{gap:>11}"
            f"{r['peak_private_mb']:>12.0f}{r['peak_task_mb'] or 0:>14.0f}"
        )
    if dense is not None:
        d, blank = dense, ""
        print(f"{'dense opt':<11}{d['seconds']:>9.2f}{blank:>10}{d['peak_rss_mb']:>13.0f}{d['cost']:>32.6g}")
    first = per_method[methods[0]]
    keys = (
        "seconds",
        "peak_rss_mb",
        "peak_private_mb",
        "peak_task_mb",
        "cost_before",
        "cost_after",
        "words_moved",
        "cpus",
    )
    summary = {key: first[key] for key in keys}
    if "optimality_gap" in first:
        summary["optimality_gap"] = first["optimality_gap"]
    summary.update(
        vocab=args.vocab,
        table_rows=rows,
        table_cols=cols,
        k=args.k,
        cells_per_word=cells_per_word,
        price_rounds=args.price_rounds,
        keep_empty_cells=args.keep_empty_cells,
        rank=args.rank,
        noise=args.noise,
        counts=args.counts,
        seed=args.seed,
        methods=per_method,
        dense_optimum=dense,
    )
    return summary
