from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightrnn.config import ModelConfig, TrainConfig
from lightrnn.corpus import count_words, encode_file
from lightrnn.export import load_model, save_model
from lightrnn.model import build_model
from lightrnn.train import EmptyStreamError, batchify, evaluate, lr_at, segments, train
from lightrnn.vocab import Vocabulary


def test_batchify_lays_the_stream_down_columns() -> None:
    data = batchify(np.arange(24), 4)
    assert data.shape == (6, 4)
    assert data[:, 1].tolist() == [6, 7, 8, 9, 10, 11]
    pairs = list(segments(data, 2))
    assert [x.shape for x, _ in pairs] == [(4, 2), (4, 2), (4, 1)]
    for x, y in pairs:
        assert torch.equal(x[:, 1:], y[:, :-1])
    assert sum(y.numel() for _, y in pairs) == 4 * 5  # every column target exactly once


def test_too_short_streams_are_refused() -> None:
    with pytest.raises(EmptyStreamError, match="cannot fill 4 columns"):
        batchify(np.arange(5), 4)
    with pytest.raises(EmptyStreamError, match="empty stream"):
        evaluate(build_model(ModelConfig(10, "full", 4, 4, 1)), np.array([], dtype=np.int64), eos_id=0)


@pytest.mark.parametrize("kind", ["lightrnn", "full", "adaptive"])
@pytest.mark.parametrize(("batch", "bptt"), [(1, 4), (3, 5), (7, 2)])
def test_evaluation_scores_every_token_exactly_as_word_by_word_scoring(kind: str, batch: int, bptt: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(20, kind, 6, 6, 1)).eval()
    stream = torch.randint(0, 20, (23,), generator=torch.Generator().manual_seed(1)).numpy()
    result = evaluate(model, stream, eos_id=0, batch_size=batch, bptt=bptt)
    assert result.tokens == 23
    if batch == 1:  # one column: identical to scoring word by word from <eos>
        state, nll, prev = None, 0.0, 0
        with torch.no_grad():
            for w in stream:
                log_probs, state = model.next_word_log_probs(torch.tensor([[prev]]), state)
                nll -= float(log_probs[0, w])
                prev = int(w)
        assert result.nll == pytest.approx(nll, rel=1e-5)
    assert math.isfinite(result.ppl) and result.ppl > 1


def test_cosine_schedule_runs_from_lr_to_floor() -> None:
    config = TrainConfig(lr=1.0, lr_min_ratio=0.1)
    assert lr_at(0, 11, config) == pytest.approx(1.0)
    assert lr_at(5, 11, config) == pytest.approx(0.55)
    assert lr_at(10, 11, config) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"epochs": 0, "max_steps": 0}, "needs a budget"),
        ({"lr": -1}, "lr must be > 0"),
        ({"lr_schedule": "step"}, "cosine, constant"),
        ({"clip": 0}, "clip must be > 0"),
    ],
)
def test_bad_train_configs_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.fixture(scope="module")
def ptb_small(ptb_dir):
    vocab = Vocabulary.build(count_words([ptb_dir / "ptb.valid.txt"]))
    return vocab, encode_file(ptb_dir / "ptb.valid.txt", vocab)


@pytest.mark.parametrize("kind", ["lightrnn", "full"])
def test_training_on_real_text_lowers_loss_and_perplexity(ptb_small, kind: str) -> None:
    vocab, stream = ptb_small
    torch.manual_seed(0)
    model = build_model(ModelConfig(len(vocab), kind, 32, 32, 1, dropout=0.0))
    held_out = stream[-3000:]
    before = evaluate(model, held_out, vocab.eos_id).ppl
    config = TrainConfig(batch_size=16, bptt=20, max_steps=60, lr=1e-2, log_every=20)
    result = train(model, stream[:-3000], config)
    after = evaluate(model, held_out, vocab.eos_id).ppl
    assert result.steps == 60 and len(result.history) == 3
    assert result.history[-1].loss < result.history[0].loss - 0.5
    assert after < before / 2
    assert result.words_per_s > 0


def test_saved_model_loads_and_scores_identically(tmp_path, ptb_small) -> None:
    vocab, stream = ptb_small
    for kind in ("lightrnn", "adaptive"):
        model = build_model(ModelConfig(len(vocab), kind, 8, 8, 1)).eval()
        save_model(tmp_path / kind, model, vocab)
        loaded, loaded_vocab = load_model(tmp_path / kind)
        assert loaded_vocab == vocab
        tokens = torch.as_tensor(stream[:30]).view(2, 15)
        assert torch.allclose(model.next_word_log_probs(tokens)[0], loaded.next_word_log_probs(tokens)[0])
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_model(tmp_path / "nothing")
