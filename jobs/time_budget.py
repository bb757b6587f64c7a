"""Training for a time budget instead of a step budget: the equal-time mode of `jobs.compare`.

The budget is seconds on one clock, checked after every step, so every run trains for the
same time whatever its speed and whatever else the machine runs:

    cpu   this process's CPU seconds (the default). With one thread per process, that is the
          compute the run received, so a second job on the machine costs each run steps, not
          seconds, and runs taken one after another on a busy machine stay comparable.
    wall  elapsed seconds: what a dedicated machine gives; the clock to use on a GPU, where
          the CPU waits for the device.

    budget T on the clock, rounds = 2, span = 0.5:

    | train ... | costs + solve | train ... | costs + solve | train ....................... |
    0          T/6                         T/3                                             T

The learning rate follows `lr_at`'s schedule at the elapsed share of the budget, so every run
ends its schedule when its time is up. A reallocation's cost pass and solve run on the same
clock: they take time the other variants spend training. Validation after each phase is off
the clock, as it is in `lightrnn.train.train`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from lightrnn.config import ReallocConfig, TrainConfig
from lightrnn.model import LanguageModel, LightRNN, State
from lightrnn.phases import PhasedResult, PhaseReport, reallocate
from lightrnn.train import StepLog, batchify, lr_at, make_optimizer, segments, train_step

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
SCHEDULE_RESOLUTION = 1_000_000  # lr_at reads progress as step / (total - 1): a fine grid of the budget


def _epochs(data_NB: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """Training segments for ever; the flag marks an epoch's first segment (the LSTM state starts afresh)."""
    while True:
        for i, (x_BT, y_BT) in enumerate(segments(data_NB, bptt)):
            yield x_BT, y_BT, i == 0


def train_for_time(
    model: LanguageModel,
    train_stream: np.ndarray,
    train_config: TrainConfig,
    realloc_config: ReallocConfig,
    budget_seconds: float,
    clock: str = "cpu",
    *,
    valid_fn: Callable[[LanguageModel], float] | None = None,
    on_log: Callable[[StepLog], None] | None = None,
    on_phase: Callable[[PhaseReport], None] | None = None,
) -> PhasedResult:
    """Train until `budget_seconds` of `clock` are spent, reallocating `realloc_config.rounds` times (LightRNN)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    if budget_seconds <= 0:
        raise ValueError(f"budget_seconds must be > 0, got {budget_seconds}")
    rounds = realloc_config.rounds
    if rounds and not isinstance(model, LightRNN):
        raise ValueError(f"reallocation applies to LightRNN only, not {model.config.kind!r}; set rounds=0")
    now = CLOCKS[clock]
    cuts = [realloc_config.span * budget_seconds * k / (rounds + 1) for k in range(1, rounds + 1)]
    data_NB = batchify(train_stream, train_config.batch_size).to(train_config.device)
    per_epoch = math.ceil((data_NB.shape[0] - 1) / train_config.bptt)
    batches = _epochs(data_NB, train_config.bptt)
    optimizer = make_optimizer(model, train_config)
    result = PhasedResult()
    state: State | None = None
    used = 0.0  # seconds on the clock spent training or reallocating
    phase_words, phase_seconds, loss = 0, 0.0, float("nan")
    window_loss, window_words, window_seconds = 0.0, 0, 0.0
    model.train()
    last = now()
    while True:
        done = used >= budget_seconds
        if done or (len(result.phases) < rounds and used >= cuts[len(result.phases)]):
            report = PhaseReport(len(result.phases), result.steps, loss, phase_words / max(phase_seconds, 1e-9))
            if valid_fn is not None:
                report.valid_ppl = valid_fn(model)
                model.train()
            if not done:
                start = now()
                assert isinstance(model, LightRNN)
                report.realloc = reallocate(model, train_stream, train_config, realloc_config)
                spent = now() - start
                used += spent
                result.realloc_seconds += spent
            result.phases.append(report)
            if on_phase is not None:
                on_phase(report)
            if done:
                return result
            phase_words, phase_seconds = 0, 0.0
            last = now()  # validation is off the clock
            continue
        x_BT, y_BT, fresh = next(batches)
        lr = lr_at(round(used / budget_seconds * SCHEDULE_RESOLUTION), SCHEDULE_RESOLUTION + 1, train_config)
        step_loss, state = train_step(model, optimizer, x_BT, y_BT, None if fresh else state, lr, train_config.clip)
        loss = float(step_loss)
        tick = now()
        spent, last = tick - last, tick
        used += spent
        words = x_BT.numel()
        result.steps += 1
        result.words += words
        result.train_seconds += spent
        phase_words, phase_seconds = phase_words + words, phase_seconds + spent
        window_loss, window_words, window_seconds = (
            window_loss + loss * words,
            window_words + words,
            window_seconds + spent,
        )
        if on_log is not None and result.steps % train_config.log_every == 0:
            rate = window_words / max(window_seconds, 1e-9)
            on_log(StepLog(result.steps, result.steps / per_epoch, window_loss / window_words, lr, rate))
            window_loss, window_words, window_seconds = 0.0, 0, 0.0
