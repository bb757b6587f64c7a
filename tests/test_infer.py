from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightrnn.allocation import Allocation
from lightrnn.config import ModelConfig
from lightrnn.corpus import count_words, encode_file
from lightrnn.infer import (
    BOUND_SLACK,
    FIRST_BLOCK,
    generate,
    sample_next_words,
    score_lines,
    sentence_log_probs,
    topk_next_words,
)
from lightrnn.model import LightRNN, build_model
from lightrnn.train import evaluate, score_stream
from lightrnn.vocab import Vocabulary


def small(vocab: int, kind: str = "lightrnn", lightrnn_input: str = "interleaved") -> ModelConfig:
    sizes = {"embed_dim": 8, "hidden_dim": 12, "num_layers": 2, "dropout": 0.3}
    return ModelConfig(vocab_size=vocab, kind=kind, lightrnn_input=lightrnn_input, **sizes)


def peaked_lightrnn(vocab: int, seed: int, sharpness: float = 4.0, lightrnn_input: str = "interleaved") -> LightRNN:
    """A random LightRNN with scaled-up heads, so distributions are as uneven as a trained model's."""
    torch.manual_seed(seed)
    model = LightRNN(small(vocab, lightrnn_input=lightrnn_input), Allocation.random(vocab, seed=seed))
    with torch.no_grad():
        for head in (model.row_head, model.col_head):
            head.weight.mul_(sharpness)
            head.bias.normal_(0.0, sharpness / 2)
    return model.eval()


@pytest.mark.parametrize("lightrnn_input", ["interleaved", "joint"])
@pytest.mark.parametrize("vocab", [100, 37, 1001, 10])  # square tables and tables with empty cells
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_topk_equals_brute_force_topk(vocab: int, seed: int, lightrnn_input: str) -> None:
    model = peaked_lightrnn(vocab, seed, sharpness=4.0 if seed else 1.0, lightrnn_input=lightrnn_input)  # 0: flat
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (5, 6), generator=g)
    log_probs, _ = model.next_word_log_probs(tokens)
    for k in sorted({1, 5, min(10, vocab)}):
        brute = log_probs.topk(k, dim=-1)
        top = topk_next_words(model, tokens, k)
        assert torch.equal(top.word_ids, brute.indices), (k, top.word_ids, brute.indices)
        assert torch.allclose(top.log_probs, brute.values, atol=1e-5)
        assert (top.word_ids >= 0).all()  # never an empty cell


def rows_the_bound_needs(model: LightRNN, tokens_BT: torch.Tensor, k: int) -> list[int]:
    """Per context, the first block end (8, 24, 56, ... rows by row probability) after which no
    unvisited row can hold a top-k word: its row log-probability is at most the k-th best so far."""
    log_probs_BV, _ = model.next_word_log_probs(tokens_BT)
    row_logp_BR, _ = model.row_log_probs(tokens_BT)
    R = row_logp_BR.shape[1]
    ends, end, block = [], 0, FIRST_BLOCK
    while end < R:
        end, block = min(end + block, R), block * 2
        ends.append(end)
    needed = []
    for logp_V, row_logp_R in zip(log_probs_BV, row_logp_BR, strict=True):
        order_R = row_logp_R.argsort(descending=True)
        for end in ends:
            seen_V = torch.isin(model.row_of, order_R[:end])
            kth = logp_V[seen_V].topk(k).values[-1]
            if end == R or row_logp_R[order_R[end]] + BOUND_SLACK <= kth:
                needed.append(end)
                break
    return needed


def test_topk_visits_exactly_the_rows_the_bound_needs() -> None:
    tokens = torch.randint(0, 1001, (8, 4), generator=torch.Generator().manual_seed(0))
    for sharpness, most in ((8.0, 8), (4.0, 24), (0.0, 32)):  # of 32 rows: a flat model visits all
        model = peaked_lightrnn(1001, 1, sharpness=sharpness)
        top = topk_next_words(model, tokens, 10)
        assert top.rows_visited.tolist() == rows_the_bound_needs(model, tokens, 10), sharpness
        assert top.rows_visited.max() <= most, sharpness


def test_topk_of_an_oversized_table_skips_empty_rows() -> None:
    model = LightRNN(small(10), Allocation.from_cells(np.arange(10), 5, 5)).eval()  # rows 2..4 empty
    tokens = torch.tensor([[1, 2, 3]])
    top = topk_next_words(model, tokens, 10)
    brute = model.next_word_log_probs(tokens)[0].topk(10)
    assert sorted(top.word_ids[0].tolist()) == list(range(10))
    assert torch.allclose(top.log_probs, brute.values, atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "adaptive"])
def test_topk_of_the_baselines_is_topk_of_their_distribution(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(small(40, kind)).eval()
    tokens = torch.randint(0, 40, (3, 5))
    top = topk_next_words(model, tokens, 7)
    brute = model.next_word_log_probs(tokens)[0].topk(7)
    assert torch.equal(top.word_ids, brute.indices) and torch.allclose(top.log_probs, brute.values, atol=1e-6)


def test_topk_carries_the_state_like_the_full_distribution() -> None:
    model = peaked_lightrnn(37, 3)
    tokens = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(3))
    first = topk_next_words(model, tokens[:, :5], 3)
    second = topk_next_words(model, tokens[:, 5:], 3, first.state)
    brute = model.next_word_log_probs(tokens)[0].topk(3)
    assert torch.equal(second.word_ids, brute.indices)
    with pytest.raises(ValueError, match="k must be in 1..37"):
        topk_next_words(model, tokens, 38)


