"""Single-process training and standard perplexity for any `LanguageModel` here.

The token stream is cut into B parallel columns and read T words at a time
(truncated BPTT), the LSTM state carried from one segment to the next:

    stream: a b c d e f g h i j k l m n o p q r s t u v w x      (B = 4)

           col 0  col 1  col 2  col 3
            a      g      m      s      <- segment 1 inputs (T = 2): rows 0..1
            b      h      n      t
            c      i      o      u      <- segment 2 inputs: rows 2..3
            d      j      p      v         targets are the next row down
            e      k      q      w
            f      l      r      x

Evaluation scores every token of the stream: it is preceded by `<eos>` (the line
end before the first line), split into `eval_batch_size` columns of equal length
(the last padded, padding not scored), and read with the state carried across
segments, as in pytorch/examples word_language_model and Zaremba et al. 2014.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from lightrnn.config import TrainConfig
from lightrnn.model import LanguageModel, State, check_tokens, detach_state


class EmptyStreamError(ValueError):
    """A token stream too short to form even one training segment."""


def batchify(stream_N: np.ndarray | torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) stream -> (N // B, B) columns laid out as in the module docstring."""
    stream = torch.tensor(np.asarray(stream_N), dtype=torch.long)  # a copy: inputs may be read-only
    steps = stream.numel() // batch_size
    if steps < 2:
        raise EmptyStreamError(
            f"a stream of {stream.numel()} tokens cannot fill {batch_size} columns of 2+ tokens: "
            "use a larger corpus or a smaller batch_size"
        )
    return stream[: steps * batch_size].view(batch_size, steps).t().contiguous()


def segments(data_NB: torch.Tensor, bptt: int, first: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens_BT, targets_BT) pairs walking down the columns from segment `first`; the last may be shorter."""
    for i in range(first * bptt, data_NB.shape[0] - 1, bptt):
        t = min(bptt, data_NB.shape[0] - 1 - i)
        yield data_NB[i : i + t].t(), data_NB[i + 1 : i + 1 + t].t()


@dataclass
class EvalResult:
    nll: float  # summed negative log-likelihood, nats
    tokens: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


@contextmanager
def inference(model: LanguageModel) -> Iterator[LanguageModel]:
    """no_grad and eval mode (no dropout) for the duration; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def eval_columns(
    stream_N: np.ndarray | torch.Tensor, eos_id: int, batch_size: int, columns: range | None = None
) -> torch.Tensor:
    """(B, L + 1) columns of `<eos>` + the stream, as in the module docstring (the last padded).

    Column b reads positions b*L .. b*L + L of `<eos>` + stream: its inputs, then its
    targets shifted by one, so its L targets are stream tokens b*L .. b*L + L - 1.
    `columns` (default: all) picks a contiguous run of them; only its stretch is copied.
    """
    stream_N = np.asarray(stream_N)
    if stream_N.shape[0] == 0:
        raise EmptyStreamError("cannot score an empty stream")
    columns = range(batch_size) if columns is None else columns
    length = math.ceil(stream_N.shape[0] / batch_size)  # targets per column
    first, last = columns.start * length, columns.stop * length + 1  # positions in <eos> + stream
    padded = torch.full((last - first,), eos_id, dtype=torch.long)  # padding is never scored
    start, stop = max(first, 1), min(last, stream_N.shape[0] + 1)
    if start < stop:
        padded[start - first : stop - first] = torch.from_numpy(stream_N[start - 1 : stop - 1].astype(np.int64))
    return padded.unfold(0, length + 1, length).contiguous()  # windows overlapping by one position


def log_probs_along(model: LanguageModel, inputs_BL1: torch.Tensor, bptt: int) -> torch.Tensor:
    """log P of every target of B sequences read in `bptt` segments, the state carried: (B, L) float64, CPU.

    `inputs_BL1[:, t + 1]` is the target after reading `inputs_BL1[:, : t + 1]`; every
    sequence starts from a zero state. The one scoring loop of evaluation and inference.
    The ids are checked once, here; the scores stay on the model's device until the end.
    """
    device = next(model.parameters()).device
    inputs_BL1 = check_tokens(inputs_BL1, model.vocab_size).to(device)
    length = inputs_BL1.shape[1] - 1
    logp_BL = torch.empty(inputs_BL1.shape[0], length, dtype=torch.float64, device=device)
    state: State | None = None
    with inference(model):
        for i in range(0, length, bptt):
            t = min(bptt, length - i)
            x_BT, y_BT = inputs_BL1[:, i : i + t], inputs_BL1[:, i + 1 : i + 1 + t]
            logp_BT, state = model.target_log_probs(x_BT, y_BT, state, check=False)
            logp_BL[:, i : i + t] = logp_BT.double()
    return logp_BL.cpu()


def score_stream(
    model: LanguageModel, stream_N: np.ndarray, eos_id: int, batch_size: int = 10, bptt: int = 35
) -> np.ndarray:
    """log P of every token of `stream_N`, (N,) float64, read as the module docstring shows.

    The stream is preceded by `<eos>` and cut into `batch_size` columns read in parallel,
    the state carried across segments; a column starts from a zero state. With
    batch_size=1 every token is conditioned on the whole text before it.
    """
    cols_BL1 = eval_columns(stream_N, eos_id, batch_size)
    return log_probs_along(model, cols_BL1, bptt).reshape(-1)[: len(stream_N)].numpy()


def evaluate(
    model: LanguageModel, stream_N: np.ndarray, eos_id: int, batch_size: int = 10, bptt: int = 35
) -> EvalResult:
    """Perplexity over every token of `stream_N` (see the module docstring), on the model's device."""
    return evaluate_columns(model, stream_N, eos_id, batch_size, bptt, range(batch_size))


