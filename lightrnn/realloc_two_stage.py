"""The two_stage reallocation method, for the largest vocabularies: words -> rows, then columns in each row.

    prices    row and column prices that spread demand (realloc_common.balancing_prices)
    stage 1   each word's k best rows by priced cost, in parallel over word blocks. The
              words with the most to lose (the widest range of candidate costs) are matched
              exactly, at most EXACT_ARCS arcs of them, by min-cost flow with row capacity C;
              the others take, widest first, their best candidate row that still has room,
              in rounds; the few whose candidates all filled go to the cheapest rows left
    stage 2   inside each row, its words onto distinct columns: each word's m best columns
              by priced cost plus a greedy column (so a perfect matching exists), solved by
              OR-Tools' assignment; rows in groups, in parallel

B plays no part in stage 1 (a word's column costs do not depend on its row), so the
result is not optimal in general; `jobs.bench realloc --vs-dense` measures the gap.
Work that grows with V x R or V x C (candidate rows, column costs) runs through a mapper
(`realloc_common.Mapper`: serial here, Ray tasks in the pipeline), so it uses every CPU
the caller has.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.optimize

from lightrnn.allocation import Allocation
from lightrnn.realloc_common import (
    CostBlocks,
    Mapper,
    Solution,
    assignment,
    balancing_prices,
    checked_block,
    costs_of_words,
    flow_match,
    k_smallest,
    serial_map,
)

EXACT_ARCS = 1 << 21  # stage 1 arcs matched by min-cost flow (the rest of the words go greedily)
COLUMNS_PER_WORD = 64  # stage 2 candidate columns per word, besides its greedy one
_GREEDY_WORDS = 1 << 20  # stage 1 words placed greedily at a time (bounds its temporaries)
LEFTOVER_WORDS = 1 << 14  # words whose full cost rows are read at once (stage 1 leftovers, stage 2 fallbacks)
_SPAN_WORDS = 1 << 17  # words per task of the candidate pass (it reads them block by block)
_GROUP_ENTRIES = 1 << 24  # candidate arcs per stage-2 task (its words x (m + 1))


def assign_columns_in_row(col_cost: np.ndarray) -> np.ndarray:
    """Columns for the n words placed in one row: a min-cost assignment onto distinct columns.

    col_cost: (n, C) float, B restricted to the row's words (n <= C). Returns (n,) column
    indices. A dense solve (scipy); `two_stage` itself uses a sparse one.
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


# -- greedy placement ------------------------------------------------------------------------


