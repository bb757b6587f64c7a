"""Pieces the reallocation methods share (lightrnn/realloc.py, lightrnn/realloc_two_stage.py).

Reading validated cost blocks, the row/column prices that rank candidates, and the OR-Tools
solvers (linear sum assignment, min-cost flow) on integer-scaled costs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ortools.graph.python import linear_sum_assignment, min_cost_flow

from lightrnn.allocation import Allocation

CostBlocks = Callable[[int, int], tuple[np.ndarray, np.ndarray]]
# A parallel map: mapper(fn, shared, items) yields fn(shared, item) for each item, in item order,
# whatever the order of work. `shared` is what every call needs (the costs); a distributed
# mapper sends it once. Callers consume the results as they come, so a mapper need not hold
# them all at once.
Mapper = Callable[[Callable[[Any, Any], Any], Any, Sequence[Any]], Iterable[Any]]


def serial_map(fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> Iterator[Any]:
    """The mapper of one process."""
    return (fn(shared, item) for item in items)


_PRICE_SAMPLE_ENTRIES = 1 << 25  # words sampled to set prices: 128 MB of float32 costs
_PRICE_SAMPLE_CHUNKS = 16  # contiguous ranges spread over the ids (ids are often frequency ranks)
# OR-Tools 9.15 truncates float costs, so costs are scaled to int64 here. It refuses to solve
# (POSSIBLE_OVERFLOW, BAD_COST_RANGE) once max cost x n^2 (assignment; n = words) or max cost x n
# (min-cost flow; n = nodes) nears 2^62 (docs/design.md, "Integer costs and tiers"); these
# budgets keep two bits below that. More than 2^31 levels would buy nothing but more
# cost-scaling phases.
LSA_BUDGET = 1 << 58
MCF_BUDGET = 1 << 57
MAX_LEVELS = 1 << 31


@dataclass
class Solution:
    """What a method hands back to `solve_reallocation`."""

    new_cell: np.ndarray  # (V,) flat cell of every word
    current_cost: np.ndarray  # (V,) float64 cost of each word in its current cell
    new_cost: np.ndarray  # (V,) float64 cost of each word in its new cell
    solver: str
    num_arcs: int
    cost_scale: float
    solver_seconds: float
    tiers: int = 0  # exact: matchings solved in turn by word tier (0: one matching)


# -- reading cost blocks -----------------------------------------------------------------


def checked_block(values: np.ndarray, name: str, start: int, shape: tuple[int, int]) -> np.ndarray:
    """A cost block as a float array of the expected shape holding only finite values."""
    values = np.asarray(values)
    if values.shape != shape:
        raise ValueError(
            f"{name} block for words [{start}, {start + shape[0]}) has shape {values.shape}, expected {shape}"
        )
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {values.dtype}")
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    # One sum costs far less than isfinite on every entry and is non-finite whenever an entry
    # is (or when finite entries overflow, which the exact check below then clears).
    with np.errstate(over="ignore", invalid="ignore"):
        total = values.sum()
    if not np.isfinite(total):
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
            w = int(bad[0])
            j = int(np.flatnonzero(~np.isfinite(values[w]))[0])
            raise ValueError(
                f"{name} of word {start + w} is not finite ({values[w, j]} at index {j}; {bad.size} "
                f"word(s) in words [{start}, {start + shape[0]})): costs must be finite numbers"
            )
    return values


def iter_blocks(
    costs: CostBlocks, current: Allocation, block_size: int
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """(start, stop, A_block, B_block) over all words, validated."""
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    for start in range(0, V, block_size):
        stop = min(start + block_size, V)
        a, b = costs(start, stop)
        yield (
            start,
            stop,
            checked_block(a, "row_cost", start, (stop - start, R)),
            checked_block(b, "col_cost", start, (stop - start, C)),
        )


def costs_of_words(costs: CostBlocks, words: np.ndarray, current: Allocation, block_size: int, side: int) -> np.ndarray:
    """A (side 0: (n, R)) or B (side 1: (n, C)) of the given words, any order: the source's
    `row_costs_of` / `column_costs_of` when it has one, else read block by block, skipping
    blocks that hold none of them."""
    width, name = (current.num_rows, "row_cost") if side == 0 else (current.num_cols, "col_cost")
    of_words = getattr(costs, ("row_costs_of", "column_costs_of")[side], None)
    if of_words is not None:
        return checked_block(of_words(words), name, 0, (words.size, width))
    order = np.argsort(words, kind="stable")
    ascending = words[order]
    out = np.empty((words.size, width), dtype=np.float64)
    for start in range(0, current.vocab_size, block_size):
        stop = min(start + block_size, current.vocab_size)
        lo, hi = np.searchsorted(ascending, [start, stop])
        if lo == hi:
            continue
        block = checked_block(costs(start, stop)[side], name, start, (stop - start, width))
        out[order[lo:hi]] = block[ascending[lo:hi] - start]
    return out


def pair_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A + B in float64, computed the same way everywhere so that equal cells give equal floats."""
    return a.astype(np.float64, copy=False) + b.astype(np.float64, copy=False)


