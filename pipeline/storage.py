"""Storage behind URIs (local paths, file://, s3://, memory://) through fsspec.

Two rules make stage outputs safe to read:

- every file is written whole or not at all: bytes go to a local temporary file first,
  then a rename (local disk) or a single upload (object stores; an S3 PUT or multipart
  upload is invisible until it completes);
- a dataset is committed by `manifest.json`, written last. A reader trusts only the
  manifest and the files it lists, so a stage killed midway leaves nothing a reader accepts.

S3 settings come from the usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) unless given
explicitly as `storage_options` (s3fs keywords, e.g. {"endpoint_url": "http://127.0.0.1:5555"}).
"""

from __future__ import annotations

import builtins
import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from lightrnn.io import atomic_path

MANIFEST = "manifest.json"
FORMAT = "lightrnn-token-blocks"
FORMAT_VERSION = 1


class StorageError(RuntimeError):
    """A storage location that cannot be used as asked."""


class DatasetNotCommittedError(StorageError):
    """A dataset root without a manifest: the stage that writes it did not finish."""


class DatasetExistsError(StorageError):
    """The output already holds a committed dataset made with a different configuration."""


def s3_options_from_env() -> dict[str, Any]:
    """s3fs keywords from the standard AWS variables (botocore reads the credentials itself)."""
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `uri` and the path inside it."""
    uri = os.fspath(uri)
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    options: dict[str, Any] = s3_options_from_env() if protocol in ("s3", "s3a") else {}
    options.update(storage_options or {})
    try:
        return fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as e:
        raise StorageError(f"cannot open storage for {uri!r}: {e}") from e


def join(root: str, *parts: str) -> str:
    """`root/part/...` for paths and URIs alike."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def is_local(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    return isinstance(filesystem(uri, storage_options)[0], LocalFileSystem)


def exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache()  # listings are cached per instance; another process may have written since
    return fs.exists(path)


def listdir(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Names (not paths) directly under `uri`, sorted; [] if it does not exist."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    names.discard("")  # S3 "prefix/" marker objects
    return sorted(names)


def open(uri: str, mode: str = "rb", storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> IO:
    """Open a file for reading; `compression="infer"` decompresses .gz/.xz by name."""
    if any(c in mode for c in "wax+"):
        raise StorageError("use atomic_write() to write: plain writes could leave half a file behind")
    fs, path = filesystem(uri, storage_options)
    try:
        return fs.open(path, mode, **kwargs)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such file: {uri}") from e


@contextlib.contextmanager
def atomic_write(uri: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[IO[bytes]]:
    """Write `uri` whole or not at all: `lightrnn.io.atomic_path` on local disk, else one upload."""
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        with atomic_path(path) as tmp, builtins.open(tmp, "wb") as f:
            yield f
        return
    with tempfile.TemporaryDirectory(prefix="lightrnn-upload-") as tmp_dir:
        tmp = os.path.join(tmp_dir, "part")
        with builtins.open(tmp, "wb") as f:
            yield f
        fs.put_file(tmp, path)  # an S3 PUT or multipart upload is invisible until it completes


@contextlib.contextmanager
def atomic_local_path(uri: str, storage_options: Mapping[str, Any] | None = None, suffix: str = "") -> Iterator[str]:
    """A local path to write `uri` to natively (e.g. Arrow's own file I/O), committed like `atomic_write`."""
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        with atomic_path(path, suffix) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="lightrnn-upload-") as tmp_dir:
        tmp = os.path.join(tmp_dir, "part" + suffix)
        yield tmp
        fs.put_file(tmp, path)


def write_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    with atomic_write(uri, storage_options) as f:
        f.write(data)


def remove(uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a file or a whole prefix; nothing if absent."""
    fs, path = filesystem(uri, storage_options)
    fs.invalidate_cache()
    if fs.exists(path):
        fs.rm(path, recursive=True)


def write_manifest(root: str, manifest: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> None:
    """Commit a dataset: write `root/manifest.json` (format and version added). Call it last."""
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    write_bytes(join(root, MANIFEST), json.dumps(body, indent=1, sort_keys=True).encode(), storage_options)


def read_manifest(root: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The committed manifest of `root`; a clear error if there is none or it is not ours."""
    uri = join(root, MANIFEST)
    if not exists(uri, storage_options):
        raise DatasetNotCommittedError(
            f"{root} has no {MANIFEST}: the stage that writes it did not finish (or this is not a dataset "
            f"root). Re-run the stage (e.g. python -m jobs.prepare ... --output {root}); it starts over cleanly."
        )
    try:
        with open(uri, "rb", storage_options) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StorageError(f"{uri} is not valid JSON ({e}); delete {root} and re-run the stage") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StorageError(f"{uri} is not a {FORMAT} manifest; point at a dataset written by python -m jobs.prepare")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StorageError(
            f"{uri} has format version {manifest.get('format_version')}, this code reads {FORMAT_VERSION}; "
            "re-run the stage with this version"
        )
    return manifest


def check_output(root: str, config: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> bool:
    """True if `root` already holds a committed dataset made with `config` (nothing to do).

    False if nothing is committed there (the caller may write). A committed dataset with a
    different config is never overwritten: that raises DatasetExistsError.
    """
    if not exists(join(root, MANIFEST), storage_options):
        return False
    manifest = read_manifest(root, storage_options)
    if manifest.get("config") == dict(config):
        return True
    old, new = manifest.get("config") or {}, dict(config)
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    raise DatasetExistsError(
        f"{root} already holds a dataset made with a different configuration (differs in: "
        f"{', '.join(differing)}). Choose another --output, or delete {root} first."
    )
