"""Word reallocation: re-solve which cell each word sits in (Li et al., NIPS 2016, section 3.2).

Placing word w in cell (i, j) costs A[w, i] + B[w, j] (lightrnn/costs.py); the new allocation
is a minimum-cost matching of the V words onto distinct cells of the R x C table.

    words     candidate cells (exact)
    w0 -----> (0, 3)      each word: the cheapest cells of its k best rows x k best columns
       \\---> (2, 1)      (ranked by cost + a per-row and per-column price that spreads demand),
    w1 -----> (2, 1)      plus its current cell, so the current allocation is always a feasible
       \\---> (1, 0) cur  matching and the answer is never worse than it

Methods:
  exact      min-cost matching on that sparse candidate graph (OR-Tools).
  two_stage  words -> rows as a transportation problem (row capacity C), then the words of each
             row onto its columns (`assign_columns_in_row`): R independent problems.
  dense      scipy's linear_sum_assignment on the full V x (R*C) matrix: the oracle for tests.

Costs come as arrays (A (V, R), B (V, C)) or as a callable `costs(start, stop) -> (A_block,
B_block)` for the words [start, stop), so V x R is never held at once (V = 10M). Arrays are
wrapped into such a callable; everything below reads costs block by block.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import scipy.optimize
from ortools.graph.python import linear_sum_assignment, min_cost_flow

from lightrnn.allocation import Allocation

CostBlocks = Callable[[int, int], tuple[np.ndarray, np.ndarray]]

METHODS = ("exact", "two_stage", "dense")
DEFAULT_K = 10  # candidate rows and columns per word, as in DESIGN.md's PTB experiment
# exact keeps a word's 16 cheapest cells (by priced cost) of its k x k grid, plus its current
# cell: at V = 1M, 17M arcs, solved in 60 s (35 s in OR-Tools) on 2 cores at 1.4 GB peak; the
# full 10 x 10 grid (101M arcs) would blow both budgets. On low-rank costs at V = 10k the gap
# to the dense optimum is 4e-5 (without prices 7e-2; jobs/bench_realloc.py --vs-dense).
DEFAULT_CELLS_PER_WORD = 16
DEFAULT_PRICE_ROUNDS = 50  # subgradient steps for the candidate prices; 0 ranks by raw cost
DENSE_MAX_ENTRIES = 25_000_000  # V x (R*C) float64 entries `dense` may build (200 MB)
_BLOCK_ENTRIES = 1 << 22  # A and B entries per cost block (32 MB in float64)
_GATHER_BYTES = 1 << 30  # two_stage: column costs of the words of a group of rows
_PRICE_SAMPLE_ENTRIES = 1 << 25  # words sampled to set prices: 128 MB of float32 costs
_PRICE_SAMPLE_CHUNKS = 16  # contiguous ranges spread over the ids (ids are often frequency ranks)
# OR-Tools 9.15 truncates float costs, so costs are scaled to int64 here. It refuses to solve
# (POSSIBLE_OVERFLOW, BAD_COST_RANGE) once max cost x n^2 (assignment; n = words) or max cost x n
# (min-cost flow; n = nodes) nears 2^62 (measured for n = 10 .. 1e5; STACK_NOTES section 5);
# these budgets keep two bits below that. More than 2^31 levels would buy nothing but more
# cost-scaling phases.
_LSA_BUDGET = 1 << 58
_MCF_BUDGET = 1 << 57
_MAX_LEVELS = 1 << 31


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

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class _Solution:
    """What a method hands back to `solve_reallocation`."""

    new_cell: np.ndarray  # (V,) flat cell of every word
    current_cost: np.ndarray  # (V,) float64 cost of each word in its current cell
    new_cost: np.ndarray  # (V,) float64 cost of each word in its new cell
    solver: str
    num_arcs: int
    cost_scale: float
    solver_seconds: float


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


def _checked(values: np.ndarray, name: str, start: int, shape: tuple[int, int]) -> np.ndarray:
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


def _iter_blocks(
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
            _checked(a, "row_cost", start, (stop - start, R)),
            _checked(b, "col_cost", start, (stop - start, C)),
        )


def _pair_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A + B in float64, computed the same way everywhere so that equal cells give equal floats."""
    return a.astype(np.float64, copy=False) + b.astype(np.float64, copy=False)


