"""Storage helpers on local disk and memory://: atomic writes, listings, manifests, commits."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from pipeline import storage


@pytest.fixture(params=["local", "file", "memory"])
def root(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "ds")
    elif request.param == "file":
        yield f"file://{tmp_path}/ds"
    else:
        uri = f"memory://test-storage/{tmp_path.name}/ds"
        yield uri
        storage.remove(uri)


def test_write_read_list_remove(root: str) -> None:
    assert not storage.exists(root)
    assert storage.listdir(root) == []
    storage.write_bytes(storage.join(root, "a.bin"), b"hello")
    storage.write_bytes(storage.join(root, "sub", "b.bin"), b"world")
    assert storage.listdir(root) == ["a.bin", "sub"]
    with storage.open(storage.join(root, "a.bin")) as f:
        assert f.read() == b"hello"
    storage.remove(storage.join(root, "sub"))
    assert storage.listdir(root) == ["a.bin"]


def test_failed_write_leaves_nothing(root: str) -> None:
    target = storage.join(root, "x.bin")
    storage.write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(target) as f:
        f.write(b"half of the new")
        raise RuntimeError("boom")
    with storage.open(target) as f:
        assert f.read() == b"old"  # the old file whole, no temporary left beside it
    assert storage.listdir(root) == ["x.bin"]


def test_open_refuses_plain_writes(tmp_path) -> None:
    with pytest.raises(storage.StorageError, match="atomic_write"):
        storage.open(str(tmp_path / "f"), "wb")


def test_missing_file_names_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        storage.open(str(tmp_path / "nope.txt"))


def test_manifest_roundtrip_and_commit_rules(root: str) -> None:
    with pytest.raises(storage.DatasetNotCommittedError, match="did not finish.*Re-run"):
        storage.read_manifest(root)
    config = {"block_len": 8, "lower": False}
    assert storage.check_output(root, config) is False  # nothing committed: go ahead
    storage.write_manifest(root, {"config": config, "splits": {"train": {"tokens": 5}}})
    manifest = storage.read_manifest(root)
    assert manifest["format"] == storage.FORMAT and manifest["format_version"] == storage.FORMAT_VERSION
    assert manifest["splits"]["train"]["tokens"] == 5
    assert storage.check_output(root, config) is True  # same config: already done
    with pytest.raises(storage.DatasetExistsError, match="differs in: block_len"):
        storage.check_output(root, {"block_len": 16, "lower": False})


def test_foreign_or_corrupt_manifest(root: str) -> None:
    storage.write_bytes(storage.join(root, storage.MANIFEST), b"{not json")
    with pytest.raises(storage.StorageError, match="not valid JSON"):
        storage.read_manifest(root)
    storage.write_bytes(storage.join(root, storage.MANIFEST), json.dumps({"name": "something else"}).encode())
    with pytest.raises(storage.StorageError, match="not a lightrnn-token-blocks manifest"):
        storage.read_manifest(root)
    body = {"format": storage.FORMAT, "format_version": 99}
    storage.write_bytes(storage.join(root, storage.MANIFEST), json.dumps(body).encode())
    with pytest.raises(storage.StorageError, match="format version 99"):
        storage.read_manifest(root)


def test_local_files_are_readable_by_others(tmp_path) -> None:
    path = tmp_path / "f.bin"
    storage.write_bytes(str(path), b"x")
    assert os.stat(path).st_mode & 0o044 == 0o044


def test_s3_options_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert storage.s3_options_from_env() == {
        "endpoint_url": "http://127.0.0.1:1",
        "client_kwargs": {"region_name": "eu-west-3"},
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")  # the S3-specific one wins
    assert storage.s3_options_from_env()["endpoint_url"] == "http://127.0.0.1:2"
