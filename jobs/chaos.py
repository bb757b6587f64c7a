"""Fault drill: SIGKILL the pipeline at random moments, finish it, compare with an uninterrupted run.

python -m jobs.chaos --config tiny --kills 20 --seed 0
python -m jobs.chaos --config tiny --root s3://bucket/drill --s3-endpoint http://127.0.0.1:5555 --kills 10

First an uninterrupted run (ROOT/reference) records when each `[stage] NAME` and `[train]`
line appears. Kill points are drawn from those lines: the start of the cost pass, the solve
and the export, a training report that carries a checkpoint (the checkpoint is being
written and committed then), and random lines after them, each with a random delay up to
the next line (an attempt that skips committed stages past a point's line is killed at its
first line beyond it). The drill run (ROOT/drill) is started as `python -m jobs.pipeline` in a
session of its own; at each kill point its whole process group, and every process it
started (local Ray included, found by an environment tag), gets SIGKILL, then the same
command runs again, until one attempt finishes. With `--worker-kills M`, M more points
(right after a training report) SIGKILL one Ray Train worker instead, and the attempt
goes on: Ray Train restarts the worker group from the phase's latest checkpoint
(`--max-failures` of the pipeline, 1 by default). The finished run is compared with the
reference: the final allocation, the exported weights, the test perplexity, and the MLflow
runs (one parent, and each stage with exactly one nested run, FINISHED).

Equality. On the CPU the pipeline is deterministic and its resume exact: each rank reads a
fixed range of blocks in order, dropout is seeded per step, and a checkpoint inside a batch
carries the LSTM state (`pipeline.train_loop`). So by default the finished drill must equal
the reference bit for bit: the same final allocation, exported weights with no difference
(`--weights-tolerance`, default 0) and the same test perplexity (`--ppl-tolerance`,
relative, default 0). Exits 1 on any difference, and on any MLflow stage without exactly
one FINISHED run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from jobs.chaos_checks import compare, mlflow_check
from jobs.configs import PRESETS, get_preset
from pipeline.orchestrate import stage_names

REPO = Path(__file__).resolve().parents[1]
TAG = "LIGHTRNN_CHAOS_TAG"  # in the environment of every process an attempt starts, Ray's included
EVENT = re.compile(r"^\[(stage|train)\] ")
CHECKPOINT_EVERY = 10  # steps: each 20-step phase of `tiny` takes 2 checkpoints, so kills land after one
STEP = re.compile(r"\bstep\s+(\d+)")
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+[^)]*\)(\x1b\[0m)? ")  # "(TrainController pid=7) "
CHECKPOINTED = "[checkpoint]"  # ends a [train] report whose step wrote a checkpoint (pipeline.train)


@dataclass
class Attempt:
    """One run of the pipeline command: its output lines with their times, and how it ended."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    returncode: int | None = None
    killed_at: str = ""  # the event line the kill followed, empty if not killed
    seconds: float = 0.0
    worker_kills: list[dict] = field(default_factory=list)  # Train workers killed while it ran

    @property
    def stage(self) -> str:
        """The stage that was running when the attempt ended."""
        starts = [line.split()[1] for _, line in self.lines if line.startswith("[stage] ")]
        return starts[-1] if starts else "-"

    def summary(self) -> dict[str, Any]:
        for _, line in reversed(self.lines):
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError("the run printed no JSON summary")


@dataclass
class KillPoint:
    event: int  # index into the reference run's event lines
    delay_s: float
    why: str


def pipeline_command(args: argparse.Namespace, root: str) -> list[str]:
    command = [sys.executable, "-m", "jobs.pipeline", "--config", args.config, "--root", root, "--json"]
    command += ["--workers", str(args.workers), "--checkpoint-every", str(CHECKPOINT_EVERY)]
    command += ["--tracking-uri", args.tracking_uri]
    if args.s3_endpoint:
        command += ["--s3-endpoint", args.s3_endpoint]
    for override in args.set:
        command += ["--set", override]
    return command


def kill_train_worker() -> str:
    """SIGKILL one Ray Train worker this drill started (Ray's own process title names it); its pid, or ""."""
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if proc.name().startswith("ray::RayTrainWorker") or "ray::RayTrainWorker" in " ".join(proc.cmdline()):
                proc.send_signal(signal.SIGKILL)
                return str(proc.pid)
    return ""


def kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries `tag` (the attempt's driver, Ray's daemons
    and workers), then wait for them; other Ray clusters on the machine are left alone."""
    mine = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(TAG) == tag:
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    for proc in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(mine, timeout=30)


def attempt_env(tag: str, ray_address: str) -> dict[str, str]:
    env = {**os.environ, TAG: tag, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)  # without one, a local Ray of the attempt's own, which the kill takes down
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def start_ray_head(cpus: int) -> str:
    """A local Ray head in this process for every attempt to connect to; its GCS address.

    Ray 2.60 gives a new raylet 30 s to register with the GCS (`ray._private.node.Node`), which a
    loaded machine can miss; here the registration check is retried for up to 5 minutes.
    """
    import ray
    from ray._private import services

    get_node = services.get_node

    def patient_get_node(*args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + 300
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    services.get_node = patient_get_node
    try:
        context = ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    finally:
        services.get_node = get_node
    return context.address_info["gcs_address"]


def run_attempt(
    command: list[str],
    log: Path,
    ray_address: str,
    events: list[str] | None = None,
    point: KillPoint | None = None,
    worker_points: list[KillPoint] | None = None,
) -> Attempt:
    """Run `command` to its end, or SIGKILL it `point.delay_s` after the first event line at or past
    `point.event` of the reference `events`. Each of `worker_points` whose event line shows up
    kills one Train worker and is removed from the list; the attempt goes on."""
    tag = uuid.uuid4().hex
    env = attempt_env(tag, ray_address)
    attempt, started = Attempt(), time.monotonic()
    with log.open("a", buffering=1) as out:  # line-buffered: the log can be followed
        out.write(f"\n=== {' '.join(command)}\n")
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # the [train] reports come from Ray's TrainController, on stderr
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        order = {line: i for i, line in enumerate(events or [])}
        for line in proc.stdout:
            out.write(line)
            line = RAY_PREFIX.sub("", line.rstrip("\n"))
            attempt.lines.append((time.monotonic() - started, line))
            position = order.get(event_key(line), -1)
            for due in [w for w in worker_points or [] if position >= w.event]:
                time.sleep(due.delay_s)
                pid = kill_train_worker()
                at = {"stage": attempt.stage, "s": round(time.monotonic() - started, 1)}
                attempt.worker_kills.append({"event": due.event, "delay_s": due.delay_s, "pid": pid, **at})
                worker_points.remove(due)  # type: ignore[union-attr]
            if point is not None and position >= point.event:
                # past the point's line (a resumed attempt skips what is committed): kill at once,
                # as the stage now running may end sooner than the point's delay
                time.sleep(point.delay_s if position == point.event else 0.0)
                attempt.killed_at = line
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait()
        kill_tagged(tag)  # Ray daemons that left the process group, and anything after a normal exit
    attempt.returncode, attempt.seconds = proc.returncode, time.monotonic() - started
    return attempt


def event_key(line: str) -> str:
    """A line as a kill point: a `[train]` report by its global step (its loss and speed vary)."""
    step = STEP.search(line)
    return f"[train] step {step.group(1)}" if line.startswith("[train] step") and step else line


def event_lines(attempt: Attempt) -> list[tuple[float, str]]:
    """The attempt's `[stage]` and `[train]` lines as kill points, each once (a retried stage prints again)."""
    seen: dict[str, float] = {}
    for t, line in attempt.lines:
        if EVENT.match(line):
            seen.setdefault(event_key(line), t)
    return [(t, key) for key, t in seen.items()]


