"""Single-process phase loop: train, accumulate costs, reallocate, train on (Li et al. 2016, Alg. 1).

    budget of S optimizer steps, rounds = 2, span = 1:

    | phase 0: S/3 steps | costs + solve | phase 1: S/3 steps | costs + solve | phase 2: S/3 |

    span = 0.5 puts the reallocations at S/6 and S/3, leaving 2S/3 to use the last one.

The learning-rate schedule and the position in the data run across phases as if there
were no breaks, so a run with reallocation and one without see the same batches in the
same order with the same learning rates: only the allocation differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lightrnn.allocation import Allocation
from lightrnn.config import ReallocConfig, TrainConfig
from lightrnn.costs import accumulate_head_inputs, cost_blocks
from lightrnn.model import LanguageModel, LightRNN
from lightrnn.realloc import solve_reallocation
from lightrnn.train import StepLog, make_optimizer, total_steps, train


@dataclass
class PhaseReport:
    phase: int
    end_step: int
    train_loss: float
    words_per_s: float
    valid_ppl: float | None = None
    realloc: dict[str, float | int | str] | None = None  # ReallocStats.as_dict() of the reallocation after it


@dataclass
class PhasedResult:
    phases: list[PhaseReport] = field(default_factory=list)
    steps: int = 0
    words: int = 0
    train_seconds: float = 0.0
    realloc_seconds: float = 0.0  # cost passes and solves

    @property
    def words_per_s(self) -> float:
        return self.words / self.train_seconds if self.train_seconds else 0.0


def phase_bounds(total_steps: int, rounds: int, span: float = 1.0) -> list[int]:
    """Step boundaries [0, ..., total] of `rounds + 1` phases (see the module docstring)."""
    cuts = np.arange(1, rounds + 1) * span * total_steps / (rounds + 1)
    return [int(b) for b in np.concatenate(([0], np.maximum(cuts.round(), 1), [total_steps]))]


def initial_allocation(counts_V: np.ndarray, config: ReallocConfig, seed: int) -> Allocation:
    """The table training starts from: `config.initial` is random (by seed) or frequency-ordered."""
    if config.initial == "frequency":
        return Allocation.frequency_ordered(np.asarray(counts_V))
    return Allocation.random(len(counts_V), seed=seed)


def reallocate(model: LightRNN, train_stream: np.ndarray, train: TrainConfig, realloc: ReallocConfig) -> dict:
    """One cost pass over the training stream and one solve; moves the words and returns the solver's figures."""
    sums = accumulate_head_inputs(
        model, train_stream, train.batch_size, train.bptt, realloc.cost_tokens, device=train.device
    )
    costs = cost_blocks(model, sums, realloc.stay_bonus)
    allocation, stats = solve_reallocation(costs, None, model.allocation(), method=realloc.method, k=realloc.k)
    model.set_allocation(allocation)
    return stats.as_dict()


def train_with_reallocation(
    model: LanguageModel,
    train_stream: np.ndarray,
    train_config: TrainConfig,
    realloc_config: ReallocConfig,
    *,
    valid_fn: Callable[[LanguageModel], float] | None = None,
    on_log: Callable[[StepLog], None] | None = None,
    on_phase: Callable[[PhaseReport], None] | None = None,
) -> PhasedResult:
    """Train for the configured budget, reallocating `realloc_config.rounds` times (LightRNN only)."""
    rounds = realloc_config.rounds
    if rounds and not isinstance(model, LightRNN):
        raise ValueError(f"reallocation applies to LightRNN only, not {model.config.kind!r}; set rounds=0")
    schedule = total_steps(len(train_stream), train_config)
    if rounds >= schedule:
        raise ValueError(f"{rounds} reallocation rounds need more than {schedule} training steps")
    bounds = phase_bounds(schedule, rounds, realloc_config.span)
    optimizer = make_optimizer(model, train_config)
    result = PhasedResult()
    for phase in range(rounds + 1):
        part = train(
            model,
            train_stream,
            train_config,
            on_log=on_log,
            optimizer=optimizer,
            start_step=int(bounds[phase]),
            steps_budget=int(bounds[phase + 1] - bounds[phase]),
        )
        result.steps += part.steps
        result.words += part.words
        result.train_seconds += part.seconds
        report = PhaseReport(phase, int(bounds[phase + 1]), part.final_train_loss, part.words_per_s)
        if valid_fn is not None:
            report.valid_ppl = valid_fn(model)
        if phase < rounds:
            assert isinstance(model, LightRNN)
            start = time.perf_counter()
            report.realloc = reallocate(model, train_stream, train_config, realloc_config)
            result.realloc_seconds += time.perf_counter() - start
        result.phases.append(report)
        if on_phase is not None:
            on_phase(report)
    return result
