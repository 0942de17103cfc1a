"""Checkpoint store on `pyarrow.fs`: atomic commits, checksums, tenant namespaces.

Layout under the store's root (a local or shared directory, or an ``s3://`` /
``gs://`` URI)::

    <root>/<tenant>/<workload>/
        FENCE                               incarnation allowed to commit (JSON)
        ckpt-<step:012d>-<incarnation:04d>/
            state.json                      the state's JSON tree
            tensors.safetensors             the state's tensors
            MANIFEST.json                   step, sizes and sha256 of both files
            COMMITTED                       sha256 of MANIFEST.json

Order of operations (why a crash never corrupts the store)
-----------------------------------------------------------
Saving writes, in this order:

1. ``state.json`` and ``tensors.safetensors``;
2. ``MANIFEST.json`` holding the size and sha256 of each data file;
3. ``COMMITTED`` holding the sha256 of the manifest's bytes.

A checkpoint exists for readers only once step 3 has finished. A crash before
step 3 leaves a directory without ``COMMITTED``, which readers skip (and which a
later save of the same workload removes). A crash in the middle of writing
``COMMITTED`` leaves a marker that does not parse or does not match the
manifest's hash: skipped too. A data file damaged after the commit (a torn
copy, a flipped bit, a truncated upload) no longer matches its checksum in the
manifest: the reader logs why and falls back to the next older checkpoint. On
a local disk every file is fsynced before the next one is written, and the
directory after the marker, so the page cache cannot reorder them across a
power cut; object stores (S3, GCS) make an object visible only when its upload
completes, which gives the same ordering without a rename.

Pruning to the last K deletes ``COMMITTED`` first and the files after it, so a
crash halfway through pruning leaves an uncommitted directory (ignored), never
a committed checkpoint with missing files.

Two runners of the same workload (a runner declared lost that is in fact still
running) are kept apart by the fence: the platform writes the incarnation it
has just started into ``FENCE`` before that runner starts; a runner checks the
fence right before writing ``COMMITTED`` and refuses to commit when it is
stale. Directory names carry the incarnation, so the two never write the same
files.

Tenant isolation
----------------
`CheckpointStore` is the operator's handle. Tenants (and their runners) get a
`TenantStore` from `CheckpointStore.tenant`, which knows only its own
directory: every path it builds is that directory plus a name that passed
`raysys.sharing.names.check_name`, so no call on it can list, read or write
another tenant's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pyarrow.fs as pafs
from pydantic import AfterValidator

from raysys.runtime.config import check_output_dir
from raysys.runtime.errors import ConfigError, RaysysError
from raysys.sharing.names import check_name
from raysys.sharing.state_codec import (
    decode_state,
    encode_state,
    tensors_from_bytes,
    tensors_to_bytes,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
MANIFEST_FILE = "MANIFEST.json"
COMMIT_FILE = "COMMITTED"
FENCE_FILE = "FENCE"
# At least 12 and 4 digits: a step past 10**12 or an incarnation past 9999
# widens its field, and such a checkpoint must still be found.
CKPT_DIR = re.compile(r"ckpt-(\d{12,})-(\d{4,})")
CLOUD_SCHEMES = ("s3://", "gs://", "gcs://", "hdfs://", "file://")


class CheckpointError(RaysysError):
    """A checkpoint could not be written or read."""


class StaleIncarnation(CheckpointError):
    """A runner tried to commit after a newer runner of its workload started."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as listed (contents not verified)."""

    workload: str
    step: int
    incarnation: int
    checkpoint_id: str


@dataclass
class Checkpoint:
    """A verified checkpoint: its state and the metadata saved with it."""

    info: CheckpointInfo
    state: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def step(self) -> int:
        return self.info.step


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checkpoint_id(step: int, incarnation: int) -> str:
    return f"ckpt-{step:012d}-{incarnation:04d}"


def _check_local_location(uri: str) -> str:
    # A config field's check: a local store must be a folder or creatable, a
    # URI must have a scheme the store opens; the URI itself is opened when the
    # store is (that may need the network).
    if not uri:
        raise ValueError(
            "the checkpoint store location is empty; give a directory or a "
            "s3:// or gs:// URI"
        )
    if "://" not in uri:
        check_output_dir(Path(uri))
    elif not uri.startswith(CLOUD_SCHEMES):
        raise ValueError(
            f"checkpoint store location {uri!r} has an unsupported scheme; use a "
            f"directory or one of {', '.join(CLOUD_SCHEMES)}"
        )
    return uri


