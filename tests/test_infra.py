"""The deployment files in infra/: they parse, fit the configurations they advertise, and work as run.

Every `python -m jobs.X --flag` written in infra/ (manifests, comments, Dockerfiles) must
name an existing module and flags that `python -m jobs.X --help` lists; `ray start` and
`mlflow server` options are checked against the installed Ray and MLflow the same way. The
RayJobs' entrypoints go through the two shells that run them on a cluster, the RayJobs
through KubeRay's CRD schema (infra/schemas/), the cluster sizes through the resources Ray's
autoscalers see, and MLflow's allowed hosts through MLflow's own check.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import pytest
import ray
from infra_common import (
    ARGO,
    BIN,
    K8S,
    LAUNCHER,
    MANIFESTS,
    flags_of,
    help_flags,
    k8s_docs,
    load_all,
    settings,
    strings_in,
)
from infra_render import (
    GUIDE,
    INFRA,
    REPO,
    WORKFLOW,
    placeholders,
    render,
    rendered,
)
from mlflow.server.security_utils import get_allowed_hosts_from_env, is_allowed_host_header
from ray.autoscaler._private.aws.config import DEFAULT_AMI
from ray.autoscaler._private.util import prepare_config, validate_config

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
