"""The two_stage reallocation method: words -> rows, then columns inside each row.

Stage 1 is a transportation problem (each row holds at most C words) on every word's k best
rows, solved by min-cost flow; stage 2 gives the words of each row distinct columns with
`assign_columns_in_row`, R independent problems. B plays no part in stage 1, so the result is
not optimal in general (jobs/bench_realloc.py --vs-dense measures the gap).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.optimize

from lightrnn.allocation import Allocation
from lightrnn.realloc_common import (
    CostBlocks,
    Solution,
    balancing_prices,
    checked_block,
    flow_match,
    iter_blocks,
    k_smallest,
    pair_cost,
)

_GATHER_BYTES = 1 << 30  # two_stage: column costs of the words of a group of rows


def assign_columns_in_row(col_cost: np.ndarray) -> np.ndarray:
    """Columns for the n words placed in one row: a min-cost assignment onto distinct columns.

    col_cost: (n, C) float, B restricted to the row's words (n <= C). Returns (n,) column
    indices. The R rows of a two-stage reallocation are independent calls to this.
    """
    col_cost = np.asarray(col_cost, dtype=np.float64)
    if col_cost.ndim != 2 or col_cost.shape[0] > col_cost.shape[1]:
        raise ValueError(f"col_cost must be (n, C) with n <= C words in the row, got shape {col_cost.shape}")
    if not np.isfinite(col_cost).all():
        raise ValueError("col_cost holds NaN or infinite values; costs must be finite")
    word_idx, col = scipy.optimize.linear_sum_assignment(col_cost)  # rectangular is fine
    out = np.empty(col_cost.shape[0], dtype=np.int64)
    out[word_idx] = col
    return out


def _assign_rows(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    price_rounds: int,
    cost_scale: float | None,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, float, float]:
    """Stage 1: a row for every word, at most C words per row, minimising the sum of A.

    B plays no part: a word's column costs do not depend on its row, so any estimate of them
    (such as min_j B[w, j]) is a per-word constant that no choice of rows changes.
    Returns (row, A at that row, current cost, number of arcs, cost scale, solver seconds).
    """
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    row_price, _ = balancing_prices(costs, current, price_rounds)
    k_rows = min(k, R)
    words, rows, arc_costs, reduced = [], [], [], []
    current_cost = np.empty(V, dtype=np.float64)
    for start, stop, a, b in iter_blocks(costs, current, block_size):
        idx = np.arange(stop - start)
        cur_row = current.row_of[start:stop]
        current_cost[start:stop] = pair_cost(a[idx, cur_row], b[idx, current.col_of[start:stop]])
        # the current row joins every word's list, so the current rows are a feasible flow
        row = np.concatenate([k_smallest(a + row_price, k_rows), cur_row[:, None]], axis=1)
        cost = a[idx[:, None], row].astype(np.float64)
        mask = np.ones(row.shape, dtype=bool)
        mask[:, -1] = ~(row[:, :-1] == cur_row[:, None]).any(axis=1)
        words.append(np.broadcast_to(np.arange(start, stop, dtype=np.int32)[:, None], mask.shape)[mask])
        rows.append(row[mask].astype(np.int32))
        arc_costs.append(cost[mask])
        reduced.append((cost - cost.min(axis=1, keepdims=True))[mask])
    word, row, arc_cost = np.concatenate(words), np.concatenate(rows), np.concatenate(arc_costs)
    chosen, scale, seconds = flow_match(word, row, np.concatenate(reduced), V, R, C, cost_scale)
    new_row = np.empty(V, dtype=np.int64)
    new_row[word[chosen]] = row[chosen]
    row_part = np.empty(V, dtype=np.float64)
    row_part[word[chosen]] = arc_cost[chosen]
    return new_row, row_part, current_cost, int(word.size), scale, seconds


def _gather_col_costs(costs: CostBlocks, current: Allocation, words: np.ndarray, block_size: int) -> np.ndarray:
    """(n, C) float64 column costs of the given words (any order), in one pass over the blocks."""
    V, C = current.vocab_size, current.num_cols
    order = np.argsort(words, kind="stable")
    ascending = words[order]
    out = np.empty((words.size, C), dtype=np.float64)
    for start in range(0, V, block_size):
        stop = min(start + block_size, V)
        lo, hi = np.searchsorted(ascending, [start, stop])
        if lo == hi:
            continue  # none of the wanted words here: do not compute this block
        b = checked_block(costs(start, stop)[1], "col_cost", start, (stop - start, C))
        out[order[lo:hi]] = b[ascending[lo:hi] - start]
    return out


def solve_two_stage(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    price_rounds: int,
    cost_scale: float | None,
    block_size: int,
) -> Solution:
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    new_row, row_part, current_cost, num_arcs, scale, seconds = _assign_rows(
        costs, current, k, price_rounds, cost_scale, block_size
    )
    new_col = np.empty(V, dtype=np.int64)
    col_part = np.empty(V, dtype=np.float64)
    order = np.argsort(new_row, kind="stable")  # words grouped by row, ascending ids inside
    bounds = np.searchsorted(new_row[order], np.arange(R + 1))
    # Rows go in groups whose words' column costs fit _GATHER_BYTES (a row holds <= C words):
    # one pass over the cost blocks per group, so memory stays bounded at any V.
    rows_per_group = max(1, _GATHER_BYTES // (C * C * 8))
    for first in range(0, R, rows_per_group):
        last = min(first + rows_per_group, R)
        group = order[bounds[first] : bounds[last]]
        gathered = _gather_col_costs(costs, current, group, block_size)
        for i in range(first, last):
            lo, hi = bounds[i] - bounds[first], bounds[i + 1] - bounds[first]
            if hi > lo:
                t0 = time.perf_counter()
                cols = assign_columns_in_row(gathered[lo:hi])
                seconds += time.perf_counter() - t0
                new_col[group[lo:hi]] = cols
                col_part[group[lo:hi]] = gathered[np.arange(lo, hi), cols]
    solver = "ortools_min_cost_flow+scipy_linear_sum_assignment"
    return Solution(new_row * C + new_col, current_cost, row_part + col_part, solver, num_arcs, scale, seconds)
