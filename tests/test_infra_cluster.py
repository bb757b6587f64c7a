"""The clusters in infra/ against what runs on them: the RayJobs through KubeRay's CRD schema,
the node types through the resources Ray's autoscalers see, sized for every configuration's advertised runs."""

from __future__ import annotations

import copy
import functools
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from infra_common import (
    LAUNCHER,
    RAYJOB_SCHEMA,
    RAYJOB_SOURCES,
    k8s_docs,
    rayjobs_of,
)
from infra_render import (
    INFRA,
    REPO,
    rendered,
)
from ray._private import ray_constants
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

from jobs.configs import PRESETS, get_preset
from pipeline.orchestrate import PipelineOptions
from pipeline.runconfig import RunConfig
from pipeline.tasks import task_memory_bytes

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