@pytest.mark.parametrize("lightrnn_input", ["interleaved", "joint"])
def test_row_and_column_parts_add_up_to_the_word_log_prob(lightrnn_input: str) -> None:
    model = peaked_lightrnn(37, 4, lightrnn_input=lightrnn_input)
    tokens = torch.randint(0, 37, (2, 3), generator=torch.Generator().manual_seed(4))
    full, _ = model.next_word_log_probs(tokens)
    row_logp, state = model.row_log_probs(tokens)
    rows = model.row_of.long().unsqueeze(0).expand(2, -1)  # every word's row, for both contexts
    col_logp = model.column_log_probs(state, rows)  # (2, V, C)
    word_logp = (
        row_logp.gather(1, rows) + col_logp.gather(2, model.col_of.long().view(1, -1, 1).expand(2, -1, 1))[..., 0]
    )
    assert torch.allclose(word_logp, full, atol=1e-5)


def test_two_stage_sampling_draws_from_the_model_distribution() -> None:
    model = peaked_lightrnn(10, 5, sharpness=2.0)
    tokens = torch.tensor([[3, 4]]).expand(4000, -1)
    g = torch.Generator().manual_seed(0)
    words, _ = sample_next_words(model, tokens, generator=g)
    freq = torch.bincount(words, minlength=10).double() / words.numel()
    expected = model.next_word_log_probs(tokens[:1])[0][0].exp().double()
    assert (freq - expected).abs().max() < 0.03  # 4000 draws: standard error <= 0.008


def test_top_k_sampling_stays_in_the_top_k_and_low_temperature_is_greedy() -> None:
    model = peaked_lightrnn(37, 6)
    tokens = torch.tensor([[1, 2]]).expand(200, -1)
    top = topk_next_words(model, tokens[:1], 3)
    words, _ = sample_next_words(model, tokens, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(words.tolist()) <= set(top.word_ids[0].tolist())
    greedy, _ = sample_next_words(model, tokens[:5], temperature=1e-4, top_k=3)
    assert (greedy == top.word_ids[0, 0]).all()
    cold, _ = sample_next_words(model, tokens[:5], temperature=1e-4)  # full distribution path
    assert (cold == top.word_ids[0, 0]).all()


def test_generate_is_seeded_and_stops_at_max_words(ptb_small) -> None:
    vocab, _ = ptb_small
    model = build_model(ModelConfig(len(vocab), "lightrnn", 8, 8, 1)).eval()
    a = generate(model, vocab, "the company said", max_words=12, top_k=5, seed=1)
    b = generate(model, vocab, "the company said", max_words=12, top_k=5, seed=1)
    assert a == b and 0 < len(a) <= 12 and all(w in vocab for w in a)
    assert "<eos>" not in a


@pytest.fixture(scope="module")
def ptb_small(ptb_dir) -> tuple[Vocabulary, np.ndarray]:
    vocab = Vocabulary.build(count_words([ptb_dir / "ptb.valid.txt"]), max_size=500)
    return vocab, encode_file(ptb_dir / "ptb.valid.txt", vocab)


@pytest.mark.parametrize("kind", ["lightrnn", "full"])
@pytest.mark.parametrize("batch_size", [1, 10])
def test_score_equals_evaluate_perplexity(ptb_dir, ptb_small, kind: str, batch_size: int) -> None:
    vocab, _ = ptb_small
    lines = (ptb_dir / "ptb.test.txt").read_text().splitlines()[:120]
    torch.manual_seed(0)
    model = build_model(ModelConfig(len(vocab), kind, 16, 16, 2, dropout=0.5))  # training mode: score must not drop
    stream = np.concatenate([vocab.encode_line(line) for line in lines]).astype(np.int64)
    expected = evaluate(model, stream, vocab.eos_id, batch_size=batch_size, bptt=13)
    scored = score_lines(model, vocab, lines, batch_size=batch_size, bptt=13)
    assert model.training  # restored
    assert scored.tokens == expected.tokens == stream.shape[0]
    assert scored.ppl == pytest.approx(expected.ppl, rel=1e-9)
    assert scored.line_tokens.sum() == stream.shape[0] and len(scored.line_log_probs) == 120
    assert scored.line_log_probs.sum() == pytest.approx(-expected.nll, rel=1e-9)
    assert (scored.line_log_probs < 0).all()


def test_per_token_scores_match_the_next_word_distribution(ptb_small) -> None:
    vocab, stream = ptb_small
    model = build_model(ModelConfig(len(vocab), "lightrnn", 8, 8, 1)).eval()
    logp = score_stream(model, stream[:20], vocab.eos_id, batch_size=1, bptt=7)
    context = torch.tensor([[vocab.eos_id, *stream[:11].tolist()]])
    dist, _ = model.next_word_log_probs(context)
    assert logp[11] == pytest.approx(float(dist.detach()[0, stream[11]]), abs=1e-5)


def test_sentences_are_scored_on_their_own(ptb_small) -> None:
    vocab, _ = ptb_small
    model = build_model(ModelConfig(len(vocab), "lightrnn", 8, 8, 1)).eval()
    sentences = ["the company said", "it was n't clear", "", "the stock rose " * 20]
    together, tokens = sentence_log_probs(model, vocab, sentences, batch_size=3, bptt=6)
    assert tokens.tolist() == [4, 5, 1, 61]
    for s, lp in zip(sentences, together, strict=True):
        alone, _ = sentence_log_probs(model, vocab, [s], bptt=50)
        assert alone[0] == pytest.approx(lp, abs=1e-4)
        ids = [vocab.eos_id, *vocab.encode_line(s).tolist()]
        direct = model.target_log_probs(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0].sum()
        assert float(direct.detach()) == pytest.approx(lp, abs=1e-4)
    assert math.isfinite(together.sum())
