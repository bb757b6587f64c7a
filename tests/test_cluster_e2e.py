"""The pipeline as cluster jobs, on a real local stack: Ray head + moto S3 + MLflow server.

`infra/local/stack.py up` starts the three servers on 127.0.0.1; every job goes through
`ray job submit --working-dir <repo>` to the head's HTTP address, exactly as on a cluster;
results are checked where they land (boto3 on the bucket, MLflow's REST API); `down` must
leave no process of the stack behind. The whole pipeline runs as the Argo Workflow
(infra/argo/) runs it: its plan step lists the `tiny` configuration's stages, then each stage
is a Ray job of its own, in order, with MLflow's address in the jobs' environment. The
slowest file of the suite, and those seven jobs most of its time (`--durations=5` shows it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import mlflow
import pytest
from infra_render import run_script_here, run_workflow
from ray.job_submission import JobStatus, JobSubmissionClient

from jobs.configs import get_preset
from pipeline.orchestrate import stage_names

REPO = Path(__file__).resolve().parents[1]
STACK_PY = REPO / "infra" / "local" / "stack.py"
BUCKET = "lightrnn-e2e"
JOB_TIMEOUT_S = 300


def _load_stack_module() -> Any:
    spec = importlib.util.spec_from_file_location("lightrnn_local_stack", STACK_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stack_lib = _load_stack_module()


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_PROFILE"))}
    return {**env, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def stack() -> Iterator[dict[str, Any]]:
    directory = Path(tempfile.mkdtemp(prefix="lrs-", dir="/tmp"))  # short: Ray's unix socket paths
    cmd = [sys.executable, str(STACK_PY), "up", "--dir", str(directory), "--bucket", BUCKET, "--json"]
    up = subprocess.run(cmd, env=_client_env(), capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        pytest.fail(f"stack.py up failed (exit {up.returncode}):\n{up.stdout}\n{up.stderr}")
    state = json.loads(up.stdout.strip().splitlines()[-1])
    yield state
    down = subprocess.run(
        [sys.executable, str(STACK_PY), "down", "--dir", str(directory)],
        env=_client_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 0, f"stack.py down failed:\n{down.stdout}\n{down.stderr}"
    left = stack_lib.stack_processes(state)
    assert not left, f"processes of the stack still running after down: {[p.cmdline() for p in left]}"
    assert not any(stack_lib.psutil.pid_exists(pid) for pid in state["pids"].values())
    shutil.rmtree(directory)  # logs, Ray's session dir, the MLflow database: kept only if down failed


def _job_env(state: dict[str, Any]) -> dict[str, str]:
    """What a job needs on the cluster: storage settings (dummy keys for moto) and a thread cap."""
    return {**stack_lib.DUMMY_AWS, "AWS_ENDPOINT_URL": state["s3"], "OMP_NUM_THREADS": "1"}


def submit(
    state: dict[str, Any],
    entrypoint: list[str],
    submission_id: str,
    wait: bool = True,
    env: dict[str, str] | None = None,
) -> str:
    """`ray job submit` to the head's HTTP address, with `env` in the job's environment besides
    the storage settings; returns the CLI output (logs when waiting)."""
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit",
        "--address", state["ray_dashboard"],
        "--submission-id", submission_id,
        "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"env_vars": {**_job_env(state), **(env or {})}}),
        *([] if wait else ["--no-wait"]),
        "--", *entrypoint,
    ]  # fmt: skip
    done = subprocess.run(cmd, env=_client_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    output = done.stdout + done.stderr
    if wait:
        status = JobSubmissionClient(state["ray_dashboard"]).get_job_status(submission_id)
        assert done.returncode == 0 and status == JobStatus.SUCCEEDED, (
            f"job {submission_id} ended {status} (exit {done.returncode}):\n{output[-6000:]}"
        )
    else:
        assert done.returncode == 0, output
    return output


def s3_keys(state: dict[str, Any], prefix: str) -> list[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=state["s3"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=state["bucket"], Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def mlflow_api(state: dict[str, Any], endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST to the MLflow server's REST API (what any client or dashboard sees)."""
    request = urllib.request.Request(
        f"{state['mlflow']}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def runs_of(state: dict[str, Any], experiment: str) -> list[dict[str, Any]]:
    found = mlflow_api(state, "experiments/search", {"filter": f"name = '{experiment}'", "max_results": 10})
    experiments = found.get("experiments", [])
    assert len(experiments) == 1, f"experiment {experiment!r} not on the MLflow server: {found}"
    runs = mlflow_api(state, "runs/search", {"experiment_ids": [experiments[0]["experiment_id"]], "max_results": 100})
    return runs.get("runs", [])


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


@pytest.fixture(scope="module")
def prepared(stack: dict[str, Any]) -> str:
    """The corpus stage as a job: PTB valid as train text, written to the bucket."""
    root = f"s3://{stack['bucket']}/runs/stages/data"
    output = submit(
        stack,
        ["python", "-m", "jobs.prepare", "--train", "data/ptb/ptb.valid.txt", "--valid", "data/ptb/ptb.test.txt",
         "--output", root, "--block-len", "1000", "--s3-endpoint", stack["s3"]],
        "stages-prepare",
    )  # fmt: skip
    assert "prepared train 73,760 tokens" in output, output[-3000:]
    return root


def test_stages_as_jobs_write_to_s3(stack: dict[str, Any], prepared: str) -> None:
    keys = s3_keys(stack, "runs/stages/")
    assert "runs/stages/data/manifest.json" in keys and "runs/stages/data/vocab.parquet" in keys
    assert any(k.startswith("runs/stages/data/shards/train-") for k in keys)

    output = submit(
        stack,
        ["python", "-m", "jobs.train", "--data", prepared, "--output", f"s3://{stack['bucket']}/runs/stages/train",
         "--name", "tiny", "--config", "tiny", "--workers", "1", "--max-steps", "10", "--set", "train.batch_size=4",
         "--checkpoint-every", "5", "--json"],
        "stages-train",
    )  # fmt: skip
    summary = json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))
    assert summary["steps"] == 10 and summary["checkpoint"].startswith(f"s3://{stack['bucket']}/runs/stages/train/")
    keys = s3_keys(stack, "runs/stages/train/tiny/")
    checkpoints = {k.split("/")[4] for k in keys if k.count("/") > 4 and k.split("/")[4].startswith("checkpoint_")}
    assert len(checkpoints) == 2, keys  # steps 5 and 10, each a folder of files
    assert "runs/stages/train/tiny/checkpoint_manager_snapshot.json" in keys  # what a resumed run reads