def draw_kill_points(reference: Attempt, kills: int, rng: random.Random) -> list[KillPoint]:
    """`kills` points in run order: the unsafe moments first (checkpoint, cost pass, solve, export), then random."""
    events = event_lines(reference)
    checkpointed = {event_key(line) for _, line in reference.lines if line.endswith(CHECKPOINTED)}
    if not events:
        raise RuntimeError("the reference run printed no [stage] or [train] lines")

    def point(i: int, why: str) -> KillPoint:
        gap = (events[i + 1][0] if i + 1 < len(events) else reference.seconds) - events[i][0]
        return KillPoint(i, round(rng.uniform(0, max(gap, 0.0) * 0.9), 2), why)

    wanted = {
        "checkpoint": [i for i, (_, line) in enumerate(events) if line in checkpointed],
        "cost pass": [i for i, (_, line) in enumerate(events) if line.startswith("[stage] costs-")],
        "solve": [i for i, (_, line) in enumerate(events) if line.startswith("[stage] realloc-")],
        "export": [i for i, (_, line) in enumerate(events) if line == "[stage] export"],
    }
    points = [point(rng.choice(found), why) for why, found in wanted.items() if found]
    rng.shuffle(points)
    points = points[:kills]
    while len(points) < kills:
        points.append(point(rng.randrange(len(events)), "random"))
    for p in points:
        if p.why == "checkpoint":
            p.delay_s = round(rng.uniform(0, 0.5), 2)  # right after the report: the commit is under way
    return sorted(points, key=lambda p: (p.event, p.delay_s))


