"""`MarkerCommit`: the commit protocol of a store on an object store (S3, GCS) or ``memory://``.

Object stores have no rename. A node at ``P`` is written in two steps:

1. its arrays under a fresh attempt prefix ``P/attempt-<unix ms>-<random>/``;
2. its group ``P/zarr.json`` (the commit marker), naming the attempt in ``data``, created with a
   conditional write: only if no value exists yet (TensorStore ``if_equal`` the generation of
   "no value", ``use_conditional_write`` on S3). A failed condition returns an empty generation:
   exactly one of racing writers commits, the other gets `FileExistsError` and its attempt is
   removed.

Readers reach arrays only through a marker, so an attempt a crash left unmarked is invisible;
`collect_garbage` (``vinekv gc``, and every open for writing) removes unmarked attempts older
than a grace period, by the time in their name. Metadata updates are compare-and-swap on the
key's generation. Deleting a run removes its marker first (the run is gone at once), then the
rest; what a crash leaves is removed by the next `collect_garbage` or by re-creating the run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import tensorstore as ts

from vinekv.kvstore.backends.interface import GC_GRACE_S, GarbageReport, GarbageScope
from vinekv.kvstore.errors import CorruptMetadataError, StoreError
from vinekv.kvstore.integrity import ATTEMPT, check_sealed
from vinekv.kvstore.tensorstore_backend import TensorStoreBackend, group_json

logger = logging.getLogger(__name__)

OBJECT_STORES = ("s3", "gcs")
OBJECT_STORE_TIMEOUT_S = 30.0  # the opening probe of an object store
NO_VALUE = b"\x02"  # TensorStore's storage generation of a key that holds no value
MAX_UPDATE_TRIES = 64


def attempt_name(now_s: float) -> str:
    """A fresh attempt folder name carrying its creation time (ms since the epoch)."""
    return f"attempt-{int(now_s * 1000):013d}-{uuid.uuid4().hex[:12]}"


def attempt_age_s(name: str, now_s: float) -> float | None:
    """Seconds since attempt ``name`` was started (None: not an attempt name)."""
    match = ATTEMPT.fullmatch(name)
    return None if match is None else now_s - int(match.group(1)) / 1000


class MarkerCommit(TensorStoreBackend):
    """A store on a kvstore without rename: attempt prefixes and conditional commit markers."""

    def __init__(self, spec: dict[str, Any], **options: Any):
        super().__init__(spec, **options)
        self._spec = spec
        if spec.get("driver") in OBJECT_STORES:
            self._probe()

    def _probe(self) -> None:
        """One listing request, so a wrong endpoint or bucket is a clear error now (TensorStore
        retries an unreachable endpoint without end) rather than a hang or a failed write later."""
        where = self.location("")
        endpoint = self._spec.get("endpoint", "the provider's default endpoint")
        try:
            self.kvstore.list(ts.KvStore.KeyRange("zarr.json", "zarr.json\0")).result(timeout=OBJECT_STORE_TIMEOUT_S)
        except TimeoutError:
            raise StoreError(
                f"{where}: no answer from {endpoint} within {OBJECT_STORE_TIMEOUT_S} s; set the endpoint "
                "(AWS_ENDPOINT_URL, or 'endpoint' in a kvstore spec) and check the network"
            ) from None
        except ValueError as err:
            if "NoSuchBucket" in str(err):
                raise StoreError(f"{where}: bucket {self._spec['bucket']!r} does not exist at {endpoint}") from None
            raise StoreError(f"{where}: the object store refused a listing: {str(err)[:300]}") from None

    def location(self, key: str) -> str:
        spec = self._spec
        if spec.get("driver") in OBJECT_STORES:  # ts cannot print an s3 URL with an explicit endpoint
            return f"{spec['driver']}://{spec['bucket']}/{spec.get('path', '')}{key}"
        return self.kvstore.url + key

    def children(self, prefix: str, skip_incomplete: bool = False) -> list[str]:
        """Child nodes with a commit marker (``<prefix><name>/zarr.json``)."""
        names = set()
        for key in self.keys(prefix):
            rest = key[len(prefix) :].split("/")
            if len(rest) == 2 and rest[1] == "zarr.json":
                names.add(rest[0])
        return sorted(names)

    def stored_bytes(self, prefix: str) -> int:
        reads = [self.kvstore.read(key) for key in self.keys(prefix)]
        return sum(len(read.result().value) for read in reads)

    # -- commits ---------------------------------------------------------------------------
    def staging_prefix(self, final_prefix: str) -> str:
        return f"{final_prefix}{attempt_name(time.time())}/"

    def data_path(self, staging: str, final_prefix: str) -> str:
        if not staging.startswith(final_prefix):
            raise ValueError(f"attempt {staging} is not inside its node {final_prefix}")
        return staging[len(final_prefix) :]

    def commit(self, staging: str, final_prefix: str, attributes: dict[str, Any], durable: bool | None = None) -> None:
        """Creates the marker ``final_prefix/zarr.json`` if absent; else discards the attempt.

        A failed condition whose marker names this very attempt is this writer's own commit
        (a PUT retried after its reply was lost), not a lost race."""
        if self._create(final_prefix + "zarr.json", group_json(attributes)):
            return
        if self._marked(staging):
            return
        self.delete_prefix(staging)  # the marker names another attempt: this one is garbage
        raise FileExistsError(
            f"{self.location(final_prefix)} already exists in the store (committed by another writer)"
        )

    def _marked(self, staging: str) -> bool:
        """Whether the marker of the node holding attempt ``staging`` names it."""
        node, attempt = _split_attempt(staging)
        marker = self.kvstore.read(node + "zarr.json").result()
        return marker.state == "value" and _named_attempt(marker.value) == attempt

    def _create(self, key: str, value: bytes) -> bool:
        """Writes ``key`` only if it holds no value; whether this call created it."""
        return bool(self.kvstore.write(key, value, if_equal=NO_VALUE).result().generation)

    def discard(self, staging: str) -> None:
        """Removes an attempt, unless a marker names it (a commit whose outcome its writer did not
        learn, e.g. a timeout after the server created the marker)."""
        if not self._marked(staging):
            self.delete_prefix(staging)

    def retire(self, prefix: str) -> None:
        """Deletes the marker (the node is gone at once), then everything under ``prefix``."""
        self.kvstore.write(prefix + "zarr.json", None).result()
        self.delete_prefix(prefix)

    def create_group(self, prefix: str, attributes: dict[str, Any], files: dict[str, bytes]) -> bool:
        """Removes what an interrupted deletion of a group at ``prefix`` left (keys listed before
        any of this call's writes, ``files`` excepted: a racing creator writes the same), writes
        ``files``, then creates the marker."""
        listed = self.keys(prefix)
        if prefix + "zarr.json" in listed:
            return False
        leftovers = [key for key in listed if key[len(prefix) :] not in files]
        if leftovers:
            logger.info("removing %d keys an interrupted deletion left under %s", len(leftovers), self.location(prefix))
            self._write_all(dict.fromkeys(leftovers))
        self._write_all({prefix + key: value for key, value in files.items()})
        return self._create(prefix + "zarr.json", group_json(attributes))

    def create_root(self, root: bytes, files: dict[str, bytes]) -> bool:
        if self.exists("zarr.json"):
            return False
        self._write_all(files)
        return self._create("zarr.json", root)

    def _write_all(self, values: dict[str, bytes | None]) -> None:
        """Writes every key (None: deletes it), all requests in flight at once."""
        for future in [self.kvstore.write(key, value) for key, value in values.items()]:
            future.result()

    def update_json(
        self, key: str, change: Callable[[dict[str, Any] | None], bytes], durable: bool | None = None
    ) -> bytes:
        """Compare-and-swap on the key's generation, retried (with jitter) while other writers
        win; `StoreError` after `MAX_UPDATE_TRIES` lost rounds."""
        for tries in range(MAX_UPDATE_TRIES):
            document, generation = self._read_versioned(key)
            value = change(document)
            if self.kvstore.write(key, value, if_equal=generation).result().generation:
                return value
            time.sleep(random.uniform(0, 0.01 * min(tries + 1, 10)))
        raise StoreError(f"{self.location(key)}: {MAX_UPDATE_TRIES} updates in a row lost to other writers")

    # -- writers -----------------------------------------------------------------------------
    def lock_for_writing(self, scope: GarbageScope) -> GarbageReport:
        """No lock (commits are conditional writes); removes what crashed writers left."""
        report = self.collect_garbage(scope)
        if report.removed:
            logger.info("removed %d leftovers of crashed writes or deletions", len(report.removed))
        return report

    def unlock(self) -> None:
        pass

    def collect_garbage(self, scope: GarbageScope, grace_s: float = GC_GRACE_S) -> GarbageReport:
        """Removes, in the node groups of ``scope``: attempts no marker names that are older than
        ``grace_s``, and the nodes of groups whose owner's marker is gone (an interrupted
        deletion's remains). One listing, and one read per node marker that has attempts beside it."""
        now = time.time()
        groups = dict(scope.node_groups())
        if not groups:
            return GarbageReport()
        common = os.path.commonprefix(list(groups))
        listed = self.keys(common[: common.rfind("/") + 1])
        listed_set = set(listed)
        alive = {group: owner in listed_set or self.exists(owner) for group, owner in groups.items()}
        owned: dict[str, bool] = {}  # node prefix -> whether its group's owner is alive
        nodes: dict[str, set[str]] = {}  # node prefix -> its attempt names
        marked: set[str] = set()
        for key in listed:
            group = _group_of(key, groups)
            if group is None:
                continue
            name, _, rest = key[len(group) :].partition("/")
            if not rest:  # the group's own metadata
                continue
            node = f"{group}{name}/"
            owned[node] = alive[group]
            attempts = nodes.setdefault(node, set())
            if rest == "zarr.json":
                marked.add(node)
            elif attempt_age_s(rest.split("/")[0], now) is not None:
                attempts.add(rest.split("/")[0])
        # a marked node's one attempt is its data (a node without arrays names an attempt it never wrote:
        # a crashed attempt beside it stays, harmless); beside others, the marker says which is live
        reads = {node: self.kvstore.read(node + "zarr.json") for node in marked if len(nodes[node]) > 1}
        removed, kept = [], []

        def young(name: str) -> bool:
            return attempt_age_s(name, now) < grace_s

        for node, attempts in sorted(nodes.items()):
            if not owned[node]:  # its group's owner was deleted
                if node in marked or not any(young(a) for a in attempts):
                    self.delete_prefix(node)
                    removed.append(self.location(node))
                else:
                    kept += [self.location(f"{node}{a}/") for a in sorted(attempts) if young(a)]
                continue
            if node in marked and node not in reads:
                continue
            live = _named_attempt(reads[node].result().value) if node in reads else ""
            if live is None:  # a damaged marker: nothing of the node is removed
                continue
            for name in sorted(attempts - {live}):
                where = self.location(f"{node}{name}/")
                if young(name):
                    kept.append(where)
                elif not self._marked(f"{node}{name}/"):  # a writer that committed since the listing keeps it
                    self.delete_prefix(f"{node}{name}/")
                    removed.append(where)
        return GarbageReport(removed=tuple(removed), kept=tuple(kept))


def _group_of(key: str, groups: dict[str, str]) -> str | None:
    """The group of ``groups`` that ``key`` lies in (None: none)."""
    for i, char in enumerate(key):
        if char == "/" and key[: i + 1] in groups:
            return key[: i + 1]
    return None


def _named_attempt(marker: bytes) -> str | None:
    """The attempt a marker's sealed ``data`` names (``""``: none; None: the marker is damaged)."""
    try:
        attrs = check_sealed(json.loads(marker)["attributes"]["vinekv"], "marker")
        return attrs.get("data", "").rstrip("/")
    except (ValueError, KeyError, TypeError, AttributeError, CorruptMetadataError):
        return None


def _split_attempt(staging: str) -> tuple[str, str]:
    """``(node prefix, attempt name)`` of an attempt prefix ``<node>attempt-.../``."""
    node, attempt, _ = staging.rsplit("/", 2)
    return node + "/", attempt
