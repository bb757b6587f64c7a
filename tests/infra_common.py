"""What the infra tests share: the deployment files, their parsed documents and the Workflow as Argo runs it."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from infra_render import (
    INFRA,
    REPO,
    WORKFLOW,
    WorkflowRun,
    rendered,
    run_script_here,
    run_workflow,
)

MANIFESTS = sorted(INFRA.rglob("*.yaml"))
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