def draw_worker_points(reference: Attempt, kills: int, rng: random.Random) -> list[KillPoint]:
    """`kills` points right after training reports (not a phase's last, when its workers may be gone)."""
    events = event_lines(reference)
    reports = [i for i, (_, line) in enumerate(events) if line.startswith("[train] step") and i + 1 < len(events)]
    reports = [i for i in reports if events[i + 1][1].startswith("[train] step")]
    if kills and not reports:
        raise RuntimeError("the reference run printed no training report to kill a worker after")
    points = [
        KillPoint(i, round(rng.uniform(0, 0.5), 2), "worker") for i in rng.sample(reports, min(kills, len(reports)))
    ]
    return sorted(points, key=lambda p: p.event)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.chaos", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help=f"named configuration: {', '.join(PRESETS)}")
    p.add_argument("--root", help="where the reference and drill runs go, local or s3:// (default: runs/chaos-CONFIG)")
    p.add_argument("--work", help="local folder for logs and the MLflow store (default: ROOT if local)")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs to the pipeline to deliver")
    p.add_argument("--worker-kills", type=int, default=0, help="SIGKILLs to one Ray Train worker to deliver")
    p.add_argument("--seed", type=int, default=0, help="draws the kill points")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a field")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL, passed to every run")
    p.add_argument("--ppl-tolerance", type=float, default=0.0, help="relative test perplexity difference allowed")
    p.add_argument(
        "--weights-tolerance", type=float, default=0.0, help="largest absolute difference of the exported weights"
    )
    p.add_argument("--max-failed-starts", type=int, default=5, help="attempts in a row that fail unkilled")
    p.add_argument(
        "--ray",
        choices=("shared", "per-attempt"),
        default="shared",
        help="one local Ray head for all attempts (a killed driver's tasks and Train workers die with it), "
        "or a local Ray started by each attempt and killed with it (needs a machine where Ray starts in 30 s)",
    )
    p.add_argument("--json", action="store_true", help="end with one JSON line of results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.kills < 0 or args.worker_kills < 0:
        print("error: --kills and --worker-kills must be >= 0", file=sys.stderr)
        return 2
    try:
        config = get_preset(args.config).with_overrides(args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = (args.root or f"runs/chaos-{args.config}").rstrip("/")
    local = "://" not in root
    if not local and not args.work:
        print("error: give --work (a local folder for logs and MLflow) with a remote --root", file=sys.stderr)
        return 2
    work = Path(args.work or root).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if local:
        root = str(Path(root).resolve())
    args.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    log = work / "chaos.log"
    if args.ray == "per-attempt":
        return drill(args, config, root, log, "")
    import ray

    try:
        return drill(args, config, root, log, start_ray_head(args.workers + 2))
    finally:
        ray.shutdown()  # the head this process started, and only that one


def drill(args: argparse.Namespace, config: Any, root: str, log: Path, ray_address: str) -> int:
    """The reference run, the kills and re-runs, the comparison and the table; the exit status."""
    stages = stage_names(config)
    failures = [0]
    table: list[dict] = []
    worker_points: list[KillPoint] = []

    def until_done(command: list[str], events: list[str] | None = None, point: KillPoint | None = None) -> Attempt:
        """Run `command`; an attempt that fails unkilled (say, Ray timing out at start-up on a loaded
        machine) runs again, up to --max-failed-starts times in a row."""
        earlier: list[tuple[float, str]] = []  # a retried run's lines, so the reference keeps every stage's
        for _ in range(args.max_failed_starts):
            attempt = run_attempt(command, log, ray_address, events, point, worker_points if events else None)
            for kill in attempt.worker_kills:
                table.append(
                    {
                        "kill": len(table) + 1,
                        "point": f"{events[kill['event']]} +{kill['delay_s']:.2f}s",  # type: ignore[index]
                        "why": "worker",
                        "stage": kill["stage"],
                        "after_s": kill["s"],
                        "outcome": f"worker {kill['pid']} killed" if kill["pid"] else "no worker running",
                    }
                )
            if attempt.killed_at or attempt.returncode == 0:
                offset = earlier[-1][0] if earlier else 0.0
                attempt.lines = earlier + [(t + offset, line) for t, line in attempt.lines]
                return attempt
            offset = earlier[-1][0] if earlier else 0.0
            earlier += [(t + offset, line) for t, line in attempt.lines]
            failures[0] += 1
            print(f"[chaos] attempt exited {attempt.returncode} unkilled in {attempt.stage}; again", flush=True)
        raise RuntimeError(f"{args.max_failed_starts} attempts in a row failed; see {log}")

    print(f"[chaos] reference run -> {root}/reference (log: {log}; Ray: {ray_address or 'per attempt'})", flush=True)
    reference = until_done(pipeline_command(args, f"{root}/reference"))
    events = [line for _, line in event_lines(reference)]
    rng = random.Random(args.seed)
    points = draw_kill_points(reference, args.kills, rng)
    worker_points += draw_worker_points(reference, args.worker_kills, rng)
    drill_command = pipeline_command(args, f"{root}/drill")
    resumed_phases, checkpoints_seen = set(), set()
    for n, point in enumerate(points, 1):
        attempt = until_done(drill_command, events, point)
        if any(line.endswith(CHECKPOINTED) for _, line in attempt.lines):
            checkpoints_seen.add(attempt.stage)
        if attempt.killed_at and attempt.stage.startswith("train-") and attempt.stage in checkpoints_seen:
            resumed_phases.add(int(attempt.stage.split("-")[1]))
        row = {
            "kill": len(table) + 1,
            "point": f"{events[point.event]} +{point.delay_s:.2f}s",
            "why": point.why,
            "stage": attempt.stage,
            "after_s": round(attempt.seconds, 1),
            "outcome": "killed" if attempt.killed_at else f"finished first (rc {attempt.returncode})",
        }
        table.append(row)
        print(f"[chaos] kill {n}/{len(points)}: {row['outcome']} in {row['stage']} at {row['point']}", flush=True)
        if not attempt.killed_at:
            break
    else:
        attempt = until_done(drill_command, events)
    drill = attempt.summary()
    ref_summary = reference.summary()
    options = {"endpoint_url": args.s3_endpoint} if args.s3_endpoint else {}
    checks = compare(ref_summary, drill, config.rounds, args.ppl_tolerance, args.weights_tolerance, options)
    problems = mlflow_check(args.tracking_uri, drill["root"], stages)
    checks.append({"what": "MLflow runs", "reference": "", "drill": "; ".join(problems) or "ok", "ok": not problems})

    print(f"\n{'#':>3}  {'kill point':<58} {'why':<10} {'stage':<10} {'s':>6}  outcome")
    for r in table:
        print(
            f"{r['kill']:>3}  {r['point'][:58]:<58} {r['why']:<10} {r['stage']:<10} {r['after_s']:>6}  {r['outcome']}"
        )
    print(f"\n{'compared':<16} {'reference':<14} drill")
    for c in checks:
        print(f"{c['what']:<16} {c['reference']:<14} {c['drill']}  {'ok' if c['ok'] else 'DIFFERS'}")
    ok = all(c["ok"] for c in checks)
    kills = sum(r["outcome"] == "killed" for r in table)
    worker_kills = sum(r["outcome"].startswith("worker ") for r in table)
    print(
        f"[chaos] {kills} kills of the pipeline and {worker_kills} of a Train worker delivered, {failures[0]} "
        "unkilled failed starts retried; mid-phase resumes in "
        f"train phases {sorted(resumed_phases) or 'none'}; {'equal to the reference' if ok else 'DIFFERENCES'}",
        flush=True,
    )
    if args.json:
        print(json.dumps({"kills": table, "checks": checks, "resumed_phases": sorted(resumed_phases), "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
