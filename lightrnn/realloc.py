"""Word reallocation: re-solve which cell each word sits in (Li et al., NIPS 2016, section 3.2).

Placing word w in cell (i, j) costs A[w, i] + B[w, j] (lightrnn/costs.py); the new allocation
is a minimum-cost matching of the V words onto distinct cells of the R x C table.

    words     candidate cells (exact)
    w0 -----> (0, 3)      each word: the cheapest cells of its k best rows x k best columns
       \\---> (2, 1)      (ranked by cost + a per-row and per-column price that spreads demand),
    w1 -----> (2, 1)      plus its current cell, so the current allocation is always a feasible
       \\---> (1, 0) cur  matching and the answer is never worse than it

Methods:
  exact      min-cost matching on that sparse candidate graph (OR-Tools). When words' costs span
             too many orders of magnitude for one integer scale (costs are sums over a word's
             occurrences), words are matched in tiers, widest cost range first (realloc_exact.py).
  two_stage  words -> rows (row capacity C; the words with the most at stake matched exactly, the
             others greedily), then the words of each row onto its columns: R independent sparse
             assignments, in parallel through a mapper (realloc_two_stage.py).
  dense      scipy's linear_sum_assignment on the full V x (R*C) matrix: the oracle for tests.

Costs come as arrays (A (V, R), B (V, C)) or as a callable `costs(start, stop) -> (A_block,
B_block)` for the words [start, stop), so V x R is never held at once (V = 10M). Arrays are
wrapped into such a callable; everything below reads costs block by block.

Files: this one holds the entry point and the dense method; realloc_exact.py the exact method
(and its tiers); realloc_two_stage.py the two_stage method; realloc_common.py the cost-block
reading, candidate prices and OR-Tools solvers they share.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from lightrnn.allocation import Allocation
from lightrnn.realloc_common import CostBlocks, Mapper, Solution, iter_blocks, pair_cost, serial_map
from lightrnn.realloc_exact import TIER_MIN_LEVELS, TIER_RATIO, UPPER_SHARE, solve_exact
from lightrnn.realloc_two_stage import assign_columns_in_row, solve_two_stage

__all__ = [
    "ARC_BUDGET",
    "DEFAULT_CELLS_PER_WORD",
    "DEFAULT_K",
    "DEFAULT_PRICE_ROUNDS",
    "DENSE_MAX_ENTRIES",
    "METHODS",
    "TIER_MIN_LEVELS",
    "TIER_RATIO",
    "UPPER_SHARE",
    "CostBlocks",
    "Mapper",
    "ReallocStats",
    "allocation_cost",
    "assign_columns_in_row",
    "auto_cells_per_word",
    "serial_map",
    "solve_reallocation",
]

METHODS = ("auto", "exact", "two_stage", "dense")
# "auto" solves exactly up to this many words and with two_stage above: at 250k words exact
# takes about as long as two_stage does at 1M (docs/results.md, "Reallocation solver")
AUTO_EXACT_WORDS = 250_000
DEFAULT_K = 10  # candidate rows and columns per word (docs/design.md, "Reallocation")
# exact keeps every cell of a word's k x k grid while the graph stays under ARC_BUDGET arcs
# (V = 10k: all 100), and otherwise the word's ARC_BUDGET // V cheapest cells by priced cost,
# at least DEFAULT_CELLS_PER_WORD (V = 1M: 16 cells, 17M arcs with the current cells, where the
# full 10 x 10 grid would be 101M arcs). `python -m jobs.bench realloc --vs-dense` measures the
# time, memory and gap to the dense optimum this buys (docs/results.md).
DEFAULT_CELLS_PER_WORD = 16
ARC_BUDGET = 1 << 24
DEFAULT_PRICE_ROUNDS = 50  # annealed Sinkhorn steps for the candidate prices; 0 ranks by raw cost
DENSE_MAX_ENTRIES = 25_000_000  # V x (R*C) float64 entries `dense` may build (200 MB)
_BLOCK_ENTRIES = 1 << 22  # A and B entries per cost block (32 MB in float64)


@dataclass
class ReallocStats:
    """What one reallocation did; `as_dict()` for logging."""

    method: str
    solver: str  # the library routine(s) that did the matching
    vocab_size: int
    num_rows: int
    num_cols: int
    k: int
    cells_per_word: int | None  # exact: cells kept per word from its k x k grid (None: all)
    cost_before: float  # total float cost of the current allocation
    cost_after: float  # total float cost of the returned allocation (<= cost_before)
    words_moved: int
    seconds: float
    solver_seconds: float  # the part of `seconds` spent inside the matching solver(s)
    num_candidate_arcs: int  # word -> cell arcs (two_stage: word -> row arcs)
    cost_scale: float  # integer levels per unit of cost handed to OR-Tools (nan for dense)
    kept_current: bool  # the solved matching was worse in float cost (rounding), current kept
    tiers: int  # exact: matchings solved in turn, words grouped by the range of their costs (0: one)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


# -- cost input --------------------------------------------------------------------------


def _cost_blocks(row_cost: np.ndarray | CostBlocks, col_cost: np.ndarray | None, current: Allocation) -> CostBlocks:
    """Array or callable input as a callable `costs(start, stop) -> (A_block, B_block)`."""
    if callable(row_cost):
        if col_cost is not None:
            raise ValueError(
                "row_cost is a callable costs(start, stop) -> (A_block, B_block), so col_cost must "
                "be None (the callable already returns the column costs)"
            )
        return row_cost
    if col_cost is None:
        raise ValueError("col_cost is missing: pass the (V, C) column costs, or a callable as row_cost")
    row, col = np.asarray(row_cost), np.asarray(col_cost)
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    for name, arr, width, what in (("row_cost", row, R, "row"), ("col_cost", col, C, "column")):
        if arr.shape != (V, width):
            raise ValueError(
                f"{name} has shape {arr.shape}, but the current allocation needs ({V}, {width}): "
                f"one line per word, one entry per table {what}"
            )
    return lambda start, stop: (row[start:stop], col[start:stop])


def _block_size(block_size: int | None, current: Allocation) -> int:
    if block_size is None:
        return max(1, _BLOCK_ENTRIES // (current.num_rows + current.num_cols))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 word, got {block_size}")
    return block_size


def allocation_cost(
    row_cost: np.ndarray | CostBlocks,
    col_cost: np.ndarray | None,
    allocation: Allocation,
    *,
    block_size: int | None = None,
) -> float:
    """Total cost sum_w A[w, row_of[w]] + B[w, col_of[w]] (col_cost=None for callable costs)."""
    costs = _cost_blocks(row_cost, col_cost, allocation)
    per_word = np.empty(allocation.vocab_size, dtype=np.float64)
    for start, stop, a, b in iter_blocks(costs, allocation, _block_size(block_size, allocation)):
        idx = np.arange(stop - start)
        rows, cols = allocation.row_of[start:stop], allocation.col_of[start:stop]
        per_word[start:stop] = pair_cost(a[idx, rows], b[idx, cols])
    return math.fsum(per_word)


# -- dense: the oracle -------------------------------------------------------------------


def _solve_dense(costs: CostBlocks, current: Allocation, block_size: int) -> Solution:
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    entries = V * R * C
    if entries > DENSE_MAX_ENTRIES:
        raise ValueError(
            f"method='dense' builds a V x (R*C) = {V} x {R * C} cost matrix ({entries:,} entries), more "
            f"than DENSE_MAX_ENTRIES={DENSE_MAX_ENTRIES:,}; use method='exact' for this vocabulary"
        )
    full = np.empty((V, R * C), dtype=np.float64)
    for start, stop, a, b in iter_blocks(costs, current, block_size):
        full[start:stop] = pair_cost(a[:, :, None], b[:, None, :]).reshape(stop - start, R * C)
    t0 = time.perf_counter()
    word_idx, new_cell = scipy.optimize.linear_sum_assignment(full)  # rectangular: V <= R*C
    seconds = time.perf_counter() - t0
    current_cost = full[np.arange(V), current.cell_of]
    solver = "scipy_linear_sum_assignment"
    return Solution(new_cell, current_cost, full[word_idx, new_cell], solver, entries, math.nan, seconds)


# -- entry point -------------------------------------------------------------------------


def auto_cells_per_word(vocab_size: int, k: int) -> int | None:
    """What cells_per_word="auto" keeps: None (all k^2) when that fits ARC_BUDGET arcs."""
    if vocab_size * k * k <= ARC_BUDGET:
        return None
    return max(DEFAULT_CELLS_PER_WORD, ARC_BUDGET // vocab_size)


def _check_int(name: str, value: object, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} ({meaning}) must be an integer >= {minimum}, got {value!r}")


def solve_reallocation(
    row_cost: np.ndarray | CostBlocks,
    col_cost: np.ndarray | None,
    current: Allocation,
    *,
    method: str = "exact",
    k: int = DEFAULT_K,
    cells_per_word: int | str | None = "auto",
    price_rounds: int = DEFAULT_PRICE_ROUNDS,
    keep_empty_cells: bool = False,
    cost_scale: float | None = None,
    block_size: int | None = None,
    mapper: Mapper = serial_map,
) -> tuple[Allocation, ReallocStats]:
    """A new allocation minimising sum_w A[w, row] + B[w, col], never worse than `current`.

    row_cost: (V, R) array A, or a callable costs(start, stop) -> (A_block, B_block) (then
        col_cost=None) so that V x R is never materialised.
    col_cost: (V, C) array B, or None with a callable row_cost.
    method: "exact" (sparse candidate graph), "two_stage" (rows, then columns per row),
        "dense" (full matrix, small V only) or "auto" (exact up to AUTO_EXACT_WORDS words,
        two_stage above).
    k: candidate rows and columns per word (exact: a k x k grid; two_stage: k rows).
    cells_per_word: exact keeps this many cells of the grid (None: all k^2; "auto": all while
        V x k^2 <= ARC_BUDGET, else ARC_BUDGET // V of them, at least DEFAULT_CELLS_PER_WORD).
    price_rounds: steps that set the row/column prices ranking candidates (0: raw costs).
    keep_empty_cells: exact only lets words trade cells occupied now (when R*C > V), a square
        problem that solves about 3x faster; the empty cells then never change.
    cost_scale: integer levels per unit of cost for OR-Tools; None picks the finest safe one
        (and lets exact match words in tiers when one scale cannot resolve them all).
    block_size: words per cost block; None keeps a block's A and B near 32 MB of float64.
    mapper: runs two_stage's work on word blocks and row groups (`realloc_common.Mapper`; the
        pipeline passes one that fans out to Ray tasks); the costs it shares must pickle.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    _check_int("k", k, 1, "candidate rows and columns per word")
    if cells_per_word == "auto":
        cells_per_word = auto_cells_per_word(current.vocab_size, int(k))
    elif cells_per_word is not None:
        _check_int("cells_per_word", cells_per_word, 1, "cells kept per word; None keeps all k^2")
    _check_int("price_rounds", price_rounds, 0, "steps setting candidate prices; 0 for none")
    costs = _cost_blocks(row_cost, col_cost, current)
    block_size = _block_size(block_size, current)
    if method == "auto":
        method = "exact" if current.vocab_size <= AUTO_EXACT_WORDS else "two_stage"
    if method == "exact":
        args = (int(k), cells_per_word, int(price_rounds), keep_empty_cells, cost_scale, block_size)
        solution = solve_exact(costs, current, *args)
    elif method == "two_stage":
        solution = solve_two_stage(costs, current, int(k), int(price_rounds), cost_scale, block_size, mapper)
    else:
        solution = _solve_dense(costs, current, block_size)
    cost_before, cost_after = math.fsum(solution.current_cost), math.fsum(solution.new_cost)
    # Integer rounding (and, in two_stage, stage 1 ignoring B) can yield a matching that is
    # worse in float cost than the current allocation, which is then the better answer.
    kept_current = cost_after > cost_before
    if kept_current:
        allocation, cost_after = current, cost_before
    else:
        allocation = Allocation.from_cells(solution.new_cell, current.num_rows, current.num_cols)
    return allocation, ReallocStats(
        method=method,
        solver=solution.solver,
        vocab_size=current.vocab_size,
        num_rows=current.num_rows,
        num_cols=current.num_cols,
        k=int(k),
        cells_per_word=cells_per_word if method == "exact" else None,
        cost_before=cost_before,
        cost_after=cost_after,
        words_moved=current.moved_words(allocation),
        seconds=time.perf_counter() - t0,
        solver_seconds=solution.solver_seconds,
        num_candidate_arcs=solution.num_arcs,
        cost_scale=solution.cost_scale,
        kept_current=kept_current,
        tiers=solution.tiers,
    )
