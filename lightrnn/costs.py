"""Reallocation costs from one inference pass, without a V x sqrt(V) loss matrix.

Placing word w in cell (i, j) costs, summed over the occurrences of w (Li et al. 2016, eq. 3)

    cost(w, i, j) = sum_t -log P_row(i | ctx_t) - log P_col(j | ctx_t, r(w)) = A[w, i] + B[w, j]

Both heads are linear, so with H_w the sum of the hidden states that fed the row head
at the occurrences of w and n_w their count,

    A[w, :] = -(W_row H_w + n_w b_row) + (a per-word constant no assignment changes)

and likewise B with the column head and H'_w. One pass accumulates H, H' (two V x H
matrices, shardable by word range) and n; A and B for any block of words are then one
matrix product away. The log-partition terms are the per-word constants dropped here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lightrnn.model import LightRNN
from lightrnn.train import batchify, segments


@dataclass
class HeadInputSums:
    """Per-word sums of the hidden states feeding each head, and occurrence counts."""

    row_sum_VH: torch.Tensor  # sum over occurrences of w of the state that predicted r(w)
    col_sum_VH: torch.Tensor  # ... of the state (after reading r(w)) that predicted c(w)
    count_V: torch.Tensor  # occurrences of w as a target

    def merge(self, other: HeadInputSums) -> HeadInputSums:
        """Sum of two partial accumulations (e.g. from two data shards)."""
        return HeadInputSums(
            self.row_sum_VH + other.row_sum_VH, self.col_sum_VH + other.col_sum_VH, self.count_V + other.count_V
        )


@torch.no_grad()
def accumulate_head_inputs(
    model: LightRNN,
    stream_N: np.ndarray,
    batch_size: int = 20,
    bptt: int = 35,
    max_tokens: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> HeadInputSums:
    """One eval-mode pass over `stream_N` (state carried) summing head inputs per target word.

    `max_tokens` > 0 limits the pass to the first that many targets (a cheaper estimate).
    """
    stream = np.asarray(stream_N)
    if max_tokens > 0:
        stream = stream[: max_tokens + 1]
    data_NB = batchify(stream, batch_size).to(device)
    vocab, hidden = model.vocab_size, model.config.hidden_dim
    sums = HeadInputSums(
        torch.zeros(vocab, hidden, dtype=dtype, device=device),
        torch.zeros(vocab, hidden, dtype=dtype, device=device),
        torch.zeros(vocab, dtype=torch.long, device=device),
    )
    was_training = model.training
    model.eval()
    state = None
    for tokens_BT, targets_BT in segments(data_NB, bptt):
        h_row_BTH, h_col_BTH, state = model.head_inputs(tokens_BT, targets_BT, state)
        words = targets_BT.reshape(-1)
        sums.row_sum_VH.index_add_(0, words, h_row_BTH.reshape(-1, hidden).to(dtype))
        sums.col_sum_VH.index_add_(0, words, h_col_BTH.reshape(-1, hidden).to(dtype))
        sums.count_V.index_add_(0, words, torch.ones_like(words))
    model.train(was_training)
    return sums


def block_costs(model: LightRNN, sums: HeadInputSums, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Row costs A (n, R) and column costs B (n, C) for words [start, stop), float64."""
    w_row, b_row = model.row_head.weight.detach(), model.row_head.bias.detach()
    w_col, b_col = model.col_head.weight.detach(), model.col_head.bias.detach()
    h_row = sums.row_sum_VH[start:stop].to(torch.float64)
    h_col = sums.col_sum_VH[start:stop].to(torch.float64)
    n = sums.count_V[start:stop].to(torch.float64).unsqueeze(1)
    row_cost = -(h_row @ w_row.T.to(torch.float64) + n * b_row.to(torch.float64))
    col_cost = -(h_col @ w_col.T.to(torch.float64) + n * b_col.to(torch.float64))
    return row_cost.cpu().numpy(), col_cost.cpu().numpy()


def subtract_stay_bonus(cost_nK: np.ndarray, current_n: np.ndarray, count_n: np.ndarray, bonus: float) -> np.ndarray:
    """`cost_nK` with `bonus` nats per occurrence taken off each word's current row (or column), in place.

    A word then moves only when the move gains more than `bonus` per occurrence: costs are
    sums over few occurrences for most words, and a move for a gain within that noise changes
    the word's input vectors for nothing.
    """
    if bonus:
        cost_nK[np.arange(len(current_n)), current_n] -= bonus * np.asarray(count_n, dtype=cost_nK.dtype)
    return cost_nK


def cost_blocks(
    model: LightRNN, sums: HeadInputSums, stay_bonus: float = 0.0
) -> Callable[[int, int], tuple[np.ndarray, np.ndarray]]:
    """A callable `costs(start, stop) -> (A, B)` for the solver, so V x R is never held at once;
    `stay_bonus` as in `subtract_stay_bonus`."""
    current = model.allocation()
    counts = sums.count_V.cpu().numpy()

    def costs(start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        row_cost, col_cost = block_costs(model, sums, start, stop)
        subtract_stay_bonus(row_cost, current.row_of[start:stop], counts[start:stop], stay_bonus)
        subtract_stay_bonus(col_cost, current.col_of[start:stop], counts[start:stop], stay_bonus)
        return row_cost, col_cost

    return costs


def dense_costs(model: LightRNN, sums: HeadInputSums, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """All of A (V, R) and B (V, C); for small vocabularies and tests."""
    parts = [block_costs(model, sums, s, min(s + block, model.vocab_size)) for s in range(0, model.vocab_size, block)]
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