# A config field naming a checkpoint store (folder or URI), checked up front.
StoreLocation = Annotated[str, AfterValidator(_check_local_location)]


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A `pyarrow.fs` filesystem and root path for a directory or URI.

    Plain paths (relative ones resolved against the working directory) use the
    local filesystem; ``s3://``, ``gs://`` and ``file://`` URIs go through
    `pyarrow.fs.FileSystem.from_uri`.

    Raises:
        ConfigError: the URI names a scheme pyarrow cannot open.
    """
    if not isinstance(uri, str) or not uri:
        raise ConfigError(
            f"checkpoint store location {uri!r} is empty; give a directory or a "
            "s3:// or gs:// URI"
        )
    if "://" not in uri:
        try:
            check_output_dir(Path(uri))
        except ValueError as e:
            raise ConfigError(f"checkpoint store: {e}") from e
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if not uri.startswith(CLOUD_SCHEMES):
        raise ConfigError(
            f"checkpoint store location {uri!r} has an unsupported scheme; use a "
            f"directory or one of {', '.join(CLOUD_SCHEMES)}"
        )
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot open checkpoint store {uri!r}: {e}") from e
    return fs, path.rstrip("/")


class _Files:
    """Whole-file reads and durable writes on one filesystem."""

    def __init__(self, fs: pafs.FileSystem):
        self.fs = fs
        self.local = isinstance(fs, pafs.LocalFileSystem)

    def write(self, path: str, data: bytes) -> None:
        if self.local:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def sync_dir(self, path: str) -> None:
        if self.local:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.readall()

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def listdir(self, path: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=False)
        return self.fs.get_file_info(selector)

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def remove_tree(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def remove_file(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)


class TenantStore:
    """One tenant's checkpoints; the only store object a tenant ever holds.

    Built by `CheckpointStore.tenant`; every path it touches lies under
    ``<root>/<tenant>/``.
    """

    def __init__(self, fs: pafs.FileSystem, base: str, tenant: str, keep_last: int):
        self._files = _Files(fs)
        self._base = base
        self.tenant = tenant
        self.keep_last = keep_last

    def _workload_dir(self, workload: str) -> str:
        return f"{self._base}/{check_name(workload, 'workload')}"

    # -- writing -----------------------------------------------------------

    def save(
        self,
        workload: str,
        step: int,
        state: Any,
        *,
        incarnation: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Commit ``state`` as the checkpoint of ``workload`` after ``step`` steps.

        Follows the order of operations in the module docstring; older
        checkpoints beyond the last ``keep_last`` are pruned afterwards.

        Raises:
            StaleIncarnation: a newer runner of this workload has started.
            raysys.sharing.state_codec.StateEncodingError: the state holds a
                value the format cannot store.
            CheckpointError: the filesystem refused a write.
        """
        if step < 0 or incarnation < 0:
            raise CheckpointError(
                f"step {step} and incarnation {incarnation} must be >= 0"
            )
        tree, tensors = encode_state(state)
        blob, flavour = tensors_to_bytes(tensors)
        state_bytes = json.dumps(tree, allow_nan=False).encode()
        ckpt_id = _checkpoint_id(step, incarnation)
        wdir = self._workload_dir(workload)
        cdir = f"{wdir}/{ckpt_id}"
        try:
            # A directory of this name without COMMITTED is a torn earlier
            # attempt of the same incarnation: start it over.
            self._files.remove_tree(cdir)
            self._files.makedirs(cdir)

            # 1. data
            self._files.write(f"{cdir}/{STATE_FILE}", state_bytes)
            self._files.write(f"{cdir}/{TENSOR_FILE}", blob)

            # 2. manifest with checksums
            manifest = {
                "format": FORMAT_VERSION,
                "tenant": self.tenant,
                "workload": workload,
                "step": step,
                "incarnation": incarnation,
                "created_at": time.time(),
                "tensor_flavour": flavour,
                "metadata": metadata or {},
                "files": {
                    STATE_FILE: {
                        "sha256": _sha256(state_bytes),
                        "size_bytes": len(state_bytes),
                    },
                    TENSOR_FILE: {"sha256": _sha256(blob), "size_bytes": len(blob)},
                },
            }
            manifest_bytes = json.dumps(manifest, indent=1).encode()
            self._files.write(f"{cdir}/{MANIFEST_FILE}", manifest_bytes)

            # 3. commit marker, only while this incarnation still holds the fence
            fence = self.fence(workload)
            if fence is not None and fence != incarnation:
                raise StaleIncarnation(
                    f"{self.tenant}/{workload}: incarnation {incarnation} may not "
                    f"commit, incarnation {fence} has taken over"
                )
            marker = json.dumps({"manifest_sha256": _sha256(manifest_bytes)})
            self._files.write(f"{cdir}/{COMMIT_FILE}", marker.encode())
            self._files.sync_dir(cdir)
        except OSError as e:
            raise CheckpointError(
                f"writing checkpoint {ckpt_id} of {self.tenant}/{workload} failed: {e}"
            ) from e
        info = CheckpointInfo(workload, step, incarnation, ckpt_id)
        logger.debug("committed %s/%s %s", self.tenant, workload, ckpt_id)
        self._prune(workload, newest=info)
        return info

    def _prune(self, workload: str, newest: CheckpointInfo) -> None:
        wdir = self._workload_dir(workload)
        committed = self.list(workload)
        for old in committed[: max(0, len(committed) - self.keep_last)]:
            # Marker first: a crash here leaves an uncommitted directory.
            self._files.remove_file(f"{wdir}/{old.checkpoint_id}/{COMMIT_FILE}")
            self._files.remove_tree(f"{wdir}/{old.checkpoint_id}")
            logger.debug("pruned %s/%s %s", self.tenant, workload, old.checkpoint_id)
        # Torn directories older than the newest commit can never be completed.
        for step, inc, name in self._dirs(workload):
            if (step, inc) < (
                newest.step,
                newest.incarnation,
            ) and not self._files.exists(f"{wdir}/{name}/{COMMIT_FILE}"):
                self._files.remove_tree(f"{wdir}/{name}")

    # -- reading -----------------------------------------------------------

    def _dirs(self, workload: str) -> list[tuple[int, int, str]]:
        found = []
        for info in self._files.listdir(self._workload_dir(workload)):
            match = CKPT_DIR.fullmatch(info.base_name)
            if match and info.type == pafs.FileType.Directory:
                found.append((int(match[1]), int(match[2]), info.base_name))
        return sorted(found)

    def list(self, workload: str) -> list[CheckpointInfo]:
        """Committed checkpoints of ``workload``, oldest first (not verified)."""
        wdir = self._workload_dir(workload)
        return [
            CheckpointInfo(workload, step, inc, name)
            for step, inc, name in self._dirs(workload)
            if self._files.exists(f"{wdir}/{name}/{COMMIT_FILE}")
        ]

    def workloads(self) -> list[str]:
        """Names of this tenant's workloads that have a checkpoint directory."""
        return sorted(
            i.base_name
            for i in self._files.listdir(self._base)
            if i.type == pafs.FileType.Directory
        )

    def load(self, workload: str, checkpoint_id: str) -> Checkpoint:
        """Read and verify one checkpoint.

        Raises:
            CheckpointError: it is uncommitted, torn or fails a checksum; the
                message says which.
        """
        match = CKPT_DIR.fullmatch(checkpoint_id)
        if match is None:
            raise CheckpointError(
                f"checkpoint id {checkpoint_id!r} is not of the form "
                "ckpt-<at least 12 digits>-<at least 4 digits>"
            )
        cdir = f"{self._workload_dir(workload)}/{checkpoint_id}"
        try:
            marker_bytes = self._files.read(f"{cdir}/{COMMIT_FILE}")
        except (FileNotFoundError, OSError) as e:
            raise CheckpointError(f"{checkpoint_id} is not committed") from e
        try:
            manifest_bytes = self._files.read(f"{cdir}/{MANIFEST_FILE}")
            marker = json.loads(marker_bytes)
            if marker.get("manifest_sha256") != _sha256(manifest_bytes):
                raise CheckpointError(
                    f"{checkpoint_id}: manifest does not match its commit marker"
                )
            manifest = json.loads(manifest_bytes)
            data = {}
            for name, expected in manifest["files"].items():
                if name not in (STATE_FILE, TENSOR_FILE):
                    raise CheckpointError(f"{checkpoint_id}: unexpected file {name!r}")
                data[name] = self._files.read(f"{cdir}/{name}")
                got = _sha256(data[name])
                if (
                    len(data[name]) != expected["size_bytes"]
                    or got != expected["sha256"]
                ):
                    raise CheckpointError(
                        f"{checkpoint_id}: {name} has {len(data[name])} bytes with "
                        f"sha256 {got[:12]}..., the manifest says "
                        f"{expected['size_bytes']} bytes with "
                        f"{expected['sha256'][:12]}..."
                    )
            tensors = tensors_from_bytes(data[TENSOR_FILE], manifest["tensor_flavour"])
            state = decode_state(json.loads(data[STATE_FILE]), tensors)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{checkpoint_id} is unreadable: {e}") from e
        info = CheckpointInfo(workload, int(match[1]), int(match[2]), checkpoint_id)
        return Checkpoint(
            info=info,
            state=state,
            metadata=manifest.get("metadata", {}),
            created_at=float(manifest.get("created_at", 0.0)),
        )

    def latest(self, workload: str) -> Checkpoint | None:
        """The newest checkpoint that verifies, or None when there is none.

        Torn or corrupt checkpoints are skipped with a WARNING naming why, and
        the next older one is tried.
        """
        wdir = self._workload_dir(workload)
        for step, _inc, name in reversed(self._dirs(workload)):
            if not self._files.exists(f"{wdir}/{name}/{COMMIT_FILE}"):
                logger.warning(
                    "%s/%s: skipping %s (step %d): no commit marker, the write was "
                    "interrupted before it committed",
                    self.tenant,
                    workload,
                    name,
                    step,
                )
                continue
            try:
                return self.load(workload, name)
            except CheckpointError as e:
                logger.warning(
                    "%s/%s: skipping %s, falling back to an older checkpoint: %s",
                    self.tenant,
                    workload,
                    name,
                    e,
                )
        return None

    def fence(self, workload: str) -> int | None:
        """The incarnation currently allowed to commit, or None when unset."""
        path = f"{self._workload_dir(workload)}/{FENCE_FILE}"
        try:
            return int(json.loads(self._files.read(path))["incarnation"])
        except (FileNotFoundError, OSError):
            return None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"fence file {path} is unreadable: {e}") from e


