"""Model kinds the model and export tests run over: "lightrnn-joint" is LightRNN with lightrnn_input="joint"."""

from __future__ import annotations

KINDS = ("lightrnn", "lightrnn-joint", "full", "adaptive")


def kind_options(kind: str) -> tuple[str, dict[str, str]]:
    """(ModelConfig kind, extra ModelConfig fields) for one of KINDS."""
    if kind == "lightrnn-joint":
        return "lightrnn", {"lightrnn_input": "joint"}
    return kind, {}