def greedy_rounds(
    choices: np.ndarray, priced: np.ndarray, room: np.ndarray, rounds: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Each word (rows of `choices`, in priority order) takes its cheapest choice that has room.

    choices: (n, k) target ids; priced: (n, k) their priced costs; room: (targets,) free
    places, updated in place. In each round every word still waiting proposes its cheapest
    choice with room, and each target accepts proposals in priority order while it has room.
    Returns (the target of each word, -1 if none was left; the words left, by priority).
    """
    n = choices.shape[0]
    taken = np.full(n, -1, dtype=np.int64)
    waiting = np.arange(n)
    for _ in range(rounds):
        if waiting.size == 0:
            break
        cost = np.where(room[choices[waiting]] > 0, priced[waiting], np.inf)
        pick = np.argmin(cost, axis=1)
        possible = np.isfinite(cost[np.arange(waiting.size), pick])
        proposers = waiting[possible]
        target = choices[proposers, pick[possible]]
        order = np.argsort(target, kind="stable")  # by target; priority order kept inside each
        target_sorted = target[order]
        rank = np.arange(target_sorted.size) - np.searchsorted(target_sorted, target_sorted, side="left")
        accepted = rank < room[target_sorted]
        winners = proposers[order[accepted]]
        taken[winners] = target_sorted[accepted]
        np.subtract.at(room, target_sorted[accepted], 1)
        waiting = waiting[taken[waiting] < 0]
        if not possible.any():
            break
    return taken, waiting


# -- one pass over the costs: every word's candidates ------------------------------------------


def _candidates(shared: tuple, span: tuple[int, int, np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    """A span of words' candidates, from one read of its costs, block by block.

    Rows: the k best by priced cost plus the current row, and A at them ((n, k + 1) each).
    Columns: the m best by priced cost and B at them ((n, m) each), B's largest and
    smallest entry of each word (the price of a column outside the candidates is bounded by
    the largest) and B at the current column. Stage 2 needs nothing else, so the costs are
    read once, whatever their source."""
    costs, row_price, col_price, k, m, num_rows, num_cols, block_size = shared
    start, stop, current_rows, current_cols = span
    col_type = np.int16 if num_cols <= np.iinfo(np.int16).max else np.int32
    parts = []
    for lo in range(start, stop, block_size):
        hi = min(lo + block_size, stop)
        a, b = costs(lo, hi)
        a = checked_block(a, "row_cost", lo, (hi - lo, num_rows))
        b = checked_block(b, "col_cost", lo, (hi - lo, num_cols))
        idx = np.arange(hi - lo)
        rows = np.empty((hi - lo, k + 1), dtype=np.int32)
        rows[:, :k] = k_smallest(a + row_price, k)
        rows[:, k] = current_rows[lo - start : hi - start]
        cols = k_smallest(b + col_price, m).astype(col_type)
        parts.append(
            (
                rows,
                a[idx[:, None], rows],  # in the source's precision, as the columns' costs
                cols,
                np.take_along_axis(b, cols, axis=1),  # in the source's precision: float32 from a model
                b.max(axis=1),
                b.min(axis=1),
                b[idx, current_cols[lo - start : hi - start]].astype(np.float64),
            )
        )
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(7))


def _gather(parts: Iterable[tuple[np.ndarray, ...]], total: int) -> tuple[np.ndarray, ...]:
    """The spans' candidates, in word order, copied into arrays of `total` rows as each span
    arrives: a part is dropped once copied, so the candidates are held once, whatever the mapper."""
    out: list[np.ndarray] = []
    at = 0
    for part in parts:
        if not out:
            out = [np.empty((total, *field.shape[1:]), dtype=field.dtype) for field in part]
        n = part[0].shape[0]
        for dest, field in zip(out, part, strict=True):
            dest[at : at + n] = field
        at += n
        del part  # before the next span is fetched: a mapper's result may pin object-store memory
    if at != total:
        raise RuntimeError(f"the candidate pass returned {at} words, expected {total}")
    return tuple(out)


class _RowGroups(Sequence):
    """Stage 2's work items, made when asked for, so that only one group's copy exists at a time
    beside the candidates (a distributed mapper hands each to the object store)."""

    def __init__(self, groups: list[tuple[np.ndarray, np.ndarray]], candidates: tuple[np.ndarray, ...]) -> None:
        self.groups, self.candidates = groups, candidates

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:  # type: ignore[override]
        words, bounds = self.groups[i]
        return (bounds, *(c[words] for c in self.candidates))


# -- stage 1: rows ------------------------------------------------------------------------------


def _assign_rows(
    rows: np.ndarray, cost: np.ndarray, row_price: np.ndarray, capacity: int, cost_scale: float | None
) -> tuple[np.ndarray, np.ndarray, int, float, float]:
    """Stage 1 on the candidates: (row of each word, -1 where no candidate had room; those words,
    by priority; arcs matched exactly; cost scale; solver seconds)."""
    V, width = rows.shape
    R = row_price.size
    spread = cost.max(axis=1) - cost.min(axis=1)
    exact_words = min(V, EXACT_ARCS // width)
    by_spread = np.argsort(-spread, kind="stable")
    top, rest = by_spread[:exact_words], by_spread[exact_words:]
    # the current row is the last candidate; a repeat of it adds no arc
    keep = np.ones((top.size, width), dtype=bool)
    keep[:, -1] = ~(rows[top, :-1] == rows[top, -1:]).any(axis=1)
    top_cost = cost[top]
    word = np.broadcast_to(np.arange(top.size, dtype=np.int32)[:, None], keep.shape)[keep]
    target = rows[top][keep]
    reduced = (top_cost - top_cost.min(axis=1, keepdims=True))[keep]
    chosen, scale, seconds = flow_match(word, target, reduced, top.size, R, capacity, cost_scale)
    new_row = np.full(V, -1, dtype=np.int64)
    new_row[top[word[chosen]]] = target[chosen]
    room = capacity - np.bincount(new_row[top], minlength=R)
    # the rest in priority order, a chunk at a time: each chunk's words choose before the next's
    lefts = []
    for chunk in np.array_split(rest, -(-rest.size // _GREEDY_WORDS)) if rest.size else []:
        taken, left = greedy_rounds(rows[chunk], cost[chunk] + row_price[rows[chunk]], room)
        new_row[chunk] = taken
        lefts.append(chunk[left])
    left_words = np.concatenate(lefts) if lefts else np.empty(0, dtype=np.int64)
    return new_row, left_words, int(word.size), scale, seconds


def _place_leftovers(a: np.ndarray, row_price: np.ndarray, room: np.ndarray, k: int) -> np.ndarray:
    """Rows for words whose candidate rows all filled: their cheapest rows among those with room.

    a: (n, R) their row costs, by priority; room is updated in place. Returns (n,) rows."""
    priced = np.where(room > 0, a + row_price, np.inf)
    choices = k_smallest(priced, min(k, priced.shape[1]))
    taken, left = greedy_rounds(choices, np.take_along_axis(priced, choices, axis=1), room)
    if left.size:  # still none: the open rows, cheapest price first
        open_rows = np.flatnonzero(room > 0)
        open_rows = open_rows[np.argsort(row_price[open_rows], kind="stable")]
        slots = np.repeat(open_rows, room[open_rows])
        taken[left] = slots[: left.size]
        np.subtract.at(room, taken[left], 1)
    return taken


# -- stage 2: columns inside each row ----------------------------------------------------------


def _columns_of_group(shared: tuple, group: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray, float]:
    """The columns of the words of a group of rows: (columns, B at them: NaN where a word got a
    column outside its candidates, seconds)."""
    col_price, num_cols = shared
    bounds, cols, col_cost, top, bottom = group
    new_col = np.empty(cols.shape[0], dtype=np.int64)
    at_new = np.empty(cols.shape[0], dtype=np.float64)
    seconds = 0.0
    for lo, hi in itertools.pairwise(bounds.tolist()):
        if hi > lo:
            t0 = time.perf_counter()
            new_col[lo:hi], at_new[lo:hi] = _sparse_row(
                cols[lo:hi], col_cost[lo:hi], top[lo:hi], bottom[lo:hi], col_price, num_cols
            )
            seconds += time.perf_counter() - t0
    return new_col, at_new, seconds


def _sparse_row(
    best: np.ndarray, best_cost: np.ndarray, top: np.ndarray, bottom: np.ndarray, col_price: np.ndarray, C: int
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct columns for a row's n words on a sparse graph: their m candidate columns each,
    plus a greedy column, so that the greedy assignment is a perfect matching of the graph.

    A greedy column outside a word's candidates costs at most the word's largest B (`top`):
    that bound is its arc's cost. Returns (columns, B at them; NaN where that bound was used)."""
    n, m = best.shape
    spread = top - bottom
    order = np.argsort(-spread, kind="stable")
    priced = best_cost + col_price[best]
    greedy, left = greedy_rounds(best[order], priced[order], np.ones(C, dtype=np.int64))
    if left.size:
        free = np.setdiff1d(np.arange(C), greedy[greedy >= 0])
        greedy[left] = free[: left.size]
    fallback = np.empty(n, dtype=np.int64)
    fallback[order] = greedy
    in_best = best == fallback[:, None]
    fallback_known = in_best.any(axis=1)
    fallback_cost = np.where(fallback_known, np.where(in_best, best_cost, -np.inf).max(axis=1), top)
    # each word's arcs, reduced by its cheapest one (the matching is the same, the integers smaller)
    floor = np.minimum(best_cost.min(axis=1), fallback_cost)
    word = np.concatenate([np.repeat(np.arange(n, dtype=np.int32), m), np.arange(n, dtype=np.int32)])
    col = np.concatenate([best.reshape(-1), fallback]).astype(np.int32)
    reduced = np.concatenate([(best_cost - floor[:, None]).reshape(-1), fallback_cost - floor])
    if n < C:  # dummy words take the empty columns at no cost: a square problem
        word = np.concatenate([word, np.repeat(np.arange(n, C, dtype=np.int32), C)])
        col = np.concatenate([col, np.tile(np.arange(C, dtype=np.int32), C - n)])
        reduced = np.concatenate([reduced, np.zeros((C - n) * C)])
    mate, _, _ = assignment(word, col, reduced, C, None)
    chosen = mate[:n]
    hit = best == chosen[:, None]
    at = np.where(hit.any(axis=1), np.where(hit, best_cost, -np.inf).max(axis=1), np.nan)
    return chosen, at


# -- the method ----------------------------------------------------------------------------------


def solve_two_stage(
    costs: CostBlocks,
    current: Allocation,
    k: int,
    price_rounds: int,
    cost_scale: float | None,
    block_size: int,
    mapper: Mapper = serial_map,
) -> Solution:
    V, R, C = current.vocab_size, current.num_rows, current.num_cols
    row_price, col_price = balancing_prices(costs, current, price_rounds)
    k_rows, m_cols = min(k, R), min(COLUMNS_PER_WORD, C)
    span_words = max(block_size, _SPAN_WORDS)
    spans = [
        (
            start,
            min(start + span_words, V),
            current.row_of[start : start + span_words],
            current.col_of[start : start + span_words],
        )
        for start in range(0, V, span_words)
    ]
    shared = (costs, row_price, col_price, k_rows, m_cols, R, C, block_size)
    rows, row_cost, cols, col_cost, top, bottom, current_col_part = _gather(mapper(_candidates, shared, spans), V)
    # stage 1
    new_row, left, arcs, scale, seconds = _assign_rows(rows, row_cost, row_price, C, cost_scale)
    row_part = row_cost[np.arange(V), np.argmax(rows == new_row[:, None], axis=1)]
    current_row_part = row_cost[:, -1]
    del rows, row_cost
    room = C - np.bincount(new_row[new_row >= 0], minlength=R)
    for chunk in np.array_split(left, -(-left.size // LEFTOVER_WORDS)) if left.size else []:
        a = costs_of_words(costs, chunk, current, block_size, 0)  # (chunk, R): a chunk at a time
        new_row[chunk] = _place_leftovers(a, row_price, room, k_rows)
        row_part[chunk] = a[np.arange(chunk.size), new_row[chunk]]
    # stage 2: rows in groups of about _GROUP_ENTRIES candidate arcs
    order = np.argsort(new_row, kind="stable")
    bounds = np.searchsorted(new_row[order], np.arange(R + 1))
    rows_per_group = max(1, _GROUP_ENTRIES // (C * (m_cols + 1)))
    groups = []
    for first in range(0, R, rows_per_group):
        last = min(first + rows_per_group, R)
        words = order[bounds[first] : bounds[last]]
        groups.append((words, bounds[first : last + 1] - bounds[first]))
    items = _RowGroups(groups, (cols, col_cost, top, bottom))
    new_col = np.empty(V, dtype=np.int64)
    col_part = np.empty(V, dtype=np.float64)
    for (words, _), (group_cols, at_new, row_seconds) in zip(
        groups, mapper(_columns_of_group, (col_price, C), items), strict=True
    ):
        new_col[words], col_part[words] = group_cols, at_new
        seconds += row_seconds
    del items, cols, col_cost, top, bottom
    outside = np.flatnonzero(np.isnan(col_part))  # words on a column outside their candidates
    for chunk in np.array_split(outside, -(-outside.size // LEFTOVER_WORDS)) if outside.size else []:
        b = costs_of_words(costs, chunk, current, block_size, 1)
        col_part[chunk] = b[np.arange(chunk.size), new_col[chunk]]
    solver = "ortools_min_cost_flow+greedy+ortools_linear_sum_assignment"
    current_cost = current_row_part + current_col_part
    return Solution(new_row * C + new_col, current_cost, row_part + col_part, solver, arcs, scale, seconds)
