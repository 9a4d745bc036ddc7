"""`open_backend`: the backend of a store location, picked by where it is."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import tensorstore as ts

from vinekv.kvstore.backends.marker import MarkerCommit
from vinekv.kvstore.backends.rename import RenameCommit
from vinekv.kvstore.tensorstore_backend import TensorStoreBackend


def open_backend(
    path_or_spec: str | Path | dict[str, Any],
    *,
    durable_writes: bool = True,
    cache_bytes: int = 0,
    io_threads: int = 8,
) -> TensorStoreBackend:
    """The backend of a store location: `RenameCommit` for a local path (a path, ``file://`` URL or
    file spec), `MarkerCommit` for any other kvstore (``s3://``, ``gs://``, ``memory://``, a spec)."""
    spec = _kvstore_spec(path_or_spec)
    protocol = RenameCommit if spec.get("driver") == "file" else MarkerCommit
    return protocol(spec, durable_writes=durable_writes, cache_bytes=cache_bytes, io_threads=io_threads)


def is_local(path_or_spec: str | Path | dict[str, Any]) -> bool:
    """Whether a store location is a local directory (a path, ``file://`` URL or file spec)."""
    return _kvstore_spec(path_or_spec).get("driver") == "file"


def _kvstore_spec(path_or_spec: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A TensorStore kvstore spec; an ``s3://`` URL gets its endpoint and region from the standard
    variables (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or
    ``AWS_DEFAULT_REGION``), which TensorStore itself does not read. Credentials stay with
    TensorStore (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles) and are never logged."""
    if isinstance(path_or_spec, dict):
        spec = dict(path_or_spec)
    elif isinstance(path_or_spec, Path) or "://" not in str(path_or_spec):
        spec = {"driver": "file", "path": str(Path(path_or_spec).expanduser().resolve())}
    else:
        spec = ts.KvStore.Spec(str(path_or_spec)).to_json()
        if spec.get("driver") == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if endpoint:
                spec["endpoint"] = endpoint
            if region or endpoint:
                spec["aws_region"] = region or "us-east-1"
    if spec.get("driver") == "s3":  # commit markers are conditional creates, done by the server
        spec.setdefault("use_conditional_write", True)
    if spec.get("path") and not spec["path"].endswith("/"):
        spec["path"] += "/"
    return spec
