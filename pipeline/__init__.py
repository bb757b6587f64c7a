"""Distributed stages on Ray Data, Ray Train and Ray tasks, tracked in MLflow (not built yet).

Depends on `lightrnn`, never the other way round.
"""