def column_share(batch_size: int, rank: int, world: int) -> range:
    """The evaluation columns rank `rank` of `world` scores: a contiguous run, as even as can be."""
    return range(batch_size * rank // world, batch_size * (rank + 1) // world)


def evaluate_columns(
    model: LanguageModel, stream_N: np.ndarray, eos_id: int, batch_size: int, bptt: int, columns: range
) -> EvalResult:
    """The summed NLL and token count of `columns` of `evaluate`'s layout.

    Columns are independent (each starts from a zero state), so the sums over a partition
    of the columns add up to `evaluate`'s: data-parallel evaluation gives the same figure.
    A contiguous run of columns is a contiguous stretch of the stream.
    """
    if len(columns) == 0:
        return EvalResult(nll=0.0, tokens=0)
    cols_BL1 = eval_columns(stream_N, eos_id, batch_size, columns)
    length = cols_BL1.shape[1] - 1
    logp_BL = log_probs_along(model, cols_BL1, bptt)
    # target t of column b is stream token b * length + t; the padding after the stream is not scored
    position_BL = torch.arange(columns.start, columns.stop).unsqueeze(1) * length + torch.arange(length)
    scored_BL = position_BL < len(stream_N)
    return EvalResult(nll=-float(logp_BL[scored_BL].sum()), tokens=int(scored_BL.sum()))


@dataclass
class StepLog:
    step: int
    epoch: float
    loss: float
    lr: float
    words_per_s: float


@dataclass
class TrainResult:
    steps: int = 0
    words: int = 0
    seconds: float = 0.0
    final_train_loss: float = float("nan")
    history: list[StepLog] = field(default_factory=list)
    valid: list[tuple[int, float]] = field(default_factory=list)  # (step, ppl) per epoch

    @property
    def words_per_s(self) -> float:
        return self.words / self.seconds if self.seconds else 0.0


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Learning rate at `step` (0-based) of `total_steps`."""
    if config.lr_schedule == "constant" or total_steps <= 1:
        return config.lr
    progress = min(step / (total_steps - 1), 1.0)
    floor = config.lr * config.lr_min_ratio
    return floor + (config.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(train_stream_len: int, config: TrainConfig) -> int:
    """Optimizer steps in the budget: max_steps if set, else `epochs` passes."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil((train_stream_len // config.batch_size - 1) / config.bptt)
    return max(1, round(per_epoch * config.epochs))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens_BT: torch.Tensor,
    targets_BT: torch.Tensor,
    state: State | None,
    lr: float,
    clip: float,
    autocast: AbstractContextManager | None = None,
) -> tuple[torch.Tensor, State]:
    """One truncated-BPTT step: set the LR, forward under `autocast`, backward, clip, update.

    `model` may be a DDP wrapper; returns the detached loss and the state to carry on.
    Nothing here waits for the device: the ids must have been checked where they were read
    (`check_tokens`), and the loss stays a device tensor.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast or nullcontext():
        loss, state = model(tokens_BT, targets_BT, detach_state(state), check=False)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.detach(), state


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train(
    model: LanguageModel,
    train_stream: np.ndarray,
    config: TrainConfig,
    *,
    valid_fn: Callable[[LanguageModel], float] | None = None,
    on_log: Callable[[StepLog], None] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    steps_budget: int | None = None,
) -> TrainResult:
    """Train on `train_stream` for the configured budget; returns losses and timings.

    `valid_fn(model) -> ppl` runs after every epoch and at the end. `start_step` and
    `steps_budget` let a caller run one phase of a longer schedule: the LR follows the
    whole schedule of `total_steps`, and reading resumes at the segment where step
    `start_step` falls (the LSTM state starts afresh there).
    """
    data_NB = check_tokens(batchify(train_stream, config.batch_size), model.vocab_size, "train_stream")
    data_NB = data_NB.to(config.device)
    schedule_len = total_steps(len(train_stream), config)
    budget = steps_budget if steps_budget is not None else schedule_len - start_step
    optimizer = optimizer or make_optimizer(model, config)
    result = TrainResult()
    model.train()
    per_epoch = math.ceil((data_NB.shape[0] - 1) / config.bptt)
    # the loss is summed on the device and read at log steps only: no host sync per step
    window_loss = torch.zeros((), dtype=torch.float64, device=config.device)
    step, window_words, window_start = start_step, 0, time.perf_counter()
    started, eval_seconds = time.perf_counter(), 0.0
    first = start_step % per_epoch
    while result.steps < budget:
        state: State | None = None
        for x_BT, y_BT in segments(data_NB, config.bptt, first):
            lr = lr_at(step, schedule_len, config)
            loss, state = train_step(model, optimizer, x_BT, y_BT, state, lr, config.clip)
            step += 1
            result.steps += 1
            words = x_BT.numel()
            result.words += words
            window_loss += loss.double() * words
            window_words += words
            last = result.steps >= budget
            if step % config.log_every == 0 or last:
                now = time.perf_counter()
                mean = float(window_loss) / window_words
                log = StepLog(step, step / per_epoch, mean, lr, window_words / (now - window_start))
                result.history.append(log)
                result.final_train_loss = float(loss)
                if on_log:
                    on_log(log)
                window_loss.zero_()
                window_words, window_start = 0, now
            if last:
                break
        first = 0
        if valid_fn is not None:
            eval_start = time.perf_counter()
            result.valid.append((step, valid_fn(model)))
            model.train()
            window_start = time.perf_counter()
            eval_seconds += window_start - eval_start
    result.seconds = time.perf_counter() - started - eval_seconds  # training time only
    return result
