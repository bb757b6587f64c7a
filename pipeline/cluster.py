"""Connecting a job to Ray: the cluster it was submitted to, or a local one."""

from __future__ import annotations

import os

import ray

FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"  # Ray Data's knob (Ray 2.60's Parquet reader)


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
        # Ray Data reads Parquet footers with a pool of 32 actors per read (a few hundred MB
        # each), started by every rank's read at every epoch: on one machine, one per 2 cores
        # (the local Ray's workers inherit the driver's environment)
        os.environ.setdefault(FOOTER_ACTORS, str(max(1, (os.cpu_count() or 2) // 2)))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
