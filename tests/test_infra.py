"""The deployment files in infra/: they parse, name real jobs and flags, and hold no secrets.

Every `python -m jobs.X --flag` written in infra/ (manifests, comments, Dockerfiles) must
name an existing module and flags that `python -m jobs.X --help` lists; `ray start` and
`mlflow server` options are checked against the installed Ray and MLflow the same way.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml"))
DOCKERFILES = sorted(INFRA.rglob("*Dockerfile"))
K8S = INFRA / "k8s"
LAUNCHER = INFRA / "ray-cluster.yaml"
BIN = Path(sys.executable).parent


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


def k8s_docs(kind: str) -> list[dict[str, Any]]:
    return [d for path in sorted(K8S.glob("*.yaml")) for d in load_all(path) if d.get("kind") == kind]


@functools.cache
def help_flags(*command: str) -> frozenset[str]:
    """The long options a command's --help lists."""
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, f"{' '.join(command)} --help failed:\n{done.stderr[-3000:]}"
    return frozenset(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", done.stdout))


def flags_of(args: str) -> list[str]:
    return [token.split("=", 1)[0] for token in shlex.split(args) if token.startswith("--")]


# ---------------------------------------------------------------- manifests parse and have their shape


def test_infra_has_every_deployment_file() -> None:
    for path in [LAUNCHER, K8S / "rayjob.yaml", K8S / "mlflow.yaml", INFRA / "docker" / "Dockerfile"]:
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert (INFRA / "local" / "stack.py").is_file()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs), f"{path} must hold YAML mappings"
    if path.parent == K8S:
        for doc in docs:
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), doc.keys()
            assert doc["metadata"].get("name"), f"a {doc['kind']} in {path.name} has no name"


def test_cluster_launcher_has_cpu_head_and_autoscaling_gpu_workers() -> None:
    (config,) = load_all(LAUNCHER)
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "the head should be a CPU instance"
    gpu = [n for n in node_types.values() if n["node_config"]["InstanceType"].startswith(("g", "p"))]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 2, "GPU workers scale from zero"
    assert any("pip install" in c and "/home/ray/lightrnn" in c for c in config["setup_commands"])
    assert config["file_mounts"]["/home/ray/lightrnn"] == "."


def test_rayjob_runs_the_pipeline_on_cpu_head_and_gpu_workers() -> None:
    (job,) = k8s_docs("RayJob")
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1"
    assert spec["entrypoint"].startswith("python -m jobs.pipeline ")
    assert "--gpu" in spec["entrypoint"].split()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__, "the RayJob's rayVersion should be the Ray the jobs are tested on"
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), "the head is a CPU node"
    (gpu_group,) = cluster["workerGroupSpecs"]
    (worker,) = gpu_group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert gpu_group["minReplicas"] == 0 and gpu_group["maxReplicas"] >= 2 and cluster["enableInTreeAutoscaling"]
    for container in (head, worker):
        assert container["image"] == head["image"], "head and workers must run the same image"
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secrets, f"{container['name']} takes no credentials from a Secret"
    # the entrypoint's $VARS come from the pods' environment (the ConfigMap)
    (settings,) = [c for c in k8s_docs("ConfigMap") if c["metadata"]["name"] == "lightrnn-settings"]
    for var in re.findall(r"\$(\w+)", spec["entrypoint"]):
        assert var in settings["data"], f"${var} in the entrypoint is not set by the ConfigMap"


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
    (settings,) = [c for c in k8s_docs("ConfigMap") if c["metadata"]["name"] == "lightrnn-settings"]
    assert settings["data"]["MLFLOW_TRACKING_URI"] == f"http://mlflow.mlflow.svc.cluster.local:{port}"


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


def test_worker_image_has_cuda_torch_ray_and_this_package() -> None:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    assert base.startswith("rayproject/ray:") and base.endswith("-gpu"), base
    version = re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M).group(1)
    assert version == ray.__version__, "the image's Ray must match the Ray the jobs are tested on"
    assert re.search(r"pip install .*torch.*--index-url \"?\$\{TORCH_INDEX\}", text)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", text, re.M), "a CUDA build"
    assert re.search(r"pip install [^\n]*-e \.", text), "the image installs this package"
    for package in ("lightrnn", "pipeline", "jobs"):
        assert re.search(rf"^COPY .*\b{package}\b", text, re.M), f"{package}/ is not copied into the image"
    ignored = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored


def test_mlflow_image_matches_the_tested_mlflow() -> None:
    text = (INFRA / "docker" / "mlflow.Dockerfile").read_text()
    assert re.search(r"^ARG MLFLOW_VERSION=(\S+)", text, re.M).group(1) == mlflow.__version__
    assert "psycopg2" in text and "boto3" in text  # the postgresql:// backend and the s3:// artifact store
