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
             occurrences), words are matched in tiers, widest cost range first (`_tiers`).
  two_stage  words -> rows as a transportation problem (row capacity C), then the words of each
             row onto its columns (`assign_columns_in_row`): R independent problems.
  dense      scipy's linear_sum_assignment on the full V x (R*C) matrix: the oracle for tests.

Costs come as arrays (A (V, R), B (V, C)) or as a callable `costs(start, stop) -> (A_block,
B_block)` for the words [start, stop), so V x R is never held at once (V = 10M). Arrays are
wrapped into such a callable; everything below reads costs block by block.

Files: this one holds the entry point, the exact and dense methods; realloc_two_stage.py the
two_stage method; realloc_common.py the cost-block reading, candidate prices and OR-Tools
solvers both share.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from lightrnn.allocation import Allocation
from lightrnn.realloc_common import (
    _LSA_BUDGET,
    _MAX_LEVELS,
    CostBlocks,
    _assignment,
    _balancing_prices,
    _checked,
    _flow,
    _iter_blocks,
    _k_smallest,
    _pair_cost,
    _Solution,
)
from lightrnn.realloc_two_stage import _solve_two_stage, assign_columns_in_row

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
    "ReallocStats",
    "allocation_cost",
    "assign_columns_in_row",
    "auto_cells_per_word",
    "solve_reallocation",
]

METHODS = ("exact", "two_stage", "dense")
DEFAULT_K = 10  # candidate rows and columns per word, as in DESIGN.md's PTB experiment
# exact keeps every cell of a word's k x k grid while the graph stays under ARC_BUDGET arcs
# (V = 10k: all 100), and otherwise the word's ARC_BUDGET // V cheapest cells by priced cost,
# at least DEFAULT_CELLS_PER_WORD (V = 1M: 16 cells, 17M arcs with the current cells; solved
# in 82 s on 2 cores at 1.9 GB peak on count-scaled costs, where the full 10 x 10 grid, 101M
# arcs, would blow both budgets). On count-scaled costs at V = 10k the gap to the dense optimum
# is 6.9e-3 (jobs/bench_realloc.py --vs-dense; README, "Reallocation solver").
DEFAULT_CELLS_PER_WORD = 16
ARC_BUDGET = 1 << 24
# exact matches words in tiers of spread (the range of a word's candidate costs), widest first,
# when one matching would leave the median word fewer than TIER_MIN_LEVELS integer cost levels:
# the UPPER_SHARE of words with the widest spreads in tiers at most TIER_RATIO apart, then the
# rest in one assignment (V = 1M, count-scaled costs: 5 tiers, 82 s; README, "Reallocation solver")
TIER_MIN_LEVELS = 4096
TIER_RATIO = 32.0
UPPER_SHARE = 0.2
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
    for start, stop, a, b in _iter_blocks(costs, allocation, _block_size(block_size, allocation)):
        idx = np.arange(stop - start)
        rows, cols = allocation.row_of[start:stop], allocation.col_of[start:stop]
        per_word[start:stop] = _pair_cost(a[idx, rows], b[idx, cols])
    return math.fsum(per_word)


# -- exact: the sparse candidate graph ---------------------------------------------------


