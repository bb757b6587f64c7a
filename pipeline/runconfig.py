"""What one run is: data, model, training, reallocation and task resources, with `section.field=value` overrides.

Each concept has one dataclass and one default here or in `lightrnn.config`; cross-field
checks live in `RunConfig.__post_init__`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lightrnn.config import ModelConfig, ReallocConfig, TrainConfig, replace_fields

SECTIONS = ("data", "model", "train", "realloc", "resources")
# sections that decide the trained model; `resources` only says what the Ray tasks ask for
MODEL_SECTIONS = ("data", "model", "train", "realloc")


@dataclass(frozen=True)
class DataConfig:
    """The corpus and how the prepare stage turns it into a dataset (`pipeline.prepare`)."""

    train: str  # text or Parquet documents (pipeline.sources): a file, a folder or a glob; local, file:// or s3://
    valid: str = ""  # encoded with the train vocabulary; "" = none
    test: str = ""
    lower: bool = False  # PTB is already lower-cased
    max_vocab: int = 0  # 0 = keep every word seen min_count times (PTB/WikiText ship their own <unk>)
    min_count: int = 1
    # tokens per Parquet row of the prepared dataset, the training unit (a BPTT walk carries the
    # LSTM state inside a block): 2,048 gives PTB 453 blocks, enough for 20-block batches on 2 workers
    block_len: int = 2048
    text_column: str = "text"  # the column of document texts in Parquet input

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train must name the training corpus (a file, folder or glob URI)")
        if self.block_len < 2:
            raise ValueError(f"data.block_len must be >= 2 (an input and a target), got {self.block_len}")
        if self.max_vocab < 0 or self.max_vocab == 1:
            raise ValueError(f"data.max_vocab must be 0 (no limit) or >= 2, got {self.max_vocab}")
        if self.min_count < 1:
            raise ValueError(f"data.min_count must be >= 1, got {self.min_count}")
        if not self.text_column:
            raise ValueError("data.text_column must name the Parquet column of document texts")
        for uri in (self.train, self.valid, self.test):
            if uri.startswith("memory://"):
                raise ValueError(f"{uri}: memory:// lives in one process; Ray workers cannot see it")

    def inputs(self) -> dict[str, str]:
        """The splits this config names, in stream order: {"train": uri, "valid": uri, ...}."""
        return {s: getattr(self, s) for s in ("train", "valid", "test") if getattr(self, s)}


@dataclass(frozen=True)
class ResourcesConfig:
    """What the pipeline's Ray tasks ask for; none of it changes the trained model."""

    realloc_cpus: int = 1  # CPUs of the reallocation task (the solver's torch threads)
    realloc_memory_mb: int = 0  # memory it asks for; 0 = an estimate from the vocabulary size

    def __post_init__(self) -> None:
        if self.realloc_cpus < 1 or self.realloc_memory_mb < 0:
            raise ValueError(
                f"resources.realloc_cpus must be >= 1 and resources.realloc_memory_mb >= 0, got "
                f"{self.realloc_cpus}, {self.realloc_memory_mb}"
            )


@dataclass(frozen=True)
class RunConfig:
    name: str
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    realloc: ReallocConfig = field(default_factory=ReallocConfig)  # rounds=0: a fixed allocation
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def rounds(self) -> int:
        """Reallocations between phases: `realloc.rounds` for LightRNN; baselines have no word table."""
        return self.realloc.rounds if self.model.kind == "lightrnn" else 0

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

    def flat(self, sections: tuple[str, ...] = SECTIONS) -> dict[str, Any]:
        """`section.field -> value` for every field of `sections` (MLflow params, config comparisons)."""
        out: dict[str, Any] = {"name": self.name}
        for section in sections:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out
