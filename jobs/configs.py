"""Named run configurations. `tiny` runs in seconds (tests); `ptb` is the CPU demo."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from lightrnn.config import ModelConfig, ReallocConfig, TrainConfig, replace_fields

SECTIONS = ("data", "model", "train", "realloc")
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


@dataclass(frozen=True)
class DataConfig:
    train: str
    valid: str
    test: str
    lower: bool = False  # PTB is already lower-cased
    max_vocab: int = 0  # 0 = keep every word seen min_count times
    min_count: int = 1


@dataclass(frozen=True)
class RunConfig:
    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    realloc: ReallocConfig = field(default_factory=ReallocConfig)  # rounds=0: a fixed allocation

    def with_overrides(self, overrides: list[str]) -> RunConfig:
        """Apply `section.field=value` strings, e.g. `model.hidden_dim=100`, `realloc.rounds=2`."""
        grouped: dict[str, dict[str, str]] = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            section, dot, name = key.partition(".")
            if not sep or not dot or section not in SECTIONS:
                raise ValueError(
                    f"override {item!r} must look like section.field=value with section one of "
                    f"{', '.join(SECTIONS)} (e.g. model.hidden_dim=100, realloc.rounds=2)"
                )
            grouped.setdefault(section, {})[name] = value
        config = self
        for section, values in grouped.items():
            config = dataclasses.replace(config, **{section: replace_fields(getattr(config, section), values)})
        return config


def _ptb(name: str) -> str:
    return str(DATA_DIR / "ptb" / name)


PRESETS: dict[str, RunConfig] = {
    "tiny": RunConfig(
        name="tiny",
        # PTB's valid split as training text: 74k tokens, enough to see the loss fall
        data=DataConfig(train=_ptb("ptb.valid.txt"), valid=_ptb("ptb.test.txt"), test=_ptb("ptb.test.txt")),
        model=ModelConfig(embed_dim=32, hidden_dim=32, num_layers=1, dropout=0.0),
        train=TrainConfig(batch_size=16, bptt=20, max_steps=40, lr=1e-2, log_every=10),
    ),
    "ptb": RunConfig(
        name="ptb",
        data=DataConfig(train=_ptb("ptb.train.txt.xz"), valid=_ptb("ptb.valid.txt"), test=_ptb("ptb.test.txt")),
        model=ModelConfig(embed_dim=200, hidden_dim=200, num_layers=2, dropout=0.2),
        train=TrainConfig(batch_size=20, bptt=35, epochs=2.0, lr=3e-3, log_every=200),
    ),
}


def get_preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
