from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig, ReallocConfig
from lightrnn.costs import accumulate_head_inputs, block_costs, cost_blocks, dense_costs
from lightrnn.model import LightRNN
from lightrnn.realloc import solve_reallocation


def brute_force_costs(model: LightRNN, stream: np.ndarray, batch: int, bptt: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum -log P_row(i | ctx) and -log P_col(j | ctx, r(w)) over every occurrence of every word."""
    vocab, rows, cols = model.vocab_size, model.num_rows, model.num_cols
    A = np.zeros((vocab, rows))
    B = np.zeros((vocab, cols))
    data = torch.as_tensor(stream[: (len(stream) // batch) * batch]).view(batch, -1).t()
    state = None
    occupied = model.occupied_RC
    model.eval()
    with torch.no_grad():
        for i in range(0, data.shape[0] - 1, bptt):
            t = min(bptt, data.shape[0] - 1 - i)
            x, y = data[i : i + t].t(), data[i + 1 : i + 1 + t].t()
            h_row, h_col, state = model.head_inputs(x, y, state)
            row_lp = F.log_softmax(model.row_head(h_row).double(), -1)
            col_logits = model.col_head(h_col).double()
            col_lp = F.log_softmax(col_logits.masked_fill(~occupied[model.row_of[y].long()], -torch.inf), -1)
            for b in range(y.shape[0]):
                for s in range(y.shape[1]):
                    w = int(y[b, s])
                    A[w] -= row_lp[b, s].numpy()
                    B[w] -= col_lp[b, s].numpy()
    return A, B


@pytest.mark.parametrize("lightrnn_input", ["interleaved", "joint"])
def test_costs_equal_brute_force_up_to_per_word_constants(lightrnn_input: str) -> None:
    torch.manual_seed(0)
    for vocab in (30, 37):  # a 6 x 5 table with every cell used; a 7 x 6 one with empty cells
        config = ModelConfig(vocab, embed_dim=8, hidden_dim=10, num_layers=2, lightrnn_input=lightrnn_input)
        model = LightRNN(config, Allocation.random(vocab, seed=2))
        stream = torch.randint(0, vocab, (600,), generator=torch.Generator().manual_seed(1)).numpy()
        sums = accumulate_head_inputs(model, stream, batch_size=4, bptt=7, dtype=torch.float64)
        A, B = dense_costs(model, sums)
        A_bf, B_bf = brute_force_costs(model, stream, batch=4, bptt=7)
        seen = sums.count_V.numpy() > 0
        assert seen.sum() > vocab // 2
        # A - A_bf is a per-word constant (the log-partition sums) across all rows
        diff = A - A_bf
        assert np.allclose(diff, diff[:, :1], atol=1e-8)
        # B likewise across the cells occupied in the word's own row (others are masked: +inf)
        row_of = model.row_of.long().numpy()
        for w in np.flatnonzero(seen):
            ok = model.occupied_RC[row_of[w]].numpy()
            d = B[w, ok] - B_bf[w, ok]
            assert np.allclose(d, d[0], atol=1e-8)
        assert np.all(sums.count_V.numpy()[~seen] == 0) and np.all(A[~seen] == 0)


def test_word_blocks_match_the_whole_and_counts_match_the_stream() -> None:
    torch.manual_seed(0)
    vocab = 50
    model = LightRNN(ModelConfig(vocab, embed_dim=8, hidden_dim=8, num_layers=1), Allocation.random(vocab))
    stream = torch.randint(0, vocab, (401,), generator=torch.Generator().manual_seed(3)).numpy()
    sums = accumulate_head_inputs(model, stream, batch_size=4, bptt=9)
    A, B = dense_costs(model, sums)
    a, b = block_costs(model, sums, 10, 25)
    assert np.allclose(a, A[10:25]) and np.allclose(b, B[10:25])
    data = stream[:400].reshape(4, 100)
    assert np.array_equal(sums.count_V.numpy(), np.bincount(data[:, 1:].ravel(), minlength=vocab))
    half = accumulate_head_inputs(model, stream, batch_size=4, bptt=9, max_tokens=200)
    assert int(half.count_V.sum()) < int(sums.count_V.sum())


def test_stay_bonus_lowers_each_words_current_row_and_column_by_bonus_per_occurrence() -> None:
    torch.manual_seed(0)
    vocab = 50
    model = LightRNN(ModelConfig(vocab, embed_dim=8, hidden_dim=8, num_layers=1), Allocation.random(vocab, seed=1))
    stream = torch.randint(0, vocab, (801,), generator=torch.Generator().manual_seed(3)).numpy()
    sums = accumulate_head_inputs(model, stream, batch_size=4, bptt=9)
    count = sums.count_V.numpy().astype(np.float64)
    rows, cols = model.allocation().row_of, model.allocation().col_of
    plain_a, plain_b = cost_blocks(model, sums)(0, vocab)
    a, b = cost_blocks(model, sums, stay_bonus=0.5)(0, vocab)
    expected_a, expected_b = plain_a.copy(), plain_b.copy()
    expected_a[np.arange(vocab), rows] -= 0.5 * count
    expected_b[np.arange(vocab), cols] -= 0.5 * count
    np.testing.assert_allclose(a, expected_a, rtol=0, atol=1e-12)
    np.testing.assert_allclose(b, expected_b, rtol=0, atol=1e-12)
    # words move for plain costs; with a bonus larger than any gain per occurrence, none does
    current = model.allocation()
    _, plain = solve_reallocation(cost_blocks(model, sums), None, current)
    _, kept = solve_reallocation(cost_blocks(model, sums, stay_bonus=100.0), None, current)
    assert plain.words_moved > 10 and kept.words_moved == 0


def test_stay_bonus_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="stay_bonus must be >= 0"):
        ReallocConfig(stay_bonus=-0.1)
