"""jobs.time_budget: training stops when the clock's budget is spent, reallocation paid out of it."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from jobs.time_budget import train_for_time
from lightrnn.config import ModelConfig, ReallocConfig, TrainConfig
from lightrnn.model import build_model
from lightrnn.train import StepLog

STREAM = np.random.default_rng(0).integers(0, 400, 20 * 4 * 10 + 1)  # 20 segments an epoch
TRAIN = TrainConfig(batch_size=4, bptt=10, lr=1e-2, lr_min_ratio=0.1, log_every=5)


def _model(kind: str = "lightrnn") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(400, kind, 16, 16, 1, dropout=0.0))


def test_training_stops_when_the_cpu_budget_is_spent_and_the_schedule_ends_with_it() -> None:
    logs: list[StepLog] = []
    start = time.process_time()
    result = train_for_time(_model("full"), STREAM, TRAIN, ReallocConfig(), 1.0, "cpu", on_log=logs.append)
    assert 1.0 <= result.train_seconds <= 1.0 + 0.2  # one step past the budget at most
    assert result.realloc_seconds == 0.0 and len(result.phases) == 1
    assert result.steps > 20  # more than an epoch: the stream is read round again
    assert time.process_time() - start >= result.train_seconds
    assert logs[0].lr > 0.9 * TRAIN.lr and logs[-1].lr < 0.2 * TRAIN.lr  # cosine from lr towards lr_min_ratio


def test_reallocation_is_paid_out_of_the_same_budget() -> None:
    phases = []
    realloc = ReallocConfig(rounds=2, span=1.0)
    result = train_for_time(_model(), STREAM, TRAIN, realloc, 1.5, "cpu", on_phase=phases.append)
    assert [p.realloc is not None for p in result.phases] == [True, True, False]
    assert phases == result.phases
    assert result.realloc_seconds > 0
    assert 1.5 <= result.train_seconds + result.realloc_seconds <= 1.5 + 0.2
    assert result.phases[0].end_step < result.phases[1].end_step < result.phases[2].end_step == result.steps


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="clock must be one of cpu, wall"):
        train_for_time(_model(), STREAM, TRAIN, ReallocConfig(), 1.0, "gpu")
    with pytest.raises(ValueError, match="budget_seconds must be > 0"):
        train_for_time(_model(), STREAM, TRAIN, ReallocConfig(), 0.0)
    with pytest.raises(ValueError, match="reallocation applies to LightRNN only"):
        train_for_time(_model("full"), STREAM, TRAIN, ReallocConfig(rounds=1), 1.0)