class CheckpointStore:
    """The platform operator's checkpoint store over a directory or URI.

    Args:
        location: a directory (local or shared), or an ``s3://`` / ``gs://`` URI.
        keep_last: committed checkpoints kept per workload (K >= 1).

    Raises:
        ConfigError: the location or ``keep_last`` is invalid.
    """

    def __init__(self, location: str, keep_last: int = 3):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ConfigError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        self.location = location
        self.keep_last = keep_last
        self._fs, self._root = open_filesystem(location)
        self._files = _Files(self._fs)

    def tenant(self, tenant: str) -> TenantStore:
        """The store scoped to one tenant's namespace.

        Raises:
            raysys.sharing.names.InvalidName: the tenant name could escape its
                namespace (``../x``, ``/abs``, ``a/b``, ...).
        """
        base = f"{self._root}/{check_name(tenant, 'tenant')}"
        self._files.makedirs(base)
        return TenantStore(self._fs, base, tenant, self.keep_last)

    def set_fence(self, tenant: str, workload: str, incarnation: int) -> None:
        """Allow only ``incarnation`` of the workload to commit from now on."""
        wdir = f"{self._root}/{check_name(tenant, 'tenant')}/{check_name(workload, 'workload')}"
        self._files.makedirs(wdir)
        self._files.write(
            f"{wdir}/{FENCE_FILE}", json.dumps({"incarnation": incarnation}).encode()
        )
        self._files.sync_dir(wdir)
