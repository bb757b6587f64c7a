"""What one run is: data, model, training and reallocation settings, with `section.field=value` overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lightrnn.config import ModelConfig, ReallocConfig, TrainConfig, replace_fields

SECTIONS = ("data", "model", "train", "realloc")


@dataclass(frozen=True)
class DataConfig:
    train: str
    valid: str
    test: str
    lower: bool = False  # PTB is already lower-cased
    max_vocab: int = 0  # 0 = keep every word seen min_count times
    min_count: int = 1
    block_len: int = 2048  # tokens per Parquet row of the prepared dataset (the Ray Train pipeline's unit)

    def __post_init__(self) -> None:
        if self.block_len < 2:
            raise ValueError(f"data.block_len must be >= 2, got {self.block_len}")


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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.field -> value` for every field (MLflow params, config comparisons)."""
        out: dict[str, Any] = {"name": self.name}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out
