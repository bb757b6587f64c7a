"""The deployment files in infra/: they parse, fit the configurations they advertise, and work as run.

Every `python -m jobs.X --flag` written in infra/ (manifests, comments, Dockerfiles) must
name an existing module and flags that `python -m jobs.X --help` lists; `ray start` and
`mlflow server` options are checked against the installed Ray and MLflow the same way. The
RayJobs' entrypoints go through the two shells that run them on a cluster, the RayJobs
through KubeRay's CRD schema (infra/schemas/), the cluster sizes through the resources Ray's
autoscalers see, and MLflow's allowed hosts through MLflow's own check.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import mlflow
import pytest
import ray
import yaml
from infra_render import (
    GUIDE,
    INFRA,
    REPO,
    WORKFLOW,
    WorkflowRun,
    placeholders,
    render,
    rendered,
    run_script_here,
    run_workflow,
)
from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header
from mlflow.tracking import MlflowClient
from ray._private import ray_constants
from ray.autoscaler._private.aws.config import DEFAULT_AMI
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.dashboard.modules.job.cli import submit as ray_job_submit

from jobs.configs import PRESETS, get_preset
from jobs.pipeline import build_parser as pipeline_parser
from jobs.pipeline import main as pipeline_main
from jobs.prepare import parse_args as prepare_args
from pipeline.orchestrate import PipelineOptions, run_pipeline, stage_names
from pipeline.runconfig import RunConfig
from pipeline.tasks import task_memory_bytes

MANIFESTS = sorted(INFRA.rglob("*.yaml"))
DOCKERFILES = sorted(INFRA.rglob("*Dockerfile"))
K8S = INFRA / "k8s"
ARGO = INFRA / "argo"
LAUNCHER = INFRA / "ray-cluster.yaml"
RAYJOB_SCHEMA = INFRA / "schemas" / "kuberay-rayjob-v1.yaml"
BIN = Path(sys.executable).parent

# what a user passes when submitting the Workflow (its parameters without a default)
WORKFLOW_ARGUMENTS = {
    "root": "s3://example-runs/runs/clueweb-1",
    "train": "s3://example-corpus/clueweb/train/",
    "valid": "s3://example-corpus/clueweb/valid/",
    "test": "s3://example-corpus/clueweb/test/",
}


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def strings_in(node: Any) -> list[str]:
    """Every string value (and key) in a parsed YAML document."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in [*strings_in(k), *strings_in(v)]]
    if isinstance(node, list):
        return [s for v in node for s in strings_in(v)]
    return []


@functools.cache
def help_flags(*command: str) -> frozenset[str]:
    """The long options a command's --help lists."""
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, f"{' '.join(command)} --help failed:\n{done.stderr[-3000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", done.stdout))


def flags_of(args: str) -> list[str]:
    return [token.split("=", 1)[0] for token in shlex.split(args) if token.startswith("--")]


def k8s_docs(kind: str) -> list[dict[str, Any]]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in rendered(path) if d.get("kind") == kind]


def settings() -> dict[str, str]:
    (config_map,) = [c for c in k8s_docs("ConfigMap") if c["metadata"]["name"] == "lightrnn-settings"]
    return config_map["data"]


# ---------------------------------------------------------------- the Workflow, as Argo runs it


@functools.cache
def workflow_run(arguments: tuple[tuple[str, str], ...] = tuple(WORKFLOW_ARGUMENTS.items())) -> WorkflowRun:
    return run_workflow(dict(arguments), run_script_here)


RAYJOB_SOURCES = ["k8s/rayjob.yaml", "argo/lightrnn-stages.yaml"]


def rayjobs_of(source: str) -> list[dict[str, Any]]:
    """The RayJobs a file deploys; for the Workflow, the one each stage creates."""
    if INFRA / source == WORKFLOW:
        return [job for _, _, job in workflow_run().rayjobs]
    return [d for d in rendered(INFRA / source) if d["kind"] == "RayJob"]


# ---------------------------------------------------------------- manifests parse and have their shape


