"""Connecting a job to Ray: the cluster it was submitted to, or a local one."""

from __future__ import annotations

import os

import ray


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    `num_cpus` sizes only a local Ray (None: all cores); a no-op if Ray is already up.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
