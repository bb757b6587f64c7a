"""A real local stack on 127.0.0.1, no Docker: a Ray head, an S3 server (moto) and an MLflow server.

    python infra/local/stack.py up [--dir DIR] [--bucket lightrnn] [--num-cpus 4]
    eval "$(python infra/local/stack.py env)"      # RAY_API_SERVER_ADDRESS, MLFLOW_TRACKING_URI, AWS_*
    ray job submit --working-dir . -- python -m jobs.pipeline --config tiny --root s3://lightrnn/runs/tiny
    python infra/local/stack.py status
    python infra/local/stack.py down

`up` picks free ports, starts the three servers in their own sessions with the Python
environment that runs this script first on PATH (a `ray job submit` entrypoint's
`python` is resolved from the head's PATH), creates the bucket, and writes
DIR/stack.json (pids, ports, addresses). Every process it starts carries
LIGHTRNN_STACK_ID in its environment, and so does everything they spawn (Ray workers,
job drivers); `down` stops exactly those processes, not any other Ray on the machine.

Ray 2.60 enables token authentication on local heads; this throwaway stack turns it off
(RAY_AUTH_MODE=disabled for the head and, through the printed env, for clients).
MLflow keeps runs in DIR/mlflow.db (sqlite) and proxies artifacts to s3://BUCKET/mlflow,
so clients log artifacts over HTTP and need no S3 settings for them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
MARKER = "LIGHTRNN_STACK_ID"
# moto accepts any credentials; these dummies keep botocore from looking for real ones
DUMMY_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# MLflow 3's server starts 8 huey job-runner processes (GenAI judges, trace rollups) and a
# /dev/shm queue by default; nothing here uses them, and they would share 2 cores with Ray
MLFLOW_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
START_TIMEOUT_S = 120  # Ray head ~10 s, MLflow ~6 s on 2 busy cores; leave room
# grace after SIGTERM: moto and MLflow exit within a second, Ray's GCS and raylet linger >10 s
# (as under `ray stop`); nothing of this throwaway stack needs a graceful flush, so SIGKILL then
STOP_TIMEOUT_S = 5


class StackError(RuntimeError):
    """The stack could not be started, found or stopped as asked."""


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def default_dir() -> Path:
    # short: Ray puts unix sockets under its temp dir, and socket paths are limited to 107 bytes
    return Path(tempfile.gettempdir()) / f"lightrnn-stack-{os.getuid()}"


def _bin(name: str) -> str:
    """An executable of this Python environment (the venv), not whatever is first on PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise StackError(f"{path} not found: install the project into this environment (make install)")
    return str(path)


def stack_env(state: dict[str, Any]) -> dict[str, str]:
    """What a client exports to use the stack (ray job submit, mlflow, boto3, s3fs, pyarrow)."""
    return {
        "RAY_API_SERVER_ADDRESS": state["ray_dashboard"],
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": state["mlflow"],
        "AWS_ENDPOINT_URL": state["s3"],
        "MLFLOW_S3_ENDPOINT_URL": state["s3"],
        **DUMMY_AWS,
    }