def test_infra_has_every_deployment_file() -> None:
    for path in [LAUNCHER, K8S / "rayjob.yaml", K8S / "mlflow.yaml", INFRA / "docker" / "Dockerfile", WORKFLOW]:
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert (INFRA / "local" / "stack.py").is_file()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path} must hold YAML mappings"
    if path.parent in (K8S, ARGO):
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc.keys()
            assert doc["metadata"].get("name") or doc["metadata"].get("generateName"), f"a {doc['kind']} has no name"


def test_guide_fills_in_every_placeholder_of_the_manifests() -> None:
    used = {name for path in MANIFESTS for name in re.findall(r"\$\{(\w+)\}", path.read_text())}
    assert used <= set(placeholders()), (
        f"${{...}} the guide's envsubst step leaves as it is: {used - set(placeholders())}"
    )
    for path in MANIFESTS:
        assert "${" not in render(path.read_text()), f"{path.name} keeps a ${{...}} after the guide's envsubst step"
    leftover = [p.relative_to(REPO) for p in INFRA.rglob("*") if p.is_file() and "your-org" in p.read_text()]
    assert not leftover, f"an image name to edit by hand is left in {leftover}"


def test_cluster_launcher_has_cpu_head_and_autoscaling_gpu_workers() -> None:
    (config,) = rendered(LAUNCHER)
    validate_config(prepare_config(config))  # the schema check `ray up` starts with
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head should be a CPU instance"
    gpu = [n for n in node_types.values() if n["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 2, "GPU workers scale from zero"
    assert any("pip install" in c and "/home/ray/lightrnn" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/lightrnn"] == "."


def test_cluster_launcher_boots_a_current_image_not_rays_default() -> None:
    (config,) = rendered(LAUNCHER)
    for name, node in config["available_node_types"].items():
        image = node["node_config"].get("ImageId", "")
        # without one, Ray fills in DEFAULT_AMI: a deep learning image on Ubuntu 18.04, out of support
        assert image and image.lower() != "latest_dlami", f"{name} has no ImageId: Ray would boot its default image"
        assert image not in DEFAULT_AMI.values(), f"{name} boots Ray's default image {image}"
        assert image.startswith("ami-") or re.fullmatch(r"resolve:ssm:/aws/service/\S+/ami-id", image), image


def test_rayjob_runs_the_pipeline_on_cpu_head_and_autoscaling_workers() -> None:
    (job,) = k8s_docs("RayJob")
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert spec["entrypoint"].startswith("python -m jobs.pipeline ")
    assert "--gpu" in spec["entrypoint"].split()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__, "the RayJob's rayVersion should be the Ray the jobs are tested on"
    assert cluster["enableInTreeAutoscaling"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head is a CPU node"
    containers = [head]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, f"{group['groupName']} scales from zero"
        containers += group["template"]["spec"]["containers"]
    gpu = [c for c in containers if c["resources"].get("limits", {}).get("nvidia.com/gpu", 0) >= 1]
    assert gpu, "no worker group has a GPU"
    for container in containers:
        assert container["image"] == head["image"], "head and workers must run the same image"
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secrets, f"{container['name']} takes no credentials from a Secret"


def test_mlflow_server_uses_a_database_and_s3_artifacts() -> None:
    (deployment,) = k8s_docs("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"], "the database URI holds a password"
    services = {s["metadata"]["name"]: s for s in k8s_docs("Service")}
    port = services["mlflow"]["spec"]["ports"][0]["port"]
    assert settings()["MLFLOW_TRACKING_URI"] == f"http://mlflow.mlflow.svc.cluster.local:{port}"


def test_mlflow_allows_every_name_of_its_service_with_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    (deployment,) = k8s_docs("Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    (service,) = [s for s in k8s_docs("Service") if s["metadata"]["name"] == "mlflow"]
    name, port = service["metadata"]["name"], service["spec"]["ports"][0]["port"]
    namespace = urlparse(settings()["MLFLOW_TRACKING_URI"]).hostname.split(".")[1]
    # `mlflow server --allowed-hosts V` puts V in this variable; the server checks each request's Host with it
    monkeypatch.setenv("MLFLOW_SERVER_ALLOWED_HOSTS", command[command.index("--allowed-hosts") + 1])
    allowed = get_allowed_hosts_from_env()
    # the names a pod can reach a Service by, and the port a client then puts in its Host header
    names = [name, f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
    refused = [f"{n}:{port}" for n in [*names, "localhost"] if not is_allowed_host_header(allowed, f"{n}:{port}")]
    assert not refused, f"MLflow answers 403 to Host {refused}; --allowed-hosts compares the whole Host, port included"
    assert not is_allowed_host_header(allowed, f"elsewhere.example:{port}"), "the allowed hosts let any host in"


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


# ---------------------------------------------------------------- RayJobs against KubeRay's CRD schema


def strict(schema: Any) -> Any:
    """The schema as the API server applies it under strict field validation (kubectl's default):
    a level that lists its fields refuses others, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def rayjob_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(yaml.safe_load(RAYJOB_SCHEMA.read_text())))


def crd_errors(job: dict[str, Any]) -> list[str]:
    errors = rayjob_validator().iter_errors(job)
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors]


def schema_version() -> tuple[int, int]:
    major, minor = re.search(r"KubeRay (\d+)\.(\d+)", RAYJOB_SCHEMA.read_text()).groups()
    return int(major), int(minor)


@pytest.mark.parametrize("source", RAYJOB_SOURCES)
def test_rayjob_validates_against_the_kuberay_crd(source: str) -> None:
    for job in rayjobs_of(source):
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        errors = crd_errors(job)
        assert not errors, f"{source}: the KubeRay {schema_version()} CRD refuses:\n" + "\n".join(errors)


@pytest.mark.parametrize("source", RAYJOB_SOURCES)
def test_rayjob_states_the_kuberay_version_it_was_checked_against(source: str) -> None:
    stated = re.search(r"KubeRay operator \(?>= ?(\d+)\.(\d+)", (INFRA / source).read_text())
    assert stated, f"{source} does not say which KubeRay operator it needs"
    # only this CRD was checked; an older operator may lack fields the file uses (backoffLimit: 1.2)
    assert tuple(map(int, stated.groups())) == schema_version(), (
        f"{source} asks for KubeRay >= {'.'.join(stated.groups())}, but was validated against {schema_version()}"
    )


def test_crd_validation_refuses_unknown_fields_wrong_types_and_missing_parts() -> None:
    (job,) = k8s_docs("RayJob")
    assert not crd_errors(job)

    def errors_after(change: Any) -> list[str]:
        bad = copy.deepcopy(job)
        change(bad["spec"])
        return crd_errors(bad)

    head = lambda s: s["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]  # noqa: E731
    assert errors_after(lambda s: s.update(backofLimit=0)), "a misspelt field passes; the API server refuses it"
    assert errors_after(lambda s: head(s).update(imagePullPolicyy="Always")), "a misspelt container field passes"
    assert errors_after(lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(maxReplicas="16"))
    assert errors_after(lambda s: s.pop("entrypoint")), "a RayJob without an entrypoint passes"


# ---------------------------------------------------------------- cluster sizes fit the configurations

# vCPUs, GiB of memory and NVIDIA GPUs of the EC2 instance types used (AWS's instance type pages);
# Ray's launcher reads the same from EC2 (fillout_available_node_types_resources)
EC2 = {"m6i.4xlarge": (16, 64, 0), "g5.2xlarge": (8, 32, 1), "r6i.4xlarge": (16, 128, 0)}
# the vocabulary of the largest corpus shipped in data/ (WikiText-2: 33,278 words), for the
# configurations that keep every word (max_vocab 0)
BUNDLED_VOCAB = 33_278


def launcher_node_types() -> tuple[dict[str, dict[str, Any]], int]:
    """Each node type's resources as Ray's AWS launcher sees them, and the cap on all workers.

    CPUs and GPUs of the instance type and, as `memory`, its RAM less the object store's
    default share; `resources:` in the file overrides them.
    """
    (config,) = rendered(LAUNCHER)
    share = 1 - ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
    types = {}
    for name, node in config["available_node_types"].items():
        instance = node["node_config"]["InstanceType"]
        assert instance in EC2, f"add {instance}'s vCPUs, GiB and GPUs to EC2 in {Path(__file__).name}"
        cpus, gib, gpus = EC2[instance]
        head = name == config["head_node_type"]
        types[name] = {
            "resources": {"CPU": cpus, "GPU": gpus, "memory": int(gib * 2**30 * share), **node.get("resources", {})},
            "max_workers": 1 if head else node["max_workers"],
            "head": head,
        }
    return types, config["max_workers"]


def kuberay_node_types(job: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], int]:
    """Each group's resources as KubeRay's autoscaler sees them (Ray's own translation of the spec)."""
    metadata = {"name": job["metadata"].get("name", "rayjob"), "namespace": "lightrnn"}
    autoscaling = _derive_autoscaling_config_from_ray_cr({"metadata": metadata, "spec": job["spec"]["rayClusterSpec"]})
    head_type = autoscaling["head_node_type"]
    types = {
        name: {"resources": t["resources"], "max_workers": 1 if name == head_type else t["max_workers"],
               "head": name == head_type}
        for name, t in autoscaling["available_node_types"].items()
    }  # fmt: skip
    return types, autoscaling["max_workers"]


def advertised_runs(name: str) -> set[tuple[int, bool]]:
    """(workers, GPU) of every run of configuration `name` the repository shows: its default worker
    count, the guide's table of configurations, and every command written in the docs and infra/."""
    runs = {(PipelineOptions.workers, False)}
    guide = (REPO / "docs" / "guide.md").read_text()
    for row, use in re.findall(r"^\| `(\w+)` \|.*\| ([^|]*) \|$", guide, re.M):
        workers = re.search(r"--workers (\d+)", use)
        if row == name and workers:
            runs.add((int(workers.group(1)), "--gpu" in use))
    texts = [(REPO / f).read_text() for f in ("README.md", "docs/guide.md", "jobs/pipeline.py")]
    texts += [p.read_text() for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md")]
    texts += [job["spec"]["entrypoint"] for job in rayjobs_of("argo/lightrnn-stages.yaml")]
    for text in texts:
        for command in re.findall(r"python -m jobs\.pipeline ([^\n`|;&)]*)", re.sub(r"\\\n\s*#?\s*", " ", text)):
            words = command.replace('"', " ").replace("'", " ").split()
            if "--config" in words and words[words.index("--config") + 1 :][:1] == [name]:
                workers = int(words[words.index("--workers") + 1]) if "--workers" in words else PipelineOptions.workers
                runs.add((workers, "--gpu" in words))
    return runs


def realloc_demand(config: RunConfig) -> dict[str, float]:
    """What the reallocation task asks Ray for (pipeline.tasks.reallocate)."""
    vocab = config.data.max_vocab or BUNDLED_VOCAB
    memory = task_memory_bytes(vocab, config.model.hidden_dim, config.realloc.method, config.resources)
    return {"CPU": config.resources.realloc_cpus, "memory": memory}


def fits(demand: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(k, 0) >= v for k, v in demand.items())


def check_fit(types: dict[str, dict[str, Any]], cap: int, run: tuple[str, int, bool]) -> list[str]:
    """Why `run` cannot run on a cluster of these node types (empty if it can)."""
    name, workers, gpu = run
    per_worker = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}  # Ray Train's default resources_per_worker
    slots = {t: min(int(v["resources"].get(k, 0) // n) for k, n in per_worker.items()) for t, v in types.items()}
    problems, nodes, left = [], 0, workers
    for t in sorted(types, key=lambda t: (not types[t]["head"], -slots[t])):  # the head first, then the largest
        use = min(types[t]["max_workers"], math.ceil(left / slots[t])) if slots[t] and left > 0 else 0
        left -= use * slots[t]
        nodes += 0 if types[t]["head"] else use
    if left > 0:
        problems.append(f"{workers} training workers of {per_worker}: room for {workers - left} only")
    demand = realloc_demand(get_preset(name))
    hosts = [t for t, v in types.items() if fits(demand, v["resources"])]
    if not hosts:
        problems.append(f"no node type holds the reallocation task's {demand}")
    elif nodes + (0 if any(types[t]["head"] for t in hosts) else 1) > cap:
        problems.append(f"{nodes} training nodes and a reallocation node exceed the cap of {cap} workers")
    return problems


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_advertised_run_fits_each_cluster(name: str) -> None:
    clusters = {"ray-cluster.yaml": launcher_node_types()}
    for source in RAYJOB_SOURCES:
        clusters |= {f"{source} ({i})": kuberay_node_types(job) for i, job in enumerate(rayjobs_of(source))}
    problems = [
        f"{where}, {workers} {'GPU' if gpu else 'CPU'} workers: {problem}"
        for workers, gpu in sorted(advertised_runs(name))
        for where, (types, cap) in clusters.items()
        for problem in check_fit(types, cap, (name, workers, gpu))
    ]
    assert not problems, f"{name} does not fit:\n" + "\n".join(problems)


def test_fit_check_refuses_a_cluster_too_small() -> None:
    types, cap = launcher_node_types()
    assert not check_fit(types, cap, ("clueweb", 16, True))
    small = {t: {**v, "max_workers": min(v["max_workers"], 8)} for t, v in types.items()}
    assert check_fit(small, cap, ("clueweb", 16, True)), "16 GPU workers fit 8 GPU nodes"
    no_big = {
        t: v for t, v in types.items() if v["resources"]["memory"] < realloc_demand(get_preset("clueweb"))["memory"]
    }
    assert check_fit(no_big, cap, ("clueweb", 16, True)), "the reallocation task fits no node, yet passes"
    assert check_fit(types, 15, ("clueweb", 16, True)), "the launcher's cap on all workers is not counted"
    # a head too small for the reallocation task: it needs a node of its own, the 17th
    tiny_head = {**types["head"], "resources": {**types["head"]["resources"], "memory": 2**30}}
    small_head = {**types, "head": tiny_head}
    assert not check_fit(small_head, 17, ("clueweb", 16, True))
    assert check_fit(small_head, 16, ("clueweb", 16, True)), "the reallocation node is not counted against the cap"


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


# ---------------------------------------------------------------- the deployment guide


def bash_blocks(path: Path, section: str = "") -> list[str]:
    text = path.read_text()
    if section:
        start = text.index(section)
        end = text.find("\n## ", start + len(section))
        text = text[start : end if end > 0 else len(text)]
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_deployment_guide_goes_in_order() -> None:
    commands = "\n".join(bash_blocks(GUIDE, "## Deploy on Kubernetes"))
    order = [
        ("build the images", r"docker build -f infra/docker/Dockerfile "),
        ("push them", r"docker push "),
        ("create the buckets", r"aws s3 mb "),
        ("create the namespaces", r"kubectl create namespace "),
        ("create the Secrets", r"kubectl -n \S+ create secret generic "),
        ("deploy MLflow", r"kubectl -n mlflow apply -f \S*mlflow\.yaml"),
        ("wait for it", r"kubectl -n mlflow rollout status "),
        ("submit the job", r"kubectl -n lightrnn apply -f \S*rayjob\.yaml"),
    ]
    found = [(what, re.search(rx, commands)) for what, rx in order]
    missing = [what for what, m in found if m is None]
    assert not missing, f"the guide's Kubernetes steps lack: {missing}"
    positions = [m.start() for _, m in found]
    assert positions == sorted(positions), f"the guide's steps are out of order: {[w for w, _ in found]}"


def test_guides_run_ray_from_the_virtualenv() -> None:
    # `stack.py env` and `make install` put nothing on PATH: a bare `ray` is whatever else is installed, or nothing
    bare = re.compile(r"(?<![\w/.-])ray (job|up|down|dashboard|attach|exec|submit|status|start|stop)\b")
    for path, section in [(GUIDE, ""), (REPO / "README.md", "## Running on a cluster")]:
        lines = [line for block in bash_blocks(path, section) for line in block.splitlines()]
        calls = [line for line in lines if bare.search(line.split("#")[0])]
        assert not calls, f"{path.name} calls a bare `ray`: {calls}"


# ---------------------------------------------------------------- entrypoints name real modules and flags


def jobs_commands() -> list[tuple[str, str, str]]:
    """(file, module, arguments) for every `python -m jobs.X ...` in infra/, comments included."""
    found = []
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and p.suffix not in {".pyc"}):
        text = path.read_text()
        # shell continuations inside comments: "...\<newline>#   --flag"
        sources = [re.sub(r"\\\n\s*#?\s*", " ", text)]
        if path.suffix == ".yaml":
            sources += [" ".join(s.split()) for doc in load_all(path) for s in strings_in(doc)]
        for source in sources:
            for module, args in re.findall(r"python -m jobs\.(\w+)([^\n`'\"|;&)]*)", source):
                found.append((str(path.relative_to(REPO)), module, args.strip()))
    return sorted(set(found))


COMMANDS = jobs_commands()


def test_infra_runs_the_pipeline_job() -> None:
    assert any(module == "pipeline" for _, module, _ in COMMANDS), "no manifest submits python -m jobs.pipeline"


@pytest.mark.parametrize("where,module,args", COMMANDS, ids=[f"{w}:{m}:{i}" for i, (w, m, _) in enumerate(COMMANDS)])
def test_entrypoint_names_a_real_job_and_its_flags(where: str, module: str, args: str) -> None:
    assert importlib.util.find_spec(f"jobs.{module}") is not None, f"{where}: there is no jobs/{module}.py"
    known = help_flags(str(BIN / "python"), "-m", f"jobs.{module}")
    unknown = [f for f in flags_of(args) if f not in known]
    assert not unknown, f"{where}: python -m jobs.{module} has no option(s) {unknown}; it knows {sorted(known)}"


def test_ray_start_options_exist() -> None:
    known = help_flags(str(BIN / "ray"), "start")
    (config,) = load_all(LAUNCHER)
    used = [f for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] for f in re.findall(
        r"(?<![\w-])(--[a-z][a-z-]*)", c)]  # fmt: skip
    (job,) = k8s_docs("RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    params = [cluster["headGroupSpec"]["rayStartParams"], *(g["rayStartParams"] for g in cluster["workerGroupSpecs"])]
    used += [f"--{key}" for p in params for key in p]
    assert used and not [f for f in used if f not in known], sorted(set(used) - known)


def test_mlflow_server_options_exist() -> None:
    known = help_flags(str(BIN / "mlflow"), "server")
    (deployment,) = k8s_docs("Deployment")
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    used = [a for a in command if a.startswith("--")]
    assert used and not [f for f in used if f not in known], sorted(set(used) - known)


# ---------------------------------------------------------------- no secret is committed

PLACEHOLDER = re.compile(r"^(\.\.\.|\*+|<[^>]*>|\$\{?\w+\}?|\$\(\w+\)|x+|changeme|password|secret|your[-_].*)$", re.I)
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}"),
    "literal secret": re.compile(
        r"(?i)\b(?:aws_secret_access_key|aws_session_token|secret[_-]?key|api[_-]?key|password|passwd|auth[_-]?token)"
        r"[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=_.\-]{12,})"
    ),
}
URI_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.\-]*://[^/\s:@\"'`]+:([^@\s/\"'`]+)@")


def secrets_in(text: str) -> list[str]:
    """What in `text` looks like a committed credential (placeholders such as `...` or `$VAR` are fine)."""
    hits = [f"{name}: {m.group(0)[:12]}..." for name, rx in SECRET_PATTERNS.items() for m in rx.finditer(text)]
    hits += [f"password in URI: {m.group(0)[:24]}..." for m in URI_PASSWORD.finditer(text)
             if not PLACEHOLDER.match(m.group(1))]  # fmt: skip
    return hits


def repo_text_files() -> list[Path]:
    """Tracked files plus new, not ignored ones (what the next commit could hold)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = []
    for name in listed:
        path = REPO / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_secret_scanner_finds_planted_secrets() -> None:
    key_id = "AKIA" + "Q" * 16  # built here so this file itself stays clean
    assert secrets_in(f"aws_access_key_id = {key_id}")
    assert secrets_in("aws_secret_access_key: " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY")
    assert secrets_in("postgresql://mlflow:" + "hunter2hunter2" + "@db:5432/mlflow")
    assert secrets_in("-----BEGIN " + "RSA PRIVATE KEY-----")
    assert not secrets_in("postgresql://mlflow:...@db:5432/mlflow and s3://bucket/key and $AWS_SECRET_ACCESS_KEY")


def test_no_secret_is_committed() -> None:
    files = repo_text_files()
    assert any(p.parent == K8S for p in files), "infra/k8s is not in the listed files"
    hits = [f"{p.relative_to(REPO)}: {h}" for p in files for h in secrets_in(p.read_text(errors="replace"))]
    assert not hits, "\n".join(hits)


SENSITIVE_ENV = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|BACKEND_STORE_URI")


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_credentials_come_from_secrets(path: Path) -> None:
    for doc in load_all(path):
        assert doc["kind"] != "Secret", f"{path.name} commits a Secret: create it with kubectl instead"
        if doc["kind"] == "ConfigMap":
            assert not [k for k in doc["data"] if SENSITIVE_ENV.search(k)], "credentials belong in a Secret"
        for env in _env_entries(doc):
            if SENSITIVE_ENV.search(env["name"]):
                assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                    f"{path.name}: {env['name']} must come from a Secret (valueFrom.secretKeyRef)"
                )


def _env_entries(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        own = node.get("env") if isinstance(node.get("env"), list) else []
        return own + [e for v in node.values() for e in _env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_entries(v)]
    return []


# ---------------------------------------------------------------- container images


def build_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)


def test_worker_image_installs_the_tested_pins_on_the_cuda_of_its_torch() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    args = build_args(text)
    base = expand(re.search(r"^FROM\s+(\S+)", text, re.M).group(1), args)
    assert base.startswith("rayproject/ray:") and args["RAY_VERSION"] == ray.__version__, base
    cuda = base.rsplit("-", 1)[1]
    # `-gpu` is an alias Ray moves from one CUDA to another; the tag must say which CUDA the wheel needs
    assert re.fullmatch(r"cu\d{3}", cuda), f"the base image {base} names no CUDA version"
    index = expand(re.search(r'--(?:extra-)?index-url "?(https://download\.pytorch\.org/whl/\S+?)"?\s', text)[1], args)
    assert index.endswith("/" + cuda), f"torch comes from {index}, the base image has {cuda}"
    install = re.search(r"^RUN (?:[^\n]*\\\n)*[^\n]*pip install [^\n]*(?:\\\n[^\n]*)*-e \.", text, re.M)[0]
    assert "-c constraints-cpu.txt" in install, "the package is installed without the constraints the tests use"
    assert re.search(r"^COPY [^\n]*constraints-cpu\.txt", text, re.M)
    for package in ("lightrnn", "pipeline", "jobs"):
        assert re.search(rf"^COPY .*\b{package}\b", text, re.M), f"{package}/ is not copied into the image"
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored


def test_worker_image_build_stops_unless_torch_is_built_for_its_cuda() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    check = re.search(r'^RUN python -c "([^"\n]*torch\.version\.cuda[^"\n]*)"$', text, re.M)
    assert check and "torch.cuda.nccl.version()" in check[1], "no build step prints torch's CUDA and NCCL versions"
    args = build_args(text)
    code = expand(check[1], args)
    # run here: it passes only for a torch built for the image's CUDA (this venv's is a CPU build)
    done = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    import torch

    built_for = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else None
    assert (done.returncode == 0) == (built_for == args["CUDA_TAG"]), done.stdout + done.stderr
    if done.returncode == 0:
        assert "CUDA" in done.stdout and "NCCL" in done.stdout


def test_mlflow_image_installs_the_tested_mlflow() -> None:
    text = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    assert re.search(r"pip install [^\n]*-c \S*constraints-cpu\.txt[^\n]* mlflow\b", text), "MLflow is not pinned"
    pins = dict(re.findall(r"^([\w.-]+)==(\S+)", (REPO / "constraints-cpu.txt").read_text(), re.M))
    assert pins["mlflow"] == mlflow.__version__
    assert "psycopg2" in text and "boto3" in text  # the postgresql:// backend and the s3:// artifact store
    ignored = (INFRA / "docker" / "mlflow.Dockerfile.dockerignore").read_text().split()
    assert ignored[:2] == ["*", "!constraints-cpu.txt"] or {"*", "!constraints-cpu.txt"} <= set(ignored)
