"""The prepare stage against a real S3-compatible server (moto in server mode on 127.0.0.1)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import moto_server

from lightrnn.corpus import encode_file
from pipeline import storage
from pipeline.dataset import open_dataset
from pipeline.prepare import prepare
from pipeline.runconfig import DataConfig


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def ray_local(endpoint: str) -> Iterator[None]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_prepare_reads_and_writes_s3(endpoint: str, ptb_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="corpus")
    s3.create_bucket(Bucket="runs")
    s3.upload_file(str(ptb_dir / "ptb.valid.txt"), "corpus", "ptb/train/part-0.txt")
    s3.upload_file(str(ptb_dir / "ptb.test.txt"), "corpus", "ptb/train/part-1.txt")
    s3.upload_file(str(ptb_dir / "ptb.test.txt"), "corpus", "ptb/test.txt")
    options = {"endpoint_url": endpoint}
    config = DataConfig(train="s3://corpus/ptb/train/", test="s3://corpus/ptb/test.txt", block_len=1000)
    manifest = prepare(config, "s3://runs/ptb/prepared", options)
    assert manifest["splits"]["train"]["tokens"] == 73_760 + 82_430
    assert len(manifest["splits"]["train"]["files"]) == 2

    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="runs", Prefix="ptb/prepared/")["Contents"]}
    assert "ptb/prepared/manifest.json" in keys and "ptb/prepared/vocab.parquet" in keys

    data = open_dataset("s3://runs/ptb/prepared", options)
    vocab = data.vocab()
    expected = np.concatenate(
        [encode_file(ptb_dir / "ptb.valid.txt", vocab), encode_file(ptb_dir / "ptb.test.txt", vocab)]
    )
    np.testing.assert_array_equal(data.tokens("train"), expected)
    np.testing.assert_array_equal(data.tokens("test"), encode_file(ptb_dir / "ptb.test.txt", vocab))
    rows = data.ray_dataset("train").count()  # Ray Data reads the shards from S3 too
    assert rows == manifest["splits"]["train"]["blocks"]

    assert prepare(config, "s3://runs/ptb/prepared", options)["skipped"]  # committed: a re-run does nothing

    # endpoint from the standard environment variable, no explicit options
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert storage.exists("s3://runs/ptb/prepared/manifest.json")
    assert open_dataset("s3://runs/ptb/prepared").manifest["run_id"] == manifest["run_id"]


def test_uncommitted_s3_output_is_refused_then_completed(endpoint: str, ptb_dir: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="half")
    s3.upload_file(str(ptb_dir / "ptb.test.txt"), "half", "in/test.txt")
    # what a killed run leaves on S3: shards and a vocabulary, no manifest
    s3.put_object(Bucket="half", Key="out/shards/train-00000-deadbeef.parquet", Body=b"half a shard")
    s3.put_object(Bucket="half", Key="out/vocab.parquet", Body=b"stale")
    options = {"endpoint_url": endpoint}
    with pytest.raises(storage.DatasetNotCommittedError, match="did not finish"):
        open_dataset("s3://half/out", options)
    prepare(DataConfig(train="s3://half/in/test.txt"), "s3://half/out", options)
    data = open_dataset("s3://half/out", options)
    np.testing.assert_array_equal(data.tokens("train"), encode_file(ptb_dir / "ptb.test.txt", data.vocab()))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="half", Prefix="out/shards/")["Contents"]}
    assert "out/shards/train-00000-deadbeef.parquet" not in keys  # the stale shard was cleared


def test_parquet_documents_on_s3_by_glob(endpoint: str, ptb_dir: Path) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="docs")
    lines = (ptb_dir / "ptb.test.txt").read_text().splitlines()
    docs = ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)]  # documents of 10 lines
    for part, start in enumerate(range(0, len(docs), 150)):
        body = io.BytesIO()
        pq.write_table(pa.table({"text": docs[start : start + 150]}), body, row_group_size=40)
        s3.put_object(Bucket="docs", Key=f"ptb/part-{part}.parquet", Body=body.getvalue())
    s3.put_object(Bucket="docs", Key="ptb/README.txt", Body=b"not part of the glob")
    options = {"endpoint_url": endpoint}
    manifest = prepare(DataConfig(train="s3://docs/ptb/*.parquet", block_len=500), "s3://docs/out", options)
    assert manifest["splits"]["train"]["tokens"] == 82_430  # the same lines as ptb.test.txt
    assert manifest["splits"]["train"]["units"] == -(-len(docs) // 150)  # each file's row groups fit one unit
    data = open_dataset("s3://docs/out", options)
    np.testing.assert_array_equal(data.tokens("train"), encode_file(ptb_dir / "ptb.test.txt", data.vocab()))
