"""Connecting a job to Ray: the cluster it was submitted to, or a local one."""

from __future__ import annotations

import os

import ray


def connect_ray(num_cpus: int | None = None, env_vars: dict[str, str] | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    `num_cpus` sizes only a local Ray (None: all cores); a no-op if Ray is already up.
    `env_vars` reach every task and worker of the job (Ray merges them into the job's runtime
    environment): the processes of a running cluster do not see the driver's environment.
    """
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
