"""The RayJobs in infra/ as a cluster runs them: each entrypoint through the two shells that
start it on the head, and the Argo Workflow that runs the pipeline's stages as RayJobs in order."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import ray
import yaml
from infra_common import (
    ARGO,
    RAYJOB_SOURCES,
    WORKFLOW_ARGUMENTS,
    k8s_docs,
    load_all,
    rayjobs_of,
    settings,
    workflow_run,
)
from infra_render import (
    INFRA,
    WORKFLOW,
    rendered,
)
from mlflow.tracking import MlflowClient
from ray.dashboard.modules.job.cli import submit as ray_job_submit

from jobs.configs import get_preset
from jobs.pipeline import build_parser as pipeline_parser
from jobs.pipeline import main as pipeline_main
from jobs.prepare import parse_args as prepare_args
from pipeline.orchestrate import PipelineOptions, run_pipeline, stage_names

# ---------------------------------------------------------------- a RayJob's entrypoint, as a cluster runs it


def image_env() -> dict[str, str]:
    """The ENV the worker image sets: what the head and KubeRay's submitter pod (same image) start with."""
    return dict(re.findall(r"^ENV\s+(\w+)=(\S+)", (INFRA / "docker" / "Dockerfile").read_text(), re.M))


def words_after(shell: str, command_line: str, env: dict[str, str]) -> list[str]:
    """The words `shell -c` makes of `command_line` (expansion, quoting, splitting) in `env`."""
    script = f'set -- {command_line} ; printf "%s\\0" "$@"'
    done = subprocess.run([shell, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{shell} could not run {command_line!r}: {done.stderr}"
    return done.stdout.split("\0")[:-1]


def entrypoint_on_the_head(job: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """The words the job's driver process gets on the head, and the head's environment.

    1. KubeRay's submitter pod runs `ray job submit --address URL --no-wait --runtime-env-json
       JSON --submission-id ID -- ENTRYPOINT` through /bin/bash -c (KubeRay's
       BuildJobSubmitCommand), with the head image's environment and KubeRay's two variables,
       not the head's envFrom.
    2. `ray job submit` (its real command-line parser here) takes the words after `--` and
       joins them with shlex.join, which quotes each one (ray/dashboard/modules/job/cli.py).
    3. The job supervisor on the head runs that string with /bin/sh -c in the head's
       environment: the image's, the ConfigMap and Secret from envFrom, the runtime env's vars.
    """
    spec = job["spec"]
    runtime_env = json.dumps(yaml.safe_load(spec.get("runtimeEnvYAML") or "{}"))
    address = "http://lightrnn-raycluster-abcde-head-svc.lightrnn.svc.cluster.local:8265"
    # KubeRay quotes the JSON with Go's strconv.Quote: for ASCII text, what json.dumps does to a string
    submit_line = f"--address {address} --no-wait --runtime-env-json {json.dumps(runtime_env)} "
    submit_line += f"--submission-id lightrnn-abcde -- {spec['entrypoint'].strip()}"
    submitter_env = {**image_env(), "RAY_DASHBOARD_ADDRESS": "lightrnn-raycluster-abcde-head-svc.lightrnn.svc:8265",
                     "RAY_JOB_SUBMISSION_ID": "lightrnn-abcde", "HOME": "/home/ray"}  # fmt: skip
    params = ray_job_submit.make_context("submit", words_after("/bin/bash", submit_line, submitter_env)).params
    assert json.loads(params["runtime_env_json"]) == json.loads(runtime_env), "the runtime env did not survive bash"
    head_env = {**image_env(), **settings(), "AWS_ACCESS_KEY_ID": "from-secret", "AWS_SECRET_ACCESS_KEY": "from-secret"}
    head_env |= {k: str(v) for k, v in json.loads(runtime_env).get("env_vars", {}).items()}
    return words_after("/bin/sh", shlex.join(params["entrypoint"]), head_env), head_env


def parse_job(words: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """`python -m jobs.X ARGS` parsed by the job's own parser, in `env` (the defaults it reads)."""
    assert words[:2] == ["python", "-m"] and words[2] in ("jobs.pipeline", "jobs.prepare"), words[:3]
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        return pipeline_parser().parse_args(words[3:]) if words[2] == "jobs.pipeline" else prepare_args(words[3:])
    except SystemExit:
        pytest.fail(f"{words[2]} refuses the arguments it gets on the head: {words[3:]}")


@pytest.mark.parametrize("source", RAYJOB_SOURCES)
def test_rayjob_entrypoint_reaches_the_head_with_every_argument(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for job in rayjobs_of(source):
        written = shlex.split(job["spec"]["entrypoint"])
        words, head_env = entrypoint_on_the_head(job)
        assert words == written, f"the shells changed the entrypoint:\n  written {written}\n  on head {words}"
        assert all(w and "$" not in w for w in words), f"an empty or unexpanded argument reaches the head: {words}"
        args = parse_job(words, head_env, monkeypatch)
        root = args.root if words[2] == "jobs.pipeline" else args.output
        assert urlparse(root).scheme == "s3" and urlparse(root).netloc, f"the run root {root!r} names no bucket"
        if words[2] == "jobs.pipeline":
            # MLflow's address and experiment come from the head's environment (the ConfigMap)
            assert (args.tracking_uri, args.experiment) == (
                settings()["MLFLOW_TRACKING_URI"], settings()["MLFLOW_EXPERIMENT_NAME"]
            )  # fmt: skip


def test_pipeline_reads_mlflow_settings_from_the_environment_unless_flags_say_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    args = pipeline_parser().parse_args(["--config", "tiny"])
    assert (args.tracking_uri, args.experiment) == ("", PipelineOptions.experiment)  # sqlite beside the root
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    args = pipeline_parser().parse_args(["--config", "tiny"])
    assert (args.tracking_uri, args.experiment) == ("http://mlflow.example:5000", "from-env")
    args = pipeline_parser().parse_args(["--config", "tiny", "--tracking-uri", "http://flag:5000", "--experiment", "x"])
    assert (args.tracking_uri, args.experiment) == ("http://flag:5000", "x")


# ---------------------------------------------------------------- the scheduler: an Argo Workflow of RayJobs


def plan_and_stage_words() -> tuple[list[str], list[list[str]]]:
    """The plan step's command and each stage's entrypoint, as the words the shells make of them."""
    run = workflow_run()
    ((_, plan, _),) = run.scripts
    assert plan["script"]["command"] == ["/bin/bash"], plan["script"]["command"]
    plan_words = words_after("/bin/bash", plan["script"]["source"], image_env())
    return plan_words, [shlex.split(job["spec"]["entrypoint"]) for _, _, job in run.rayjobs]


def test_workflow_runs_every_stage_as_its_own_ray_job_in_order_each_retried() -> None:
    (workflow,) = rendered(WORKFLOW)
    assert (workflow["apiVersion"], workflow["kind"]) == ("argoproj.io/v1alpha1", "Workflow")
    run = workflow_run()
    ((_, _, printed),) = run.scripts
    plan_words, jobs = plan_and_stage_words()
    plan = pipeline_parser().parse_args(plan_words[3:])
    assert plan.list_stages and plan_words[:3] == ["python", "-m", "jobs.pipeline"], plan_words
    stages = stage_names(get_preset(plan.config).with_overrides(plan.set))
    assert json.loads(printed) == stages
    assert {"data", "train-0", "costs-0", "realloc-0", "train-1", "evaluate", "export"} <= set(stages)
    # one Ray job per stage, in order, each stopping after its stage
    assert [job[:3] for job in jobs] == [["python", "-m", "jobs.pipeline"]] * len(stages)
    parsed = [pipeline_parser().parse_args(job[3:]) for job in jobs]
    assert [args.until for args in parsed] == stages
    # the same run in every job and in the plan: its root, configuration and settings
    same = [{k: v for k, v in vars(args).items() if k not in ("until", "list_stages")} for args in [plan, *parsed]]
    assert all(s == same[0] for s in same), "the plan and the stage jobs do not run the same pipeline"
    assert parsed[0].root == WORKFLOW_ARGUMENTS["root"], "the run root is not the Workflow's parameter"
    for step, template, job in run.rayjobs:
        assert int(template["retryStrategy"]["limit"]) >= 1, f"{step} is not retried"
        resource = template["resource"]
        assert resource["action"] == "create" and job["metadata"]["generateName"], "each try is a new RayJob"
        assert resource["successCondition"] == "status.jobStatus == SUCCEEDED"
        assert resource["failureCondition"] == "status.jobDeploymentStatus == Failed"
    (rbac_account,) = [d for d in load_all(ARGO / "rbac.yaml") if d["kind"] == "ServiceAccount"]
    assert workflow["spec"]["serviceAccountName"] == rbac_account["metadata"]["name"]
    (role,) = [d for d in load_all(ARGO / "rbac.yaml") if d["kind"] == "Role"]
    assert any("rayjobs" in r["resources"] and {"create", "get", "watch"} <= set(r["verbs"]) for r in role["rules"])


def test_workflow_loop_runs_one_stage_at_a_time_and_none_after_a_failure() -> None:
    (workflow,) = rendered(WORKFLOW)
    templates = {t["name"]: t for t in workflow["spec"]["templates"]}
    loops = [(t, s) for t in templates.values() for group in t.get("steps", []) for s in group if "withParam" in s]
    ((loop, item),) = loops
    # Argo starts a loop's items together, in no set order, unless the template limits them
    assert loop.get("parallelism") == 1, "the stages of the loop would run at once"
    assert loop.get("failFast") is True, "a failed stage would not stop the stages after it"
    # the loop counts a running steps node as busy, a retry waiting out its backoff as idle
    stage = templates[item["template"]]
    assert "steps" in stage and "retryStrategy" not in stage, "the next stage would start during a retry's backoff"
    (inner,) = [s for group in stage["steps"] for s in group]
    assert "retryStrategy" in templates[inner["template"]]


def test_pipeline_lists_its_stages_and_refuses_an_unknown_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert pipeline_main(["--config", "tiny", "--list-stages"]) == 0
    assert json.loads(capsys.readouterr().out) == stage_names(get_preset("tiny"))  # stdout holds the list alone
    assert pipeline_main(["--config", "tiny", "--set", "model.kind=full", "--list-stages"]) == 0
    assert json.loads(capsys.readouterr().out) == ["data", "train-0", "evaluate", "export"]
    assert pipeline_main(["--config", "tiny", "--until", "realloc-1"]) == 2  # tiny has one reallocation
    assert "its stages: data, train-0, costs-0, realloc-0, train-1, evaluate, export" in capsys.readouterr().err


@pytest.fixture
def ray_local() -> Iterator[None]:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_pipeline_until_stops_after_the_stage_and_the_next_job_resumes_its_mlflow_run(
    tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = get_preset("tiny")
    options = PipelineOptions(root=str(tmp_path / "tiny"), workers=1)
    first = run_pipeline(tiny, options, until="data")
    assert first["stages_done"] == ["data"] and "test_ppl" not in first
    assert sorted(p.name for p in (tmp_path / "tiny" / "stages").iterdir()) == ["data.json"]
    second = run_pipeline(tiny, options, until="data")  # the same stage again: committed, skipped
    assert "[skip] data:" in capsys.readouterr().out
    assert second["mlflow_run_id"] == first["mlflow_run_id"], "the second job started a new MLflow parent run"
    client = MlflowClient(first["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(options.experiment).experiment_id])
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [first["mlflow_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first["mlflow_run_id"]]
    assert [(r.info.run_name, r.info.status) for r in children] == [("data", "FINISHED")]
    assert client.get_run(first["mlflow_run_id"]).info.status == "FINISHED"  # until the next job resumes it


def test_workflow_rayjobs_have_the_cluster_of_rayjob_yaml() -> None:
    (job,) = k8s_docs("RayJob")
    for name, _, step_job in workflow_run().rayjobs:
        assert step_job["spec"]["rayClusterSpec"] == job["spec"]["rayClusterSpec"], f"{name}'s cluster differs"
