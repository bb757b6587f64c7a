"""LightRNN and its algorithms in plain PyTorch, numpy and OR-Tools (no Ray, no MLflow)."""
