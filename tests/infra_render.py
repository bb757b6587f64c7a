"""The files of infra/ as the tools that read them see them: the guide's `envsubst` step, and Argo.

`rendered(path)` is a manifest after the deployment guide's `envsubst '$A $B'` step.
`run_workflow(arguments, run_script)` walks the Argo Workflow as Argo's controller does: its
steps in order, a `withParam` loop over the JSON list a script step printed, each template
with its parameters substituted; it runs the script steps through `run_script`
(`run_script_here`: on this machine, as in the worker image) and returns every RayJob the
Workflow would create, in order.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
GUIDE = INFRA / "README.md"
WORKFLOW = INFRA / "argo" / "lightrnn-stages.yaml"


@functools.cache
def placeholders() -> dict[str, str]:
    """The variables the guide's `envsubst '$A $B'` steps fill in, each with an example value."""
    lists = re.findall(r"envsubst '([^']+)'", GUIDE.read_text())
    names = sorted({name for group in lists for name in re.findall(r"\$\{?(\w+)\}?", group)})
    return {name: "example-" + name.lower().replace("_", "-") for name in names}


def render(text: str) -> str:
    """What `envsubst '$A $B'` makes of `text`: $A, ${A}, $B, ${B} replaced, every other $ left alone."""
    values = placeholders()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def rendered(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(path.read_text())) if doc is not None]


# ---------------------------------------------------------------- the Workflow, as Argo runs it

ARGO_VARIABLE = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")


def substitute(node: Any, scope: dict[str, str]) -> Any:
    """`node` with each {{name}} of `scope` replaced in every string; other {{...}} are left as they are."""
    if isinstance(node, str):
        return ARGO_VARIABLE.sub(lambda m: scope.get(m.group(1), m.group(0)), node)
    if isinstance(node, dict):
        return {k: substitute(v, scope) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, scope) for v in node]
    return node


def run_script_here(script: dict[str, Any]) -> str:
    """A script step run here as in the worker image: its source saved to a file that its
    command runs (as Argo does), from the package's folder (the image's WORKDIR), with this
    virtualenv's `python` first on PATH; returns its stdout."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with tempfile.NamedTemporaryFile("w", suffix=".sh") as source:
        source.write(script["source"])
        source.flush()
        command = [*script["command"], source.name]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{script['source'][:80]} fails (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout


@dataclass(frozen=True)
class WorkflowRun:
    scripts: list[tuple[str, dict[str, Any], str]]  # (step, script template, what it printed)
    rayjobs: list[tuple[str, dict[str, Any], dict[str, Any]]]  # (step, resource template, the RayJob)


def run_workflow(arguments: dict[str, str], run_script: Callable[[dict[str, Any]], str]) -> WorkflowRun:
    """Walk the Workflow with `arguments` for its parameters, as Argo would run it.

    Steps run group after group; a step with `withParam` runs once per item of the JSON list
    it names, in list order (what `parallelism: 1` makes of a loop); a script step's stdout
    is its `steps.NAME.outputs.result`; a resource template's manifest is the RayJob.
    """
    (workflow,) = rendered(WORKFLOW)
    declared = {p["name"]: p.get("value") for p in workflow["spec"]["arguments"]["parameters"]}
    assert set(arguments) <= set(declared), f"the Workflow has no parameter(s) {set(arguments) - set(declared)}"
    values = {**declared, **arguments}
    unset = sorted(name for name, value in values.items() if value is None)
    assert not unset, f"Argo refuses to submit the Workflow without parameter(s) {unset}"
    templates = {t["name"]: t for t in workflow["spec"]["templates"]}
    scope = {f"workflow.parameters.{name}": str(value) for name, value in values.items()}
    run = WorkflowRun(scripts=[], rayjobs=[])

    def call(step: str, name: str, inputs: dict[str, str]) -> str | None:
        template = templates[name]
        declared_inputs = {p["name"] for p in template.get("inputs", {}).get("parameters", [])}
        assert set(inputs) == declared_inputs, f"{step}: {name} takes {declared_inputs}, is given {set(inputs)}"
        local = {**scope, **{f"inputs.parameters.{k}": v for k, v in inputs.items()}}
        template = substitute(template, local)
        if "steps" in template:
            outputs: dict[str, str] = {}  # steps.NAME.outputs.result of the steps run so far
            for entry in (e for group in template["steps"] for e in group):
                entry = substitute(entry, {**local, **outputs})
                items = json.loads(entry["withParam"]) if "withParam" in entry else [None]
                assert isinstance(items, list), f"{entry['name']}: withParam is not a JSON list: {items!r}"
                for item in items:
                    each = entry if item is None else substitute(entry, {"item": str(item)})
                    given = {a["name"]: str(a["value"]) for a in each.get("arguments", {}).get("parameters", [])}
                    result = call(f"{step}.{each['name']}", each["template"], given)
                    if result is not None:
                        outputs[f"steps.{each['name']}.outputs.result"] = result
            return None
        if "script" in template:
            printed = run_script(template["script"])
            run.scripts.append((step, template, printed))
            return printed.strip()
        manifest = template["resource"]["manifest"]
        assert not ARGO_VARIABLE.search(manifest), f"{step}: the manifest keeps {ARGO_VARIABLE.findall(manifest)}"
        run.rayjobs.append((step, template, yaml.safe_load(manifest)))
        return None

    call(workflow["spec"]["entrypoint"], workflow["spec"]["entrypoint"], {})
    return run
