"""The fault drill, run as a user runs it: SIGKILLs at fixed-seed moments, then the finished run
compared with an uninterrupted one (`jobs.chaos`)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
from conftest import REPO, moto_server

from jobs.chaos import RAY_PREFIX, Attempt, draw_kill_points, draw_worker_points, event_key


def test_kill_points_cover_the_unsafe_moments_in_run_order() -> None:
    lines = ["[stage] data", "[stage] train-0", "[train] phase 0: steps 0..40 of 80"]
    lines += [f"[train] step {s:>6}/80 loss 7.0 [checkpoint]" for s in (10, 20)]
    lines += ["[stage] costs-0", "[stage] realloc-0", "[stage] train-1", "[stage] evaluate", "[stage] export"]
    reference = Attempt(lines=[(float(i), line) for i, line in enumerate(lines)], returncode=0, seconds=len(lines))
    points = draw_kill_points(reference, 6, random.Random(0))
    events = [event_key(line) for line in lines]
    assert [p.event for p in points] == sorted(p.event for p in points)
    whys = {p.why: events[p.event] for p in points}
    assert set(whys) == {"checkpoint", "cost pass", "solve", "export", "random"}
    assert whys["cost pass"] == "[stage] costs-0" and whys["solve"] == "[stage] realloc-0"
    assert whys["export"] == "[stage] export" and whys["checkpoint"].startswith("[train] step")
    assert all(0 <= p.delay_s < 1 for p in points)  # within the gap to the next line
    assert event_key("[train] step     20/80 epoch 0.50 loss 6.123 ppl 456") == "[train] step 20"
    ray_line = "\x1b[36m(TrainController pid=4358)\x1b[0m [train] step     10/40 loss 8.471 [checkpoint]"
    assert RAY_PREFIX.sub("", ray_line) == "[train] step     10/40 loss 8.471 [checkpoint]"


def test_worker_kill_points_follow_a_training_report_with_another_one_after_it() -> None:
    lines = ["[stage] data", "[stage] train-0"]
    lines += [f"[train] step {s:>6}/40 loss 7.0" for s in (10, 20)]
    lines += ["[stage] costs-0", "[stage] train-1"]
    lines += [f"[train] step {s:>6}/40 loss 6.0" for s in (30, 40)]
    lines += ["[stage] evaluate"]
    reference = Attempt(lines=[(float(i), line) for i, line in enumerate(lines)], returncode=0, seconds=len(lines))
    points = draw_worker_points(reference, 5, random.Random(0))
    # only steps 10 and 30 have a report after them in the same phase: the workers are alive then
    assert [lines[p.event] for p in points] == [lines[2], lines[6]]
    assert all(p.why == "worker" and 0 <= p.delay_s <= 0.5 for p in points)


def _drill(args: list[str]) -> dict:
    """`python -m jobs.chaos --config tiny ARGS --json` as a user runs it; its JSON result, checked."""
    command = [sys.executable, "-m", "jobs.chaos", "--config", "tiny", *args, "--json"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    checks = {c["what"]: c for c in result["checks"]}
    assert set(checks) == {"allocation", "export weights", "test ppl", "MLflow runs"}
    assert all(c["ok"] for c in checks.values()) and checks["MLflow runs"]["drill"] == "ok", checks
    assert checks["export weights"]["drill"] == "max |diff| 0", checks  # bit for bit
    return result


@pytest.mark.slow  # three pipeline runs: minutes; `python -m pytest -m slow tests/test_chaos.py`
def test_drill_with_two_kills_ends_equal_to_the_uninterrupted_run(tmp_path) -> None:
    result = _drill(["--root", str(tmp_path / "drill"), "--kills", "2", "--seed", "3"])
    assert [k["outcome"] for k in result["kills"]] == ["killed", "killed"], result["kills"]


@pytest.mark.slow
def test_drill_on_an_s3_root_with_a_worker_kill_ends_equal_to_the_uninterrupted_run(tmp_path) -> None:
    import boto3

    with moto_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="drills")
        where = ["--root", "s3://drills/tiny", "--s3-endpoint", endpoint, "--work", str(tmp_path)]
        result = _drill([*where, "--kills", "2", "--worker-kills", "1", "--seed", "4"])
    outcomes = [k["outcome"] for k in result["kills"]]
    assert outcomes.count("killed") == 2 and sum(o.startswith("worker ") for o in outcomes) == 1, result["kills"]