def test_mlflow_server_keeps_runs_and_puts_artifacts_on_s3(stack: dict[str, Any]) -> None:
    mlflow.set_tracking_uri(stack["mlflow"])
    try:
        mlflow.set_experiment("stack-check")
        with mlflow.start_run(run_name="parent") as parent:
            mlflow.log_metric("loss", 2.5, step=1)
            with mlflow.start_run(run_name="child", nested=True):
                mlflow.log_metric("valid_ppl", 123.0)
            mlflow.log_text("hello", "notes/hello.txt")
    finally:
        mlflow.set_tracking_uri(None)
    runs = runs_of(stack, "stack-check")
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert set(by_name) == {"parent", "child"}
    assert tags(by_name["child"])["mlflow.parentRunId"] == parent.info.run_id
    assert {m["key"]: m["value"] for m in by_name["child"]["data"]["metrics"]} == {"valid_ppl": 123.0}
    # the server proxies artifacts to its --artifacts-destination on the S3 endpoint
    keys = s3_keys(stack, "mlflow/")
    assert any(k.endswith(f"{parent.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys


def test_job_stop_ends_the_training_job(stack: dict[str, Any], prepared: str) -> None:
    job_id = "stop-train"
    submit(
        stack,
        ["python", "-m", "jobs.train", "--data", prepared, "--output", f"s3://{stack['bucket']}/runs/stages/train",
         "--name", "long", "--config", "tiny", "--workers", "1", "--max-steps", "1000000",
         "--set", "train.batch_size=4"],
        job_id,
        wait=False,
    )  # fmt: skip
    client = JobSubmissionClient(stack["ray_dashboard"])
    deadline = time.monotonic() + 120
    while "[run]" not in client.get_job_logs(job_id):  # the driver is up and the trainer starting
        status = client.get_job_status(job_id)
        assert status in (JobStatus.PENDING, JobStatus.RUNNING), f"{status}: {client.get_job_logs(job_id)[-3000:]}"
        assert time.monotonic() < deadline, "the training job did not start within 120 s"
        time.sleep(1)
    stop = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "stop", "--address", stack["ray_dashboard"], job_id],
        env=_client_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert client.get_job_status(job_id) == JobStatus.STOPPED
    drivers = [p for p in stack_lib.stack_processes(stack) if "--name long" in " ".join(p.cmdline())]
    assert not drivers, "the stopped job's driver is still running"


def test_workflow_runs_each_stage_as_a_job_with_mlflow_from_the_environment(stack: dict[str, Any]) -> None:
    root_key = "runs/tiny"
    root = f"s3://{stack['bucket']}/{root_key}"
    experiment = "e2e-tiny"
    # the Workflow's parameters for `tiny`: its corpus (relative paths resolve in the job's
    # working directory, the uploaded checkout), one CPU worker, and no reallocation, which
    # the plan step's stage list follows (four jobs; the cost pass and the solve on S3 are
    # tests/test_rehearsal.py's)
    parameters = {
        "root": root,
        "config": "tiny",
        "train": "data/ptb/ptb.valid.txt",
        "valid": "data/ptb/ptb.test.txt",
        "test": "data/ptb/ptb.test.txt",
        "pipeline-options": "--workers 1 --set realloc.rounds=0",
    }
    # the plan step runs here; each RayJob's entrypoint goes to the head with `ray job submit`
    workflow = run_workflow(parameters, run_script_here)
    stages = stage_names(get_preset("tiny").with_overrides(["realloc.rounds=0"]))
    assert stages == ["data", "train-0", "evaluate", "export"]
    assert [json.loads(printed) for _, _, printed in workflow.scripts] == [stages]
    # MLflow's settings reach the jobs as on the cluster, through their environment (there: the ConfigMap)
    mlflow_env = {"MLFLOW_TRACKING_URI": stack["mlflow"], "MLFLOW_EXPERIMENT_NAME": experiment}
    outputs = {}
    for _, _, job in workflow.rayjobs:
        words = shlex.split(job["spec"]["entrypoint"])
        assert "--tracking-uri" not in words and "--experiment" not in words, words
        stage = words[words.index("--until") + 1]
        outputs[stage] = submit(stack, words, f"workflow-{stage}", env=mlflow_env)
    assert list(outputs) == stages
    for i, stage in enumerate(stages):  # each job runs its own stage, after the committed ones
        output = outputs[stage]
        assert f"[stage] {stage}\n" in output, output[-3000:]
        assert all(f"[skip] {earlier}:" in output for earlier in stages[:i]), output[-3000:]
        assert not any(f"[stage] {later}\n" in output for later in stages[i + 1 :]), output[-3000:]
    assert "test ppl" in outputs["export"], outputs["export"][-3000:]
    keys = s3_keys(stack, root_key + "/")
    assert f"{root_key}/data/manifest.json" in keys, keys[:50]
    assert any(k.startswith(f"{root_key}/train/") and "/checkpoint_" in k for k in keys), keys[:50]
    assert {f"{root_key}/stages/{stage}.json" for stage in stages} <= set(keys), keys[:50]

    # one MLflow parent run for the four jobs, with one nested run per stage
    runs = runs_of(stack, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    assert len(parents) == 1, [r["info"]["run_name"] for r in runs]
    parent_id = parents[0]["info"]["run_id"]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent_id]
    assert sorted(r["info"]["run_name"] for r in children) == sorted(stages)
    assert len(runs) == 1 + len(stages), [r["info"]["run_name"] for r in runs]
    assert all(r["info"]["status"] == "FINISHED" for r in runs), [
        (r["info"]["run_name"], r["info"]["status"]) for r in runs
    ]
    metrics = {m["key"] for r in runs for m in r["data"].get("metrics", [])}
    assert any("loss" in k for k in metrics) and any("ppl" in k for k in metrics), metrics
