from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_kinds import KINDS, kind_options

from lightrnn.allocation import Allocation, AllocationError
from lightrnn.config import ModelConfig
from lightrnn.model import LightRNN, build_model


def small(vocab: int, kind: str = "lightrnn", **kw) -> ModelConfig:
    kind, options = kind_options(kind)
    kw = {**kw, **options}
    return ModelConfig(vocab_size=vocab, kind=kind, embed_dim=8, hidden_dim=12, num_layers=2, dropout=0.3, **kw)


def stream(vocab: int, batch: int = 3, steps: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, vocab, (batch, steps + 1), generator=g)
    return s[:, :-1], s[:, 1:]


@pytest.mark.parametrize("kind", ["lightrnn", "lightrnn-joint"])
@pytest.mark.parametrize("vocab", [9, 16, 100, 10, 37, 1001])  # square and non-square tables
def test_lightrnn_distribution_sums_to_one_before_and_after_reallocation(vocab: int, kind: str) -> None:
    torch.manual_seed(0)
    model = LightRNN(small(vocab, kind), Allocation.random(vocab, seed=1)).eval()
    tokens, _ = stream(vocab)
    for alloc_seed in (1, 2):
        model.set_allocation(Allocation.random(vocab, seed=alloc_seed))
        log_probs, _ = model.next_word_log_probs(tokens)
        assert log_probs.shape == (3, vocab)
        assert torch.allclose(torch.logsumexp(log_probs.double(), -1), torch.zeros(3, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("kind", ["lightrnn", "lightrnn-joint"])
def test_empty_rows_of_an_oversized_table_get_no_probability(kind: str) -> None:
    # 10 words in a 5 x 5 table: whole rows are empty and must be masked out of the row softmax
    alloc = Allocation.from_cells(np.arange(10), 5, 5)  # rows 2, 3, 4 empty
    model = LightRNN(small(10, kind), alloc).eval()
    log_probs, _ = model.next_word_log_probs(stream(10)[0])
    assert torch.allclose(torch.logsumexp(log_probs, -1), torch.zeros(3), atol=1e-5)


def test_log_prob_is_row_log_prob_plus_column_log_prob() -> None:
    torch.manual_seed(0)
    vocab = 23
    model = LightRNN(small(vocab), Allocation.random(vocab, seed=4)).eval()
    tokens, _ = stream(vocab, batch=2, steps=5)
    log_probs, _state = model.next_word_log_probs(tokens)
    # recompute by hand: row softmax from the last state, column softmax after reading the row
    occupied = torch.from_numpy(model.allocation().occupied())
    # the interleaved input r(x1), c(x1), r(x2), c(x2), ... built by hand
    rows, cols = model.row_embed(model.row_of[tokens]), model.col_embed(model.col_of[tokens])
    _, (h, c) = model.core.lstm(torch.stack((rows, cols), dim=2).flatten(1, 2))
    for w in range(vocab):
        r, col = int(model.row_of[w]), int(model.col_of[w])
        row_lp = F.log_softmax(model.row_head(h[-1]), -1)[:, r]
        step, _ = model.core.lstm(model.row_embed.weight[r].expand(2, 1, -1), (h, c))
        col_logits = model.col_head(step[:, 0]).masked_fill(~occupied[r], float("-inf"))
        col_lp = F.log_softmax(col_logits, -1)[:, col]
        assert torch.allclose(log_probs[:, w], row_lp + col_lp, atol=1e-5)


def test_joint_input_reads_each_word_once_and_gives_the_column_head_the_row() -> None:
    torch.manual_seed(0)
    vocab = 23
    model = LightRNN(small(vocab, "lightrnn-joint"), Allocation.random(vocab, seed=4)).eval()
    assert model.core.lstm.input_size == 2 * 8
    tokens, _ = stream(vocab, batch=2, steps=5)
    log_probs, _state = model.next_word_log_probs(tokens)
    occupied = torch.from_numpy(model.allocation().occupied())
    rows, cols = model.row_embed(model.row_of[tokens]), model.col_embed(model.col_of[tokens])
    out, _ = model.core.lstm(torch.cat((rows, cols), dim=-1))  # one step per word
    h = out[:, -1]
    for w in range(vocab):
        r, col = int(model.row_of[w]), int(model.col_of[w])
        row_lp = F.log_softmax(model.row_head(h), -1)[:, r]
        mixed = torch.tanh(model.col_given_row(torch.cat((h, model.row_embed.weight[r].expand(2, -1)), -1)))
        col_logits = model.col_head(mixed).masked_fill(~occupied[r], float("-inf"))
        col_lp = F.log_softmax(col_logits, -1)[:, col]
        assert torch.allclose(log_probs[:, w], row_lp + col_lp, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_training_loss_equals_mean_negative_next_word_log_prob(kind: str) -> None:
    torch.manual_seed(0)
    vocab = 40
    model = build_model(small(vocab, kind)).eval()
    tokens, targets = stream(vocab, batch=4, steps=6)
    loss, final_state = model(tokens, targets)
    state, total = None, torch.zeros(())
    for t in range(tokens.shape[1]):
        log_probs, state = model.next_word_log_probs(tokens[:, t : t + 1], state)
        total -= log_probs.gather(1, targets[:, t : t + 1]).sum()
    assert torch.allclose(loss, total / targets.numel(), atol=1e-5)
    assert torch.allclose(final_state[0], state[0], atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_state_carried_across_segments_equals_one_long_segment(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(small(30, kind)).eval()
    tokens, targets = stream(30, steps=10)
    whole, _ = model.target_log_probs(tokens, targets)
    first, state = model.target_log_probs(tokens[:, :4], targets[:, :4])
    second, _ = model.target_log_probs(tokens[:, 4:], targets[:, 4:], state)
    assert torch.allclose(whole, torch.cat((first, second), 1), atol=1e-5)


def test_lightrnn_loss_never_materialises_batch_by_time_by_vocab() -> None:
    vocab, batch, steps = 20_000, 4, 8
    model = LightRNN(small(vocab), Allocation.random(vocab)).train()
    tokens, targets = stream(vocab, batch, steps)
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        if t.is_floating_point():  # the LSTM also saves byte workspaces
            largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(tokens, targets)
    loss.backward()
    assert largest < batch * steps * vocab / 100  # the biggest is (B, T, C) or a weight: ~sqrt(V)
    assert model.row_head.weight.grad is not None and model.col_embed.weight.grad is not None


def test_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    model = build_model(small(30))
    tokens, targets = stream(30)
    a, _ = model(tokens, targets)
    b, _ = model(tokens, targets)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(tokens, targets)[0], model(tokens, targets)[0])


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (torch.tensor([[0, 1, 30]]), "id 30, outside the vocabulary 0..29"),
        (torch.tensor([[0, -1]]), "id -1"),
        (torch.tensor([[0.0, 1.0]]), "integer word ids"),
        (torch.tensor([0, 1]), r"\(batch, time\)"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_token_ids_are_refused(kind: str, tokens: torch.Tensor, message: str) -> None:
    model = build_model(small(30, kind))
    with pytest.raises(ValueError, match=message):
        model.next_word_log_probs(tokens)


def test_targets_must_be_the_shifted_stream() -> None:
    model = build_model(small(30))
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="shifted by one"):
        model(tokens, torch.tensor([[5, 6, 7]]))


def test_bad_allocations_are_refused() -> None:
    with pytest.raises(AllocationError, match="covers 10 words"):
        LightRNN(small(12), Allocation.random(10))
    model = LightRNN(small(12), Allocation.random(12))
    with pytest.raises(AllocationError, match="table is 5 x 5"):
        model.set_allocation(Allocation.from_cells(np.arange(12), 5, 5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "transformer"}, "one of lightrnn, full, adaptive"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"hidden_dim": 0}, "hidden_dim must be >= 1"),
        ({"vocab_size": 1}, "vocab_size must be >= 2"),
        ({"kind": "adaptive", "tie_weights": True}, "tie_weights needs kind='full' or 'lightrnn'"),
        ({"lightrnn_input": "sideways"}, "lightrnn_input must be one of interleaved, joint"),
        ({"kind": "full", "tie_weights": True, "embed_dim": 4}, "embed_dim == hidden_dim"),
        ({"kind": "adaptive", "adaptive_cutoffs": (5, 3)}, "adaptive_cutoffs must be increasing"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict, message: str) -> None:
    base = {"vocab_size": 100, "embed_dim": 8, "hidden_dim": 8}
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**base, **kwargs})


def test_unset_vocab_size_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="set config.vocab_size"):
        build_model(ModelConfig())


def test_tied_full_softmax_shares_the_matrix() -> None:
    model = build_model(ModelConfig(vocab_size=50, kind="full", embed_dim=8, hidden_dim=8, tie_weights=True))
    assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("lightrnn_input", ["interleaved", "joint"])
def test_tied_lightrnn_reads_and_predicts_with_the_same_row_and_column_vectors(lightrnn_input: str) -> None:
    config = ModelConfig(vocab_size=50, embed_dim=8, hidden_dim=8, tie_weights=True, lightrnn_input=lightrnn_input)
    model = LightRNN(config, Allocation.random(50))
    assert model.row_head.weight is model.row_embed.weight and model.col_head.weight is model.col_embed.weight
    untied = LightRNN(dataclasses.replace(config, tie_weights=False), Allocation.random(50))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    table = model.num_rows + model.num_cols  # 50 words: 8 rows, 7 columns
    assert count(untied) - count(model) == table * 8  # their output vectors
    tokens, targets = stream(50)
    loss, _ = model(tokens, targets)
    loss.backward()
    assert model.row_embed.weight.grad is not None
