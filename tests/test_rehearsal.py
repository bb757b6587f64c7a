"""The `clueweb-sim` path at 200k words, as a user runs it: a synthetic Zipf corpus of Parquet
documents on a real S3 server (moto), then `python -m jobs.pipeline --config clueweb-sim` with a
smaller vocabulary and corpus: hash-partitioned counting that trims the vocabulary, training on
2 Ray Train workers from blocks that straddle input units, the cost pass sharded over both
workers, the two-stage solve in Ray tasks, evaluation beside the unigram floor, export.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import boto3
from conftest import REPO, moto_server
from mlflow.tracking import MlflowClient

from jobs.configs import get_preset
from pipeline import storage
from pipeline.dataset import open_dataset
from pipeline.orchestrate import stage_names

MAX_VOCAB = 100_000


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_clueweb_path_at_200k_words_on_s3(tmp_path: Path) -> None:
    with moto_server() as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for bucket in ("corpus", "runs"):
            s3.create_bucket(Bucket=bucket)
        corpus = ["--distinct", "250000", "--tokens", "1000000", "--files", "8", "--valid-files", "1"]
        corpus += ["--test-files", "1", "--format", "parquet", "--output", "s3://corpus/sim", "--num-cpus", "2"]
        _run("jobs.synth_corpus", *corpus, "--s3-endpoint", endpoint)
        overrides = [
            "data.train=s3://corpus/sim/train",
            "data.valid=s3://corpus/sim/valid",
            "data.test=s3://corpus/sim/test",
            f"data.max_vocab={MAX_VOCAB}",
            "data.block_len=2048",
            "train.max_steps=40",
            "train.batch_size=16",
            "train.log_every=10",
            "realloc.cost_tokens=100000",
        ]
        tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
        command = ["jobs.pipeline", "--config", "clueweb-sim", "--root", "s3://runs/sim", "--s3-endpoint", endpoint]
        command += ["--workers", "2", "--tracking-uri", tracking, "--json"]
        out = _run(*command, *[a for o in overrides for a in ("--set", o)])
        summary = json.loads(out.strip().splitlines()[-1])
        options = {"endpoint_url": endpoint}
        data = open_dataset("s3://runs/sim/data", options)
        assert data.vocab_size == MAX_VOCAB  # 250,000 distinct words in, the most frequent kept
        assert data.shard_uris("train", edges=True)  # blocks straddle the 32 units of 6 files
        records = {}
        for name in stage_names(get_preset("clueweb-sim")):
            with storage.open(f"s3://runs/sim/stages/{name}.json", "rb", options) as f:
                records[name] = json.load(f)

    # every stage records its time and the peak memory of the driver and of its largest worker
    for name, record in records.items():
        assert record["seconds"] > 0 and record["peak_driver_mb"] > 0, name
    for name in ("data", "train-0", "costs-0", "realloc-0", "train-1"):
        assert records[name]["peak_worker_mb"] > 0, name
    costs, realloc = records["costs-0"]["metrics"], records["realloc-0"]["metrics"]
    assert costs["workers"] == 2 and 0 < costs["tokens"] <= 100_000 + 2
    assert realloc["words_moved"] > MAX_VOCAB // 2 and realloc["cost_after"] < realloc["cost_before"]
    assert realloc["peak_task_mb"] > 0  # the candidate pass and the row groups ran as Ray tasks
    # finite, above the unigram floor of this i.i.d. text and far below a uniform guess
    assert math.isfinite(summary["test_ppl"])
    assert summary["test_unigram_ppl"] < summary["test_ppl"] < summary["uniform_ppl"] / 2 == MAX_VOCAB / 2

    client = MlflowClient(tracking)
    parent = summary["mlflow_run_id"]
    table = json.loads(Path(client.download_artifacts(parent, "stage_costs.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["stage"] for r in rows] == list(records)
    assert all(r["seconds"] == records[r["stage"]]["seconds"] for r in rows)
    tokens = {r["stage"]: r["tokens"] for r in rows}
    assert tokens["train-0"] == tokens["train-1"] == 20 * 16 * 35  # each phase's steps x blocks x BPTT
    assert tokens["data"] > 500_000 and tokens["costs-0"] == costs["tokens"] and tokens["evaluate"] > 0
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(c.info.run_name for c in children) == sorted(records)
