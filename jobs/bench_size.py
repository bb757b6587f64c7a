"""Parameter memory of LightRNN vs the full-softmax LSTM at a given vocabulary size.

Models are built on PyTorch's meta device, so a 10M-word full softmax (about 80 GB)
is measured without allocating it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable

import numpy as np
import torch

from lightrnn.allocation import Allocation, table_shape
from lightrnn.config import ModelConfig
from lightrnn.model import build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=10_000_000, help="vocabulary size V")
    parser.add_argument("--embed", type=int, default=1000, help="embedding width D")
    parser.add_argument("--hidden", type=int, default=1000, help="LSTM width H")
    parser.add_argument("--layers", type=int, default=1, help="LSTM layers L")


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sizes(kind: str, args: argparse.Namespace) -> dict[str, int]:
    config = ModelConfig(args.vocab, kind, args.embed, args.hidden, args.layers, dropout=0.0)
    rows, cols = table_shape(args.vocab)
    # a valid allocation without a 10M-element permutation: identity cell order
    allocation = Allocation.from_cells(np.arange(args.vocab), rows, cols) if kind == "lightrnn" else None
    with torch.device("meta"):
        model = build_model(config, allocation)
    if kind == "lightrnn":
        table_params = [
            model.row_embed.weight,
            model.col_embed.weight,
            *model.row_head.parameters(),
            *model.col_head.parameters(),
        ]
    else:
        table_params = [model.embed.weight, *model.head.parameters()]
    return {
        "param_bytes": _bytes(model.parameters()),
        "embedding_bytes": _bytes(table_params),
        "buffer_bytes": _bytes(model.buffers()),
    }


def run(args: argparse.Namespace) -> dict:
    light, full = _sizes("lightrnn", args), _sizes("full", args)
    rows, cols = table_shape(args.vocab)
    mb = 1e6
    print(f"V={args.vocab:,} D={args.embed} H={args.hidden} L={args.layers}; LightRNN table {rows} x {cols}")
    print(f"{'model':<14}{'all params':>16}{'embeddings+heads':>20}{'word->cell table':>20}")
    print(
        f"{'lightrnn':<14}{light['param_bytes'] / mb:>13,.1f} MB{light['embedding_bytes'] / mb:>17,.1f} MB"
        f"{light['buffer_bytes'] / mb:>17,.1f} MB"
    )
    print(
        f"{'full softmax':<14}{full['param_bytes'] / mb:>13,.1f} MB{full['embedding_bytes'] / mb:>17,.1f} MB{'-':>20}"
    )
    ratio = full["param_bytes"] / light["param_bytes"]
    print(
        f"full / lightrnn: {ratio:,.0f}x all parameters, "
        f"{full['embedding_bytes'] / light['embedding_bytes']:,.0f}x embeddings+heads (float32)"
    )
    return {
        "vocab": args.vocab,
        "embed": args.embed,
        "hidden": args.hidden,
        "layers": args.layers,
        "table_rows": rows,
        "table_cols": cols,
        "lightrnn_param_bytes": light["param_bytes"],
        "lightrnn_embedding_bytes": light["embedding_bytes"],
        "lightrnn_table_buffer_bytes": light["buffer_bytes"],
        "full_softmax_param_bytes": full["param_bytes"],
        "full_softmax_embedding_bytes": full["embedding_bytes"],
        "ratio": round(ratio, 1),
        "embedding_ratio": round(full["embedding_bytes"] / light["embedding_bytes"], 1),
    }
