"""Typed configuration of the model and of single-process training.

Every default carries its reason. Dataclasses are the one source of truth: presets in
`jobs/configs.py` build them, CLI overrides go through `replace_fields`, and they turn
into plain dicts only at process boundaries (`asdict` / `from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

MODEL_KINDS = ("lightrnn", "full", "adaptive")
LIGHTRNN_INPUTS = ("interleaved", "joint")
LR_SCHEDULES = ("cosine", "constant")

C = TypeVar("C")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 0  # 0 in presets: filled in from the corpus vocabulary before building
    kind: str = "lightrnn"  # one of MODEL_KINDS; baselines share the LSTM core
    embed_dim: int = 200  # the "small" PTB LSTM of Zaremba et al. 2014
    hidden_dim: int = 200  # ditto
    num_layers: int = 2  # ditto
    dropout: float = 0.2  # light regularisation for short CPU budgets
    tie_weights: bool = False  # full or lightrnn (row and column vectors in = out); needs embed_dim == hidden_dim
    adaptive_cutoffs: tuple[int, ...] = ()  # adaptive only; () = (V // 20, V // 4)
    # lightrnn only, one of LIGHTRNN_INPUTS: "interleaved" reads a word's row vector, then its
    # column vector (two LSTM steps per word, as the paper); "joint" reads both at once (one step)
    # and conditions the column head on the target row's vector (lightrnn.model docstring)
    lightrnn_input: str = "interleaved"

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {', '.join(MODEL_KINDS)}; got {self.kind!r}")
        if self.lightrnn_input not in LIGHTRNN_INPUTS:
            raise ValueError(f"lightrnn_input must be one of {', '.join(LIGHTRNN_INPUTS)}; got {self.lightrnn_input!r}")
        if self.vocab_size != 0 and self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (a language model needs a choice), got {self.vocab_size}")
        for name in ("embed_dim", "hidden_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tie_weights and (self.kind == "adaptive" or self.embed_dim != self.hidden_dim):
            raise ValueError(
                "tie_weights needs kind='full' or 'lightrnn' and embed_dim == hidden_dim "
                f"(got kind={self.kind!r}, embed_dim={self.embed_dim}, hidden_dim={self.hidden_dim})"
            )
        if self.kind == "adaptive" and self.vocab_size:
            cutoffs = self.resolved_cutoffs()
            if not cutoffs or list(cutoffs) != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] >= self.vocab_size:
                raise ValueError(
                    f"adaptive_cutoffs must be increasing ids in 1..{self.vocab_size - 1}, got {cutoffs}; "
                    "the adaptive baseline needs a vocabulary of at least 4 words"
                )

    def resolved_cutoffs(self) -> tuple[int, ...]:
        """Adaptive-softmax cluster boundaries; the default puts ~5% of ids in the head."""
        if self.adaptive_cutoffs:
            return tuple(self.adaptive_cutoffs)
        return tuple(sorted({c for c in (self.vocab_size // 20, self.vocab_size // 4) if 0 < c < self.vocab_size}))


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 20  # Zaremba et al. 2014 PTB setting
    bptt: int = 35  # words per truncated-BPTT segment, ditto
    epochs: float = 4.0  # a budget that fits the CPU demo; fractional epochs allowed
    max_steps: int = 0  # if > 0, stop after this many optimizer steps (overrides epochs)
    lr: float = 3e-3  # Adam; converges in few epochs, which a CPU budget needs
    lr_schedule: str = "cosine"  # one of LR_SCHEDULES; cosine to lr_min_ratio over the budget
    lr_min_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 0.5  # max global gradient norm; LSTMs explode without it
    eval_batch_size: int = 10  # columns of the evaluation stream (pytorch/examples uses 10)
    log_every: int = 100  # steps between progress lines
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch_size", "bptt", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0: training needs a budget")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            raise ValueError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Rebuild a config dataclass from `asdict` output, refusing unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


def replace_fields(config: C, overrides: dict[str, str]) -> C:
    """Apply `key=value` strings (from the CLI) to a config, parsing each by its field type."""
    fields = {f.name: f for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    parsed: dict[str, Any] = {}
    for key, text in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown {type(config).__name__} field {key!r}; valid: {sorted(fields)}")
        current = getattr(config, key)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                parsed[key] = text.lower() in ("true", "1")
            elif isinstance(current, tuple):
                parsed[key] = tuple(int(x) for x in text.split(",") if x)
            else:
                parsed[key] = type(current)(text)
        except ValueError as e:
            raise ValueError(f"{key}={text!r}: {e}") from e
    return dataclasses.replace(config, **parsed)  # type: ignore[type-var]


REALLOC_METHODS = ("auto", "exact", "two_stage", "dense")
INITIAL_ALLOCATIONS = ("random", "frequency")


@dataclass(frozen=True)
class ReallocConfig:
    rounds: int = 0  # reallocations between training phases; the budget is split into rounds + 1 phases
    method: str = "auto"  # one of REALLOC_METHODS, see lightrnn.realloc (auto: exact up to 250k words)
    k: int = 10  # candidate rows x candidate columns per word (docs/design.md, "Reallocation")
    cost_tokens: int = 0  # targets read by the cost pass; 0 = the whole training stream
    # reallocations are spread evenly over the first `span` of the budget: a moved word's input
    # vectors change too, and the model needs learning rate left to adapt (1.0 = equal phases)
    span: float = 1.0
    initial: str = "random"  # the first table: one of INITIAL_ALLOCATIONS (frequency = by word id, row-major)
    # nats per occurrence taken off a word's current row and current column: a move must gain
    # more than this per occurrence (0: the plain cost of eq. 3)
    stay_bonus: float = 0.0

    def __post_init__(self) -> None:
        if self.initial not in INITIAL_ALLOCATIONS:
            raise ValueError(f"realloc.initial must be one of {', '.join(INITIAL_ALLOCATIONS)}; got {self.initial!r}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.method not in REALLOC_METHODS:
            raise ValueError(f"realloc method must be one of {', '.join(REALLOC_METHODS)}; got {self.method!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 < self.span <= 1.0:
            raise ValueError(f"span must be in (0, 1], got {self.span}")
        if self.cost_tokens < 0:
            raise ValueError(f"cost_tokens must be >= 0, got {self.cost_tokens}")
        if not self.stay_bonus >= 0.0:
            raise ValueError(f"stay_bonus must be >= 0 (nats per occurrence), got {self.stay_bonus}")
