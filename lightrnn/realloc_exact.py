"""The exact reallocation method: a min-cost matching on a sparse candidate graph.

Each word's candidates are the cheapest cells of its k best rows x k best columns, ranked by
cost plus the row and column prices that spread demand (realloc_common.balancing_prices),
and its current cell. OR-Tools matches the words onto distinct cells along those arcs. When
words' costs span too many orders of magnitude for one integer scale, words are matched in
tiers, widest cost range first (`_tiers`).
"""

from __future__ import annotations

import numpy as np

from lightrnn.allocation import Allocation
from lightrnn.realloc_common import (
    LSA_BUDGET,
    MAX_LEVELS,
    CostBlocks,
    Solution,
    assignment,
    balancing_prices,
    checked_block,
    flow_match,
    iter_blocks,
    k_smallest,
    pair_cost,
)

# exact matches words in tiers of spread (the range of a word's candidate costs), widest first,
# when one matching would leave the median word fewer than TIER_MIN_LEVELS integer cost levels:
# the UPPER_SHARE of words with the widest spreads in tiers at most TIER_RATIO apart, then the
# rest in one assignment (docs/design.md, "Integer costs and tiers"; `python -m jobs.bench realloc` reports tiers)
TIER_MIN_LEVELS = 4096
TIER_RATIO = 32.0
UPPER_SHARE = 0.2


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
    row_price, col_price = balancing_prices(costs, current, price_rounds)
    k_rows, k_cols = min(k, R), min(k, C)
    grid = k_rows * k_cols
    keep = grid if cells_per_word is None else min(cells_per_word, grid)
    cell_dtype = np.int32 if R * C < 2**31 else np.int64
    words, cells, arc_costs, reduced = [], [], [], []
    current_cost = np.empty(current.vocab_size, dtype=np.float64)
    spread = np.empty(current.vocab_size, dtype=np.float64)
    for start, stop, a, b in iter_blocks(costs, current, block_size):
        n = stop - start
        idx = np.arange(n)[:, None]
        priced_a, priced_b = a + row_price, b + col_price
        rows, cols = k_smallest(priced_a, k_rows), k_smallest(priced_b, k_cols)  # (n, k)
        cell = (rows[:, :, None] * C + cols[:, None, :]).reshape(n, grid)
        cost = pair_cost(a[idx, rows][:, :, None], b[idx, cols][:, None, :]).reshape(n, grid)
        if keep < grid:
            rank = pair_cost(priced_a[idx, rows][:, :, None], priced_b[idx, cols][:, None, :]).reshape(n, grid)
            best = np.argpartition(rank, keep - 1, axis=1)[:, :keep]
            cell, cost = np.take_along_axis(cell, best, axis=1), np.take_along_axis(cost, best, axis=1)
        # Every word also keeps its current cell (once), so the current allocation is a perfect
        # matching of this graph: a solution exists and is never worse than the current one.
        cur_cell = current.cell_of[start:stop]
        cur_cost = pair_cost(a[idx[:, 0], current.row_of[start:stop]], b[idx[:, 0], current.col_of[start:stop]])
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
        # assignment, several times faster than min-cost flow on the same graph (docs/design.md).
        mate, scale, seconds = assignment(left, right, reduced, words.size, cost_scale)
        return right == mate[left], "ortools_linear_sum_assignment", scale, seconds
    # Some cells stay empty, which a perfect-matching solver only expresses with O(words x
    # empty cells) extra arcs; square reductions with mirrored arcs ran 40-400x slower.
    # Min-cost flow takes the rectangular problem as it is (about 3x slower than the square
    # case at V = 1M; keep_empty_cells=True avoids it).
    chosen, scale, seconds = flow_match(left, right, reduced, words.size, cells.size, 1, cost_scale)
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
    levels = min(LSA_BUDGET // (num_words + 1) ** 2, MAX_LEVELS)
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
        a = checked_block(a, "row_cost", start, (stop - start, R))
        b = checked_block(b, "col_cost", start, (stop - start, C))
        pick = order[lo:hi]
        out[pick] = pair_cost(a[words[pick] - start, cells[pick] // C], b[words[pick] - start, cells[pick] % C])
        lo = hi
    return out


def solve_exact(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    cells_per_word: int | None,
    price_rounds: int,
    keep_empty_cells: bool,
    cost_scale: float | None,
    block_size: int,
) -> Solution:
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
        return Solution(new_cell, current_cost, new_cost, solver, int(word.size), scale, seconds)
    del reduced
    return _match_in_tiers(costs, current, tiers, (word, cell, arc_cost), current_cost, spread, block_size)


def _match_in_tiers(
    costs: CostBlocks,
    current: Allocation,
    tiers: list[np.ndarray],
    arcs: tuple[np.ndarray, np.ndarray, np.ndarray],
    current_cost: np.ndarray,
    spread: np.ndarray,
    block_size: int,
) -> Solution:
    """Match the words tier by tier on the candidate `arcs` (word, cell, float cost)."""
    V, num_cells = current.vocab_size, current.num_cells
    word, cell, arc_cost = arcs
    new_cell = np.empty(V, dtype=np.int64)
    new_cost = np.empty(V, dtype=np.float64)
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
    num_arcs, seconds, solvers, scale = int(word.size), 0.0, set(), 1.0
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
    return Solution(
        new_cell,
        current_cost,
        new_cost,
        "+".join(sorted(solvers)),
        num_arcs,
        scale,  # the last tier's, the finest
        seconds,
        tiers=len(tiers),
    )