def _exact_candidates(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    cells_per_word: int | None,
    price_rounds: int,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arcs grouped by word: (word, cell, float cost, reduced cost), each word's current cost,
    and each word's spread (its largest reduced cost)."""
    R, C = current.num_rows, current.num_cols
    row_price, col_price = _balancing_prices(costs, current, price_rounds)
    k_rows, k_cols = min(k, R), min(k, C)
    grid = k_rows * k_cols
    keep = grid if cells_per_word is None else min(cells_per_word, grid)
    cell_dtype = np.int32 if R * C < 2**31 else np.int64
    words, cells, arc_costs, reduced = [], [], [], []
    current_cost = np.empty(current.vocab_size, dtype=np.float64)
    spread = np.empty(current.vocab_size, dtype=np.float64)
    for start, stop, a, b in _iter_blocks(costs, current, block_size):
        n = stop - start
        idx = np.arange(n)[:, None]
        priced_a, priced_b = a + row_price, b + col_price
        rows, cols = _k_smallest(priced_a, k_rows), _k_smallest(priced_b, k_cols)  # (n, k)
        cell = (rows[:, :, None] * C + cols[:, None, :]).reshape(n, grid)
        cost = _pair_cost(a[idx, rows][:, :, None], b[idx, cols][:, None, :]).reshape(n, grid)
        if keep < grid:
            rank = _pair_cost(priced_a[idx, rows][:, :, None], priced_b[idx, cols][:, None, :]).reshape(n, grid)
            best = np.argpartition(rank, keep - 1, axis=1)[:, :keep]
            cell, cost = np.take_along_axis(cell, best, axis=1), np.take_along_axis(cost, best, axis=1)
        # Every word also keeps its current cell (once), so the current allocation is a perfect
        # matching of this graph: a solution exists and is never worse than the current one.
        cur_cell = current.cell_of[start:stop]
        cur_cost = _pair_cost(a[idx[:, 0], current.row_of[start:stop]], b[idx[:, 0], current.col_of[start:stop]])
        current_cost[start:stop] = cur_cost
        mask = np.ones((n, cell.shape[1] + 1), dtype=bool)
        mask[:, -1] = ~(cell == cur_cell[:, None]).any(axis=1)
        cell = np.concatenate([cell, cur_cell[:, None]], axis=1)
        cost = np.concatenate([cost, cur_cost[:, None]], axis=1)
        words.append(np.broadcast_to(np.arange(start, stop, dtype=np.int32)[:, None], mask.shape)[mask])
        cells.append(cell[mask].astype(cell_dtype))
        arc_costs.append(cost[mask])
        word_reduced = cost - cost.min(axis=1, keepdims=True)
        spread[start:stop] = word_reduced.max(axis=1)
        reduced.append(word_reduced[mask])
    return (
        np.concatenate(words),
        np.concatenate(cells),
        np.concatenate(arc_costs),
        np.concatenate(reduced),
        current_cost,
        spread,
    )


def _compact(ids: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct ids, ascending; each entry's index among them) for ids in [0, size)."""
    used = np.zeros(size, dtype=bool)
    used[ids] = True
    return np.flatnonzero(used), (np.cumsum(used, dtype=np.int64) - 1)[ids].astype(np.int32)


def _match(
    word: np.ndarray, cell: np.ndarray, reduced: np.ndarray, num_cells: int, cost_scale: float | None
) -> tuple[np.ndarray, str, float, float]:
    """Min-cost matching of every word in `word` onto distinct cells along the given arcs.

    Returns (which arcs are chosen, solver, cost scale, seconds)."""
    words, left = _compact(word, int(word.max()) + 1)
    cells, right = _compact(cell, num_cells)
    if cells.size == words.size:
        # As many candidate cells as words: a perfect matching, for OR-Tools' linear sum
        # assignment (about 5x faster than min-cost flow, STACK_NOTES section 5).
        mate, scale, seconds = _assignment(left, right, reduced, words.size, cost_scale)
        return right == mate[left], "ortools_linear_sum_assignment", scale, seconds
    # Some cells stay empty, which a perfect-matching solver only expresses with O(words x
    # empty cells) extra arcs; square reductions with mirrored arcs ran 40-400x slower.
    # Min-cost flow takes the rectangular problem as it is (about 3x slower than the square
    # case at V = 1M; keep_empty_cells=True avoids it).
    chosen, scale, seconds = _flow(left, right, reduced, words.size, cells.size, 1, cost_scale)
    return chosen, "ortools_min_cost_flow", scale, seconds


def _tiers(spread: np.ndarray, num_words: int) -> list[np.ndarray]:
    """Words grouped by spread, widest first, each group matched in turn ([]: one matching).

    OR-Tools' assignment takes integer costs whose largest value times n^2 stays under 2^62,
    so in one matching the word with the widest costs sets the resolution of every other.
    When that leaves the median word fewer than TIER_MIN_LEVELS integer levels, the
    (1 - UPPER_SHARE) of words with the narrowest spreads form the last tier, one fast square
    assignment, and the others go before it in tiers whose spreads differ by at most
    TIER_RATIO (rectangular problems, for min-cost flow)."""
    positive = spread[spread > 0]
    if positive.size == 0:
        return []
    levels = min(_LSA_BUDGET // (num_words + 1) ** 2, _MAX_LEVELS)
    top = float(positive.max())
    if float(np.median(positive)) * levels / top >= TIER_MIN_LEVELS:
        return []
    bottom = max(float(np.quantile(spread, 1 - UPPER_SHARE)), float(positive.min()))
    tiers = []
    while top > bottom:
        low = max(top / TIER_RATIO, bottom)
        tiers.append((spread > low) & (spread <= top))
        top = low
    tiers.append(spread <= bottom)
    return [t for t in tiers if t.any()]


def _pair_costs(
    costs: CostBlocks, current: Allocation, words: np.ndarray, cells: np.ndarray, block_size: int
) -> np.ndarray:
    """float64 cost of each (word, cell) pair, reading only short word ranges around the words."""
    R, C = current.num_rows, current.num_cols
    order = np.argsort(words, kind="stable")
    ids = words[order]
    out = np.empty(words.size, dtype=np.float64)
    lo = 0
    while lo < ids.size:
        # one read per run of nearby words, at most block_size words long
        start = int(ids[lo])
        hi = lo + 1
        while hi < ids.size and ids[hi] - ids[hi - 1] <= 256 and ids[hi] < start + block_size:
            hi += 1
        stop = int(ids[hi - 1]) + 1
        a, b = costs(start, stop)
        a = _checked(a, "row_cost", start, (stop - start, R))
        b = _checked(b, "col_cost", start, (stop - start, C))
        pick = order[lo:hi]
        out[pick] = _pair_cost(a[words[pick] - start, cells[pick] // C], b[words[pick] - start, cells[pick] % C])
        lo = hi
    return out


def _solve_exact(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    cells_per_word: int | None,
    price_rounds: int,
    keep_empty_cells: bool,
    cost_scale: float | None,
    block_size: int,
) -> _Solution:
    V, num_cells = current.vocab_size, current.num_cells
    word, cell, arc_cost, reduced, current_cost, spread = _exact_candidates(
        costs, current, k, cells_per_word, price_rounds, block_size
    )
    if keep_empty_cells:
        # Only cells occupied now stay candidates (every word keeps its own), so exactly V
        # cells remain: a square problem for the faster assignment solver.
        occupied = np.zeros(num_cells, dtype=bool)
        occupied[current.cell_of] = True
        keep = occupied[cell]
        word, cell, arc_cost, reduced = word[keep], cell[keep], arc_cost[keep], reduced[keep]
    new_cell = np.empty(V, dtype=np.int64)
    new_cost = np.empty(V, dtype=np.float64)
    tiers = _tiers(spread, V) if cost_scale is None else []
    if not tiers:
        chosen, solver, scale, seconds = _match(word, cell, reduced, num_cells, cost_scale)
        new_cell[word[chosen]] = cell[chosen]
        new_cost[word[chosen]] = arc_cost[chosen]
        return _Solution(new_cell, current_cost, new_cost, solver, int(word.size), scale, seconds)
    del reduced
    # Costs are sums over a word's occurrences, so they span orders of magnitude, and in one
    # matching the rare words' costs would round to a few integer levels (at V = 1M a fraction
    # of one, and OR-Tools took 5x longer on the ties). The tiers are matched in turn, widest
    # spread first, each at its own scale on the cells the earlier ones left: a word of an
    # earlier tier loses more by missing a cell than one of a later tier does.
    #
    # Every word has a home, a cell no earlier tier took: its current cell, or, once an earlier
    # tier takes that, a cell an earlier tier's word left. Homes are distinct and every word
    # has an arc to its own, so each tier's matching exists and the result is never worse.
    home = current.cell_of.astype(np.int64)
    taken = np.zeros(num_cells, dtype=bool)
    extra = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))  # home arcs
    unplaced = np.ones(V, dtype=bool)
    num_arcs, seconds, solvers = int(word.size), 0.0, set()
    for tier in tiers:
        keep = tier[word] & ~taken[cell]
        mine = tier[extra[0]] & ~taken[extra[1]]
        w = np.concatenate([word[keep], extra[0][mine]])
        c = np.concatenate([cell[keep], extra[1][mine]])
        cost = np.concatenate([arc_cost[keep], extra[2][mine]])
        lowest = np.full(V, np.inf)
        np.minimum.at(lowest, w, cost)
        tier_reduced = cost - lowest[w]
        # a home arc can cost far more than the tier's candidates; clipped at their widest spread
        # for the solver, it stays the word's dearest arc (stats count float costs)
        homes = slice(int(keep.sum()), None)
        tier_reduced[homes] = np.minimum(tier_reduced[homes], spread[tier].max())
        chosen, solver, scale, tier_seconds = _match(w, c, tier_reduced, num_cells, None)
        seconds, solvers = seconds + tier_seconds, solvers | {solver}
        new_cell[w[chosen]], new_cost[w[chosen]] = c[chosen], cost[chosen]
        taken[c[chosen]] = True
        unplaced &= ~tier
        displaced = np.flatnonzero(unplaced & taken[home])
        freed = home[tier & ~taken[home]][: displaced.size]
        if displaced.size:
            home[displaced] = freed
            extra = (
                np.concatenate([extra[0], displaced]),
                np.concatenate([extra[1], freed]),
                np.concatenate([extra[2], _pair_costs(costs, current, displaced, freed, block_size)]),
            )
            num_arcs += displaced.size
    return _Solution(
        new_cell,
        current_cost,
        new_cost,
        "+".join(sorted(solvers)),
        num_arcs,
        scale,  # the last tier's, the finest
        seconds,
        tiers=len(tiers),
    )


# -- dense: the oracle -------------------------------------------------------------------


def _solve_dense(costs: CostBlocks, current: Allocation, block_size: int) -> _Solution:
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    entries = V * R * C
    if entries > DENSE_MAX_ENTRIES:
        raise ValueError(
            f"method='dense' builds a V x (R*C) = {V} x {R * C} cost matrix ({entries:,} entries), more "
            f"than DENSE_MAX_ENTRIES={DENSE_MAX_ENTRIES:,}; use method='exact' for this vocabulary"
        )
    full = np.empty((V, R * C), dtype=np.float64)
    for start, stop, a, b in _iter_blocks(costs, current, block_size):
        full[start:stop] = _pair_cost(a[:, :, None], b[:, None, :]).reshape(stop - start, R * C)
    t0 = time.perf_counter()
    word_idx, new_cell = scipy.optimize.linear_sum_assignment(full)  # rectangular: V <= R*C
    seconds = time.perf_counter() - t0
    current_cost = full[np.arange(V), current.cell_of]
    solver = "scipy_linear_sum_assignment"
    return _Solution(new_cell, current_cost, full[word_idx, new_cell], solver, entries, math.nan, seconds)


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
) -> tuple[Allocation, ReallocStats]:
    """A new allocation minimising sum_w A[w, row] + B[w, col], never worse than `current`.

    row_cost: (V, R) array A, or a callable costs(start, stop) -> (A_block, B_block) (then
        col_cost=None) so that V x R is never materialised.
    col_cost: (V, C) array B, or None with a callable row_cost.
    method: "exact" (sparse candidate graph), "two_stage" (rows, then columns per row) or
        "dense" (full matrix, small V only).
    k: candidate rows and columns per word (exact: a k x k grid; two_stage: k rows).
    cells_per_word: exact keeps this many cells of the grid (None: all k^2; "auto": all while
        V x k^2 <= ARC_BUDGET, else ARC_BUDGET // V of them, at least DEFAULT_CELLS_PER_WORD).
    price_rounds: steps that set the row/column prices ranking candidates (0: raw costs).
    keep_empty_cells: exact only lets words trade cells occupied now (when R*C > V), a square
        problem that solves about 3x faster; the empty cells then never change.
    cost_scale: integer levels per unit of cost for OR-Tools; None picks the finest safe one
        (and lets exact match words in tiers when one scale cannot resolve them all).
    block_size: words per cost block; None keeps a block's A and B near 32 MB of float64.
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
    if method == "exact":
        solution = _solve_exact(
            costs,
            current,
            int(k),
            cells_per_word,
            int(price_rounds),
            keep_empty_cells,
            cost_scale,
            block_size,
        )
    elif method == "two_stage":
        solution = _solve_two_stage(costs, current, int(k), int(price_rounds), cost_scale, block_size)
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