def _k_smallest(values: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of the k smallest entries of each row, unordered."""
    n, width = values.shape
    if k >= width:
        return np.broadcast_to(np.arange(width), (n, width))
    return np.argpartition(values, k - 1, axis=1)[:, :k]


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


# -- candidate prices --------------------------------------------------------------------


def _balancing_prices(costs: CostBlocks, current: Allocation, rounds: int) -> tuple[np.ndarray, np.ndarray]:
    """(R,) row and (C,) column prices that spread a sample of words evenly over the table.

    Low-rank costs make the same few rows and columns the cheapest for most words, so raw
    top-k candidates all crowd into them and most words cannot move: at V = 1M, 16 raw cells
    per word moved 40% of the words and got less than half of two_stage's cost reduction. The
    prices are Lagrange multipliers of the relaxed capacities (a row holds C words, a column
    R), set by projected subgradient steps on a word sample. They only choose which arcs
    exist; every arc keeps its true cost, so the matching stays exact on its graph.
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
        parts.append((_checked(a, "row_cost", start, (size, R)), _checked(b, "col_cost", start, (size, C))))
    prices = []
    for side, slots in ((0, C), (1, R)):
        values = np.concatenate([p[side] for p in parts]).astype(np.float32)
        capacity = slots * values.shape[0] / V  # this sample's share of a row's (column's) cells
        step = float(values.std())  # steps in the units of the costs
        price = np.zeros(values.shape[1], np.float32)
        for t in range(rounds):
            demand = np.bincount(np.argmin(values + price, axis=1), minlength=values.shape[1])
            excess = (demand - capacity) / capacity
            price = np.maximum(0.0, price + (step / math.sqrt(t + 1)) * excess).astype(np.float32)
        prices.append(price)
    return prices[0], prices[1]


# -- integer costs and the OR-Tools solvers ----------------------------------------------


def _integer_costs(reduced: np.ndarray, budget: int, cost_scale: float | None) -> tuple[np.ndarray, float]:
    """int64 costs for OR-Tools and the scale that made them.

    `reduced` is >= 0: each word's cheapest candidate was subtracted, a per-word constant that
    no matching changes. The default scale maps its maximum to `budget` levels.
    """
    top = float(reduced.max()) if reduced.size else 0.0
    if cost_scale is None:
        scale = min(budget, _MAX_LEVELS) / top if top > 0 else 1.0
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


def _assignment(
    word: np.ndarray, right: np.ndarray, reduced: np.ndarray, n: int, cost_scale: float | None
) -> tuple[np.ndarray, float, float]:
    """Perfect matching of n words onto n right nodes: (right node of each word, scale, seconds)."""
    int_cost, scale = _integer_costs(reduced, _LSA_BUDGET // (n + 1) ** 2, cost_scale)
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


def _flow(
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
    int_cost, scale = _integer_costs(reduced, _MCF_BUDGET // (sink + 2), cost_scale)
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


# -- exact: the sparse candidate graph ---------------------------------------------------


def _exact_candidates(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    cells_per_word: int | None,
    price_rounds: int,
    block_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arcs grouped by word: (word, cell, float cost, reduced cost), and each word's current cost."""
    R, C = current.num_rows, current.num_cols
    row_price, col_price = _balancing_prices(costs, current, price_rounds)
    k_rows, k_cols = min(k, R), min(k, C)
    grid = k_rows * k_cols
    keep = grid if cells_per_word is None else min(cells_per_word, grid)
    cell_dtype = np.int32 if R * C < 2**31 else np.int64
    words, cells, arc_costs, reduced = [], [], [], []
    current_cost = np.empty(current.vocab_size, dtype=np.float64)
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
        reduced.append((cost - cost.min(axis=1, keepdims=True))[mask])
    return (
        np.concatenate(words),
        np.concatenate(cells),
        np.concatenate(arc_costs),
        np.concatenate(reduced),
        current_cost,
    )


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
    V = current.vocab_size
    word, cell, arc_cost, reduced, current_cost = _exact_candidates(
        costs, current, k, cells_per_word, price_rounds, block_size
    )
    if keep_empty_cells:
        # Only cells occupied now stay candidates (every word keeps its own), so exactly V
        # cells remain: a square problem for the faster assignment solver.
        occupied = np.zeros(current.num_cells, dtype=bool)
        occupied[current.cell_of] = True
        keep = occupied[cell]
        word, cell, arc_cost, reduced = word[keep], cell[keep], arc_cost[keep], reduced[keep]
    used = np.zeros(current.num_cells, dtype=bool)
    used[cell] = True
    cell_ids = np.flatnonzero(used)  # compact ids 0..M-1 for the cells that are someone's candidate
    right = (np.cumsum(used, dtype=np.int64) - 1)[cell].astype(np.int32)
    if cell_ids.size == V:
        # As many candidate cells as words: a perfect matching, for OR-Tools' linear sum
        # assignment (about 5x faster than min-cost flow, STACK_NOTES section 5).
        mate, scale, seconds = _assignment(word, right, reduced, V, cost_scale)
        new_cell = cell_ids[mate]
        solver = "ortools_linear_sum_assignment"
    else:
        # Some cells stay empty, which a perfect-matching solver only expresses with
        # O(V x empty cells) extra arcs; square reductions with mirrored arcs ran 40-400x
        # slower. Min-cost flow takes the rectangular problem as it is (about 3x slower than
        # the square case at V = 1M; keep_empty_cells=True avoids it).
        chosen, scale, seconds = _flow(word, right, reduced, V, cell_ids.size, 1, cost_scale)
        new_cell = np.empty(V, dtype=np.int64)
        new_cell[word[chosen]] = cell[chosen]
        solver = "ortools_min_cost_flow"
    del reduced
    chosen = cell == new_cell[word]  # one arc per word: a word's candidate cells are distinct
    new_cost = np.empty(V, dtype=np.float64)
    new_cost[word[chosen]] = arc_cost[chosen]
    return _Solution(new_cell, current_cost, new_cost, solver, int(word.size), scale, seconds)


# -- two_stage: rows, then columns inside each row ---------------------------------------


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
    row_price, _ = _balancing_prices(costs, current, price_rounds)
    k_rows = min(k, R)
    words, rows, arc_costs, reduced = [], [], [], []
    current_cost = np.empty(V, dtype=np.float64)
    for start, stop, a, b in _iter_blocks(costs, current, block_size):
        idx = np.arange(stop - start)
        cur_row = current.row_of[start:stop]
        current_cost[start:stop] = _pair_cost(a[idx, cur_row], b[idx, current.col_of[start:stop]])
        # the current row joins every word's list, so the current rows are a feasible flow
        row = np.concatenate([_k_smallest(a + row_price, k_rows), cur_row[:, None]], axis=1)
        cost = a[idx[:, None], row].astype(np.float64)
        mask = np.ones(row.shape, dtype=bool)
        mask[:, -1] = ~(row[:, :-1] == cur_row[:, None]).any(axis=1)
        words.append(np.broadcast_to(np.arange(start, stop, dtype=np.int32)[:, None], mask.shape)[mask])
        rows.append(row[mask].astype(np.int32))
        arc_costs.append(cost[mask])
        reduced.append((cost - cost.min(axis=1, keepdims=True))[mask])
    word, row, arc_cost = np.concatenate(words), np.concatenate(rows), np.concatenate(arc_costs)
    chosen, scale, seconds = _flow(word, row, np.concatenate(reduced), V, R, C, cost_scale)
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
        b = _checked(costs(start, stop)[1], "col_cost", start, (stop - start, C))
        out[order[lo:hi]] = b[ascending[lo:hi] - start]
    return out


def _solve_two_stage(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    price_rounds: int,
    cost_scale: float | None,
    block_size: int,
) -> _Solution:
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
    return _Solution(new_row * C + new_col, current_cost, row_part + col_part, solver, num_arcs, scale, seconds)


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
    cells_per_word: int | None = DEFAULT_CELLS_PER_WORD,
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
    cells_per_word: exact keeps this many cells of the grid (None: all k^2).
    price_rounds: steps that set the row/column prices ranking candidates (0: raw costs).
    keep_empty_cells: exact only lets words trade cells occupied now (when R*C > V), a square
        problem that solves about 3x faster; the empty cells then never change.
    cost_scale: integer levels per unit of cost for OR-Tools; None picks the finest safe one.
    block_size: words per cost block; None keeps a block's A and B near 32 MB of float64.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    _check_int("k", k, 1, "candidate rows and columns per word")
    if cells_per_word is not None:
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
    )
