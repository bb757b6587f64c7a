"""Held-out evaluation inside the Ray Train workers: each rank scores a share of the columns."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist

from lightrnn.config import TrainConfig
from lightrnn.model import LanguageModel
from lightrnn.train import EvalResult, column_share, evaluate_columns
from pipeline.dataset import TokenDataset


def eos_id(dataset: TokenDataset) -> int:
    """The `<eos>` id from the dataset's manifest: the words themselves are never loaded here."""
    eos = dataset.manifest["vocab"].get("eos_id")
    if eos is None:
        raise ValueError(
            f"{dataset.root}/manifest.json does not record the <eos> id (it was prepared by an older "
            "version): prepare the dataset again"
        )
    return int(eos)


def evaluate_split(
    model: LanguageModel, stream_N: np.ndarray, eos: int, config: TrainConfig, world: tuple[int, int]
) -> EvalResult:
    """Perplexity terms of a whole split, each rank scoring its share of the evaluation columns.

    Rank r of w scores a contiguous run of the `config.eval_batch_size` columns on its own
    device (`lightrnn.train.evaluate_columns`); the summed NLL and token counts are
    all-reduced, so every rank returns the figure `lightrnn.train.evaluate` gives in one
    process. Every rank must call it (a collective when w > 1).
    """
    rank, size = world
    share = column_share(config.eval_batch_size, rank, size)
    part = evaluate_columns(model, stream_N, eos, config.eval_batch_size, config.bptt, share)
    if size == 1:
        return part
    device = next(model.parameters()).device
    sums = torch.tensor([part.nll, float(part.tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    nll, tokens = sums.tolist()
    return EvalResult(nll=nll, tokens=int(tokens))


def evaluator(
    model: LanguageModel, dataset: TokenDataset, config: TrainConfig, world: tuple[int, int]
) -> Callable[[str], EvalResult | None]:
    """split -> the model's figures on it (None if the dataset has no such split); streams read once."""
    streams: dict[str, np.ndarray] = {}
    eos = eos_id(dataset)

    def evaluate(split: str) -> EvalResult | None:
        if split not in dataset.splits:
            return None
        if split not in streams:
            streams[split] = dataset.tokens(split)
        return evaluate_split(model, streams[split], eos, config, world)

    return evaluate