def k_smallest(values: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of the k smallest entries of each row, unordered."""
    n, width = values.shape
    if k >= width:
        return np.broadcast_to(np.arange(width), (n, width))
    # torch's partial sort is several times faster than np.argpartition on rows this wide
    return torch.topk(torch.from_numpy(np.ascontiguousarray(values)), k, dim=1, largest=False, sorted=False)[1].numpy()


# -- candidate prices --------------------------------------------------------------------


def balancing_prices(costs: CostBlocks, current: Allocation, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """(R,) row and (C,) column prices that spread a sample of words evenly over the table.

    Low-rank costs make the same few rows and columns the cheapest for most words, so raw
    top-k candidates all crowd into them and most words cannot move. The prices are the
    dual variables of the relaxed capacities (a row holds C words, a column R): what a row
    or column must charge so that every word's cheapest choices, taken together, fill the
    table evenly. They only choose which arcs exist; every arc keeps its true cost, so the
    matching stays exact on its graph.

    They are found on a word sample by `rounds` annealed Sinkhorn steps (the entropic dual
    of the transportation problem, `_sinkhorn_prices`). Real costs are sums over a word's
    occurrences, so they span orders of magnitude from rare to frequent words; a plain
    subgradient step scaled by the costs overshot on them (at V = 10k on trained PTB costs
    its candidates reached 3% of the dense optimum's gain, these reach 99%).
    """
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    if rounds == 0:
        return np.zeros(R, np.float32), np.zeros(C, np.float32)
    sample = min(V, _PRICE_SAMPLE_ENTRIES // (R + C))  # 16k words at R = C = 1000
    chunks = 1 if sample == V else min(_PRICE_SAMPLE_CHUNKS, sample)
    size = sample // chunks
    parts = []
    for start in np.linspace(0, V - size, chunks).round().astype(np.int64).tolist():
        a, b = costs(start, start + size)
        parts.append((checked_block(a, "row_cost", start, (size, R)), checked_block(b, "col_cost", start, (size, C))))
    prices = []
    for side, slots in ((0, C), (1, R)):
        values = np.concatenate([p[side] for p in parts])
        capacity = slots * values.shape[0] / V  # this sample's share of a row's (column's) cells
        prices.append(_sinkhorn_prices(values, capacity, rounds))
    return prices[0], prices[1]


def _sinkhorn_prices(values: np.ndarray, capacity: float, rounds: int) -> np.ndarray:
    """Prices p (m,) under which the n words' soft choices softmin_j(values[w, j] + p[j]) load
    every one of the m targets with `capacity` words (log-domain Sinkhorn, float32).

    The temperature falls geometrically from the typical spread of a word's costs to 1/100
    of it (epsilon scaling): early rounds move prices fast, late ones sharpen the choices.
    One exponential per entry and round: a target's load is the sum of the words'
    probabilities, floored at the smallest normal float (a target no word wants still
    lowers its price by a large step).
    """
    x = np.array(values, dtype=np.float32)
    x -= x.min(axis=1, keepdims=True)  # a per-word constant: no price changes with it
    spread = float(np.median(x.max(axis=1)))
    price = np.zeros(x.shape[1], dtype=np.float32)
    if spread <= 0:
        return price
    log_capacity = math.log(capacity)
    tiny = np.finfo(np.float32).tiny
    p = np.empty_like(x)
    for tau in np.geomspace(spread, spread / 100, rounds).tolist():
        np.add(x, price, out=p)
        p *= np.float32(-1.0 / tau)
        p -= p.max(axis=1, keepdims=True)
        np.exp(p, out=p)
        p /= p.sum(axis=1, keepdims=True)  # each word spends one unit
        load = np.log(np.maximum(p.sum(axis=0), tiny))  # log of the words each target gets
        price += np.float32(tau) * (load - np.float32(log_capacity))
        price -= price.min()
    return price


# -- integer costs and the OR-Tools solvers ----------------------------------------------


def _integer_costs(reduced: np.ndarray, budget: int, cost_scale: float | None) -> tuple[np.ndarray, float]:
    """int64 costs for OR-Tools and the scale that made them.

    `reduced` is >= 0: each word's cheapest candidate was subtracted, a per-word constant that
    no matching changes. The default scale maps its maximum to `budget` levels.
    """
    top = float(reduced.max()) if reduced.size else 0.0
    if cost_scale is None:
        scale = min(budget, MAX_LEVELS) / top if top > 0 else 1.0
    else:
        if not (cost_scale > 0 and math.isfinite(cost_scale)):
            raise ValueError(f"cost_scale must be a positive finite number, got {cost_scale}")
        scale = float(cost_scale)
        if top * scale > budget:
            raise ValueError(
                f"cost_scale={cost_scale} maps a cost range of {top:.6g} to {top * scale:.3g} integer "
                f"levels, more than OR-Tools takes at this size without overflow ({budget}); lower "
                f"cost_scale or leave it None to have it chosen"
            )
    return np.rint(reduced * scale).astype(np.int64), scale


def assignment(
    word: np.ndarray, right: np.ndarray, reduced: np.ndarray, n: int, cost_scale: float | None
) -> tuple[np.ndarray, float, float]:
    """Perfect matching of n words onto n right nodes: (right node of each word, scale, seconds)."""
    int_cost, scale = _integer_costs(reduced, LSA_BUDGET // (n + 1) ** 2, cost_scale)
    lsa = linear_sum_assignment.SimpleLinearSumAssignment()
    lsa.add_arcs_with_cost(word, right, int_cost)
    del int_cost
    t0 = time.perf_counter()
    status = lsa.solve()
    seconds = time.perf_counter() - t0
    if status != lsa.OPTIMAL:
        raise RuntimeError(f"OR-Tools linear sum assignment failed with status {status!r}")
    mate = np.fromiter((lsa.right_mate(w) for w in range(n)), dtype=np.int64, count=n)
    return mate, scale, seconds


def flow_match(
    word: np.ndarray,
    target: np.ndarray,
    reduced: np.ndarray,
    num_words: int,
    num_targets: int,
    capacity: int,
    cost_scale: float | None,
) -> tuple[np.ndarray, float, float]:
    """Min-cost flow source -> words -> targets -> sink (at most `capacity` words per target).

    Returns (which word -> target arcs carry a word, scale, seconds).
    """
    source, sink = num_words + num_targets, num_words + num_targets + 1
    int_cost, scale = _integer_costs(reduced, MCF_BUDGET // (sink + 2), cost_scale)
    target_nodes = np.arange(num_words, num_words + num_targets, dtype=np.int32)
    tails = np.concatenate([np.full(num_words, source, np.int32), word, target_nodes])
    heads = np.concatenate(
        [np.arange(num_words, dtype=np.int32), num_words + target, np.full(num_targets, sink, np.int32)]
    )
    capacities = np.concatenate([np.ones(num_words + word.size, np.int64), np.full(num_targets, capacity, np.int64)])
    unit_costs = np.concatenate([np.zeros(num_words, np.int64), int_cost, np.zeros(num_targets, np.int64)])
    del int_cost
    flow = min_cost_flow.SimpleMinCostFlow()
    flow.add_arcs_with_capacity_and_unit_cost(tails, heads, capacities, unit_costs)
    del tails, heads, capacities, unit_costs
    flow.set_nodes_supplies(np.array([source, sink], np.int32), np.array([num_words, -num_words], np.int64))
    t0 = time.perf_counter()
    status = flow.solve()
    seconds = time.perf_counter() - t0
    if status != flow.OPTIMAL:
        raise RuntimeError(f"OR-Tools min-cost flow failed with status {status!r}")
    return flow.flows(np.arange(num_words, num_words + word.size)) > 0, scale, seconds