def _server_env(stack_id: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_PROFILE"))}
    venv_bin = str(Path(sys.executable).parent)  # not resolved: a venv's python is a symlink
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    if (Path(venv_bin).parent / "pyvenv.cfg").exists():
        env["VIRTUAL_ENV"] = str(Path(venv_bin).parent)
    env.update({MARKER: stack_id, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **DUMMY_AWS})
    env.update(extra)
    return env


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> int:
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return proc.pid


def _wait_http(url: str, what: str, pid: int, log: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            raise StackError(f"{what} exited during start-up; its log {log} ends with:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise StackError(f"{what} did not answer {url} within {START_TIMEOUT_S}s; see {log}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _create_bucket(endpoint: str, bucket: str) -> None:
    import boto3  # moto[server] brings it; imported here so `down`/`status` need only psutil

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=DUMMY_AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
        region_name=DUMMY_AWS["AWS_DEFAULT_REGION"],
    )
    s3.create_bucket(Bucket=bucket)


def up(directory: Path, bucket: str, num_cpus: int) -> dict[str, Any]:
    """Start the three servers, wait until each answers, create the bucket, write the state file."""
    if (directory / STATE_FILE).exists() and _alive(read_state(directory)):
        raise StackError(f"a stack is already running from {directory}; `down` it first or pick another --dir")
    if len(bucket) < 3:
        raise StackError(f"bucket name {bucket!r} is too short: S3 (and moto) need at least 3 characters")
    directory.mkdir(parents=True, exist_ok=True)
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    stack_id = uuid.uuid4().hex
    # GCS, dashboard, and every other port Ray would otherwise take from its fixed defaults
    # (6379, 8265, 10001, 8076, ...), so this head can run beside another Ray on the machine
    names = ["gcs", "dashboard", "client", "node_manager", "object_manager", "agent_grpc", "agent_http"]
    names += ["metrics", "runtime_env_agent", "moto", "mlflow"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    s3 = f"http://{HOST}:{ports['moto']}"
    state: dict[str, Any] = {
        "stack_id": stack_id,
        "dir": str(directory),
        "bucket": bucket,
        "ports": ports,
        "ray_gcs": f"{HOST}:{ports['gcs']}",
        "ray_dashboard": f"http://{HOST}:{ports['dashboard']}",
        "s3": s3,
        "mlflow": f"http://{HOST}:{ports['mlflow']}",
        "artifacts": f"s3://{bucket}/mlflow",
        "python": sys.executable,
        "pids": {},
    }
    env = _server_env(stack_id, {})
    ray_cmd = [
        _bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={HOST}", f"--port={ports['gcs']}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--dashboard-host={HOST}", f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}", f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--dashboard-agent-listen-port={ports['agent_http']}", f"--metrics-export-port={ports['metrics']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}", f"--temp-dir={directory / 'ray'}",
    ]  # fmt: skip
    moto_cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(ports["moto"])]
    mlflow_cmd = [
        _bin("mlflow"), "server", "--host", HOST, "--port", str(ports["mlflow"]), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}", "--artifacts-destination", state["artifacts"],
    ]  # fmt: skip
    try:
        state["pids"]["moto"] = _spawn(moto_cmd, env, logs / "moto.log")
        state["pids"]["ray"] = _spawn(ray_cmd, env, logs / "ray.log")
        state["pids"]["mlflow"] = _spawn(mlflow_cmd, _server_env(stack_id, MLFLOW_ENV | {"MLFLOW_S3_ENDPOINT_URL": s3}),
                                         logs / "mlflow.log")  # fmt: skip
        write_state(directory, state)  # before waiting: a failed start can still be taken down
        deadline = time.monotonic() + START_TIMEOUT_S
        checks = [
            ("moto", "moto S3 server", f"{s3}/moto-api/"),
            ("ray", "Ray head", f"{state['ray_dashboard']}/api/version"),
            ("mlflow", "MLflow server", f"{state['mlflow']}/health"),
        ]
        for name, what, url in checks:
            _wait_http(url, what, state["pids"][name], logs / f"{name}.log", deadline)
            if name == "moto":
                _create_bucket(s3, bucket)
    except BaseException:
        down(directory)
        raise
    return state


def write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    tmp.replace(directory / STATE_FILE)


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.exists():
        raise StackError(f"no {path}: no stack was started from {directory} (run `up`, or pass its --dir)")
    return json.loads(path.read_text())


def stack_processes(state: dict[str, Any]) -> list[psutil.Process]:
    """Every live process of this stack: the ones `up` started, their descendants, and any
    process whose environment carries this stack's id (Ray workers, job drivers in their own sessions)."""
    found: dict[int, psutil.Process] = {}
    for pid in state["pids"].values():
        try:
            root = psutil.Process(pid)
            if _marker(root) != state["stack_id"]:
                continue  # the pid was reused by someone else's process
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    me = os.getuid()
    for p in psutil.process_iter(["uids"]):
        if p.pid in found or p.info["uids"] is None or p.info["uids"].real != me:
            continue
        if _marker(p) == state["stack_id"]:
            found[p.pid] = p
    return [p for p in found.values() if _running(p)]


def _marker(p: psutil.Process) -> str | None:
    try:
        return p.environ().get(MARKER)
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
        return None


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _alive(state: dict[str, Any]) -> bool:
    return bool(stack_processes(state))


def down(directory: Path) -> int:
    """Stop every process of the stack started from `directory`; returns how many were stopped.

    SIGTERM to all of them at once (`ray start --block` and the raylet take their own
    children down on it), SIGKILL to what is left after STOP_TIMEOUT_S, then a rescan for
    anything spawned meanwhile (a raylet may start a worker while it is being stopped).
    """
    state = read_state(directory)
    stopped: set[int] = set()
    for _ in range(3):
        procs = stack_processes(state)
        if not procs:
            break
        stopped.update(p.pid for p in procs)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
    left = stack_processes(state)
    if left:
        raise StackError(f"processes still running after down: {[(p.pid, p.name()) for p in left]}")
    (directory / STATE_FILE).unlink()
    return len(stopped)


def status(directory: Path) -> dict[str, Any]:
    state = read_state(directory)
    procs = stack_processes(state)
    return {**state, "running": {name: psutil.pid_exists(pid) for name, pid in state["pids"].items()},
            "processes": len(procs)}  # fmt: skip


def _print_env(state: dict[str, Any]) -> None:
    for k, v in stack_env(state).items():
        print(f"export {k}={shlex.quote(v)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python infra/local/stack.py", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", type=Path, default=default_dir(), help="state, logs, Ray temp dir, MLflow db")
    p.add_argument("--bucket", default="lightrnn", help="S3 bucket to create (runs and MLflow artifacts)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the Ray head (Train + Data need >2)")
    p.add_argument("--json", action="store_true", help="up/status: print the state as JSON")
    args = p.parse_args(argv)
    directory = args.dir.absolute()
    try:
        if args.command == "up":
            started = time.monotonic()
            state = up(directory, args.bucket, args.num_cpus)
            if args.json:
                print(json.dumps(state, sort_keys=True))
                return 0
            print(f"Ray head      {state['ray_gcs']} (dashboard and jobs API {state['ray_dashboard']})")
            print(f"S3 (moto)     {state['s3']}  bucket s3://{state['bucket']}")
            print(f"MLflow        {state['mlflow']}  artifacts {state['artifacts']}")
            print(f"logs          {directory / 'logs'}")
            print("# to use it from this shell:")
            _print_env(state)
            print(f"[up] stack {state['stack_id'][:8]} ready in {time.monotonic() - started:.1f}s; stop it with "
                  f"python infra/local/stack.py down --dir {shlex.quote(str(directory))}")  # fmt: skip
        elif args.command == "env":
            _print_env(read_state(directory))
        elif args.command == "status":
            info = status(directory)
            if args.json:
                print(json.dumps(info, sort_keys=True))
            else:
                for name, pid in info["pids"].items():
                    print(f"{name:7} pid {pid:>7} {'running' if info['running'][name] else 'GONE'}")
                print(f"{info['processes']} process(es) in stack {info['stack_id'][:8]}; "
                      f"Ray {info['ray_dashboard']}, S3 {info['s3']}, MLflow {info['mlflow']}")  # fmt: skip
        else:
            n = down(directory)
            print(f"[down] stopped {n} process(es); nothing of stack in {directory} is left running")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
