"""A local Databricks workspace emulator: the REST API subset that databricks-sdk and
``dagster_databricks.databricks_pyspark_step_launcher`` use, on 127.0.0.1, with Python tasks run as
local processes on local Spark.

See the package docstring (``fruit_assets/databricks_emulator/__init__.py``) for the API and the list
of endpoints.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import itertools
import json
import logging
import os
import re
import secrets as pysecrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fruit_assets_dev.databricks_emulator import serverless
from fruit_assets_dev.databricks_emulator.dbfs import DbfsPathError, DbfsRoot, from_fuse, is_fuse_path, normalize
from fruit_assets_dev.databricks_emulator.environments import EnvironmentCache, LibraryInstallError, pypi_requirements
from fruit_assets_dev.databricks_emulator.volumes import VolumeError, Volumes, is_files_api, is_volume_path, mount_command

logger = logging.getLogger("fruit_assets_dev.databricks_emulator")

MIB = 1024 * 1024
DEFAULT_READ_LENGTH = 512 * 1024  # the DBFS API's default
MAX_LOG_BYTES = 5 * MIB  # runs/get-output returns the last 5 MB of the logs, as Databricks does
STATE_MESSAGE_CHARS = 4000
USER_NAME = "emulator@localhost"
TERMINAL_STATES = {"TERMINATED", "INTERNAL_ERROR", "SKIPPED"}
TASK_KINDS = (
    "spark_python_task",
    "notebook_task",
    "spark_jar_task",
    "spark_submit_task",
    "python_wheel_task",
    "sql_task",
    "dbt_task",
    "pipeline_task",
    "run_job_task",
    "condition_task",
    "for_each_task",
)
# Python workers must run with the task's interpreter (the emulated runtime's, or in local mode the
# emulator's), whatever a cluster spec says (specs often carry PYSPARK_PYTHON=/databricks/python3/bin/python3).
FORCED_PYTHON_VARS = ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")
REPOSITORY = Path(__file__).resolve().parents[2]  # holds fruit_assets_dev (not installed: beside the package)


def _runtime_for(spark_version: Any, what: str):
    """The supported runtime a cluster's spark_version names, or the API's 400 INVALID_PARAMETER_VALUE with
    the list (Databricks refuses a spark_version it does not know the same way). The table is the
    product's (fruit_assets/databricks/runtimes.py), imported here only: the task runner, which imports
    this package inside an emulated runtime, has no fruit_assets."""
    from fruit_assets.databricks.runtimes import SUPPORTED_RUNTIMES, supported_list

    for runtime in SUPPORTED_RUNTIMES:
        if spark_version == runtime.spark_version:
            return runtime
    raise _invalid(f"Invalid spark version {spark_version!r} ({what}): the Databricks emulator runs only "
                   f"{supported_list()}.")


def running_group_members(pgid: int) -> list[int]:
    """The processes of a process group that still run: not a killed one that waits to be reaped.

    When the runner (the group's leader) dies, its children are reparented to the nearest subreaper or
    init, and a killed child stays a zombie until that process reaps it: a subreaper that reaps only its
    own children at their end (a CI wrapper, a container's init) keeps it for minutes. A zombie runs
    nothing and holds no memory, so it does not count; os.killpg(pgid, 0) would count it."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # gone meanwhile
            if int(stat[2]) == pgid and stat[0] not in ("Z", "X"):  # fields: state, ppid, pgrp
                members.append(int(entry))
    return members


class ApiError(Exception):
    """An error answer in Databricks' shape: ``{"error_code": ..., "message": ...}``."""

    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class RequestRecord:
    """One API request as the emulator saw it. Never holds headers, bodies, tokens or secrets."""

    time: float
    method: str
    path: str
    status: int


@dataclass
class EmulatedRun:
    """A submitted one-time run with its single task. Read it through ``DatabricksEmulator.get_run``."""

    run_id: int
    task_run_id: int
    job_id: int
    run_name: str
    task_key: str
    spark_python_task: dict
    cluster_id: str
    new_cluster: dict | None
    existing_cluster_id: str | None
    libraries: list
    timeout_seconds: int
    submit_body: dict
    run_dir: Path
    submit_time: int = field(default_factory=_now_ms)
    life_cycle_state: str = "PENDING"
    result_state: str | None = None
    state_message: str = "Waiting for cluster"
    termination_code: str | None = None
    termination_type: str | None = None
    start_time: int | None = None  # the task started (Spark up, script about to run)
    end_time: int | None = None
    pid: int | None = None
    returncode: int | None = None
    cancel_requested: bool = False
    timed_out: bool = False
    would_install: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    idempotency_token: str | None = None
    runtime: Any = None  # the databricks_runtimes.Runtime its cluster runs (None: an unchecked existing cluster)
    environment: Any = None  # environments.Environment it ran in (None: local mode)
    serverless: bool = False  # a task with an environment_key: Spark Connect only (serverless.py)

    @property
    def runtime_path(self) -> Path:
        return self.run_dir / "runtime.json"

    @property
    def terminated(self) -> bool:
        return self.life_cycle_state in TERMINAL_STATES

    @property
    def stdout_path(self) -> Path:
        return self.run_dir / "stdout"

    @property
    def stderr_path(self) -> Path:
        return self.run_dir / "stderr"

    @property
    def error_path(self) -> Path:
        return self.run_dir / "error.txt"

    @property
    def ready_path(self) -> Path:
        return self.run_dir / "ready"


@dataclass
class _Upload:
    dbfs_path: str
    tmp: Path
    overwrite: bool


def _tail(path: Path, max_bytes: int) -> tuple[str, bool]:
    """The last max_bytes of a file as text, and whether it was cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "", False
    with open(path, "rb") as handle:
        if size > max_bytes:
            handle.seek(size - max_bytes)
        data = handle.read()
    return data.decode("utf-8", errors="replace"), size > max_bytes


def _last_lines(text: str, lines: int, chars: int) -> str:
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


_ENV_REF = re.compile(r"\$(\w+)|\$\{(\w+)\}")


def _expand(value: str, env: dict[str, str]) -> str:
    """``$VAR`` / ``${VAR}`` in a spark_env_vars value, as the cluster's shell export would expand them."""
    return _ENV_REF.sub(lambda m: env.get(m.group(1) or m.group(2), ""), value)


class DatabricksEmulator:
    """A local Databricks workspace: DBFS in a folder, Jobs runs as local Spark processes.

    Start it with ``with DatabricksEmulator(root=...) as emu:`` (or ``start()`` / ``stop()``); then
    ``emu.url`` and ``emu.token`` are the host and personal access token for databricks-sdk or the
    Dagster step launcher.

    Args:
        root: folder for the emulator's state: ``dbfs/`` (DBFS), ``runs/<run_id>/`` (driver logs),
            ``uploads/`` (DBFS streaming handles).
        token: the only accepted bearer token; a random one when None.
        secrets: ``{scope: {key: value}}``, served to tasks through ``dbutils.secrets`` only.
        host, port: where to listen; port 0 picks a free port.
        spark_master: the Spark master of every task (a cluster spec's ``spark.master`` is ignored).
        env: extra environment variables for every task (on top of this process's environment).
        clusters: existing all-purpose clusters, ``{cluster_id: spec}`` (``spark_conf``, ``spark_env_vars``,
            ``cluster_log_conf``...). Any other ``existing_cluster_id`` is accepted and recorded as a
            cluster with an empty spec.
        python: interpreter of the task processes in local mode (default: this one).
        environments: where to build and keep the emulated runtimes' Python environments (see
            ``environments.py``): each task then runs in the Python of the runtime its cluster's
            ``spark_version`` names, with the run's ``pypi`` libraries installed over the runtime's
            packages. None (the default): local mode, every task runs ``python`` with its libraries
            only logged ("would install"), for tests of the REST API and quick dry runs.
        dbfs_root: False emulates a workspace without DBFS root (new accounts are provisioned so, and
            workspaces may disable it): every DBFS API call answers 403 PERMISSION_DENIED "Public DBFS
            root is disabled. Access is denied on path: ...", as users report such workspaces answer
            (see ``fruit_assets/databricks/workspace.py`` for the sources).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        token: str | None = None,
        secrets: dict[str, dict[str, str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        spark_master: str = "local[2]",
        env: dict[str, str] | None = None,
        clusters: dict[str, dict] | None = None,
        python: str = sys.executable,
        kill_grace_seconds: float = 5.0,
        dbfs_root: bool = True,
        environments: str | os.PathLike | None = None,
    ):
        self.root = Path(root).resolve()
        self.token = token or pysecrets.token_urlsafe(24)
        self._secrets = {scope: dict(keys) for scope, keys in (secrets or {}).items()}
        self._bind = (host, port)
        self.spark_master = spark_master
        self.env = dict(env or {})
        self.python = python
        self.kill_grace_seconds = kill_grace_seconds
        self.dbfs_root = dbfs_root
        self.environments = EnvironmentCache(environments) if environments is not None else None
        self.dbfs = DbfsRoot(self.root / "dbfs")
        self.volumes = Volumes(self.root / "volumes")
        self._connect_servers = serverless.ConnectServers(self.root / "serverless")
        self._lock = threading.RLock()
        self._state_changed = threading.Condition(self._lock)
        self._runs: dict[int, EmulatedRun] = {}
        self._task_runs: dict[int, int] = {}  # task run id -> run id
        self._ids = itertools.count(1001)
        self._job_ids = itertools.count(501)
        self._handles = itertools.count(1)
        self._uploads: dict[int, _Upload] = {}
        self._clusters: dict[str, dict] = {cid: dict(spec) for cid, spec in (clusters or {}).items()}
        self._cluster_libraries: dict[str, list] = {}
        self._permissions: dict[tuple[str, str], list[dict]] = {}
        self._request_log: list[RequestRecord] = []
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self._connections: set = set()  # open client sockets (keep-alive), closed by stop()
        self._serve_thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> DatabricksEmulator:
        if self._server is not None:
            return self
        for sub in ("dbfs", "runs", "uploads", "volumes"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        handler = type("BoundHandler", (_Handler,), {"emulator": self})
        self._server = ThreadingHTTPServer(self._bind, handler)
        self._server.daemon_threads = True
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="databricks-emulator", daemon=True
        )
        self._serve_thread.start()
        logger.info("Databricks emulator listening on %s (root %s)", self.url, self.root)
        return self

    def stop(self) -> None:
        """Cancel the runs still going (their process groups are killed), then stop serving."""
        with self._lock:
            active = [run for run in self._runs.values() if not run.terminated]
            for run in active:
                run.cancel_requested = True
            self._state_changed.notify_all()
        for thread in list(self._threads):
            thread.join(timeout=self.kill_grace_seconds + 10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                connections, self._connections = list(self._connections), set()
            for connection in connections:  # end keep-alive connections, and the threads serving them
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._server = None
        self._connect_servers.stop()

    def __enter__(self) -> DatabricksEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the emulator is not running: call start() first")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self._bind[0]}:{self.port}"

    # ---------------------------------------------------------------- inspection (tests, CLI)

    @property
    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._request_log)

    def requests_to(self, path_pattern: str, method: str | None = None) -> list[RequestRecord]:
        """Logged requests whose path matches the regular expression (``re.search``)."""
        return [
            r for r in self.request_log if re.search(path_pattern, r.path) and (method is None or r.method == method)
        ]

    @property
    def runs(self) -> list[EmulatedRun]:
        with self._lock:
            return list(self._runs.values())

    def get_run(self, run_id: int) -> EmulatedRun:
        with self._lock:
            return self._lookup_run(run_id)

    def wait_for_run(self, run_id: int, timeout: float = 300.0) -> EmulatedRun:
        """Block until the run is terminal; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._state_changed:
            run = self._lookup_run(run_id)
            while not run.terminated:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"run {run_id} still {run.life_cycle_state} after {timeout} s")
                self._state_changed.wait(min(remaining, 1.0))
            return run

    def local_path(self, dbfs_path: str) -> Path:
        """Local file of a DBFS path (``dbfs:/x``, ``/x``) or of a driver path (``/dbfs/x``)."""
        return self.dbfs.local_for_fuse(dbfs_path) if is_fuse_path(dbfs_path) else self.dbfs.local(dbfs_path)

    def workspace_client(self):
        """A databricks-sdk WorkspaceClient for this emulator."""
        from databricks.sdk import WorkspaceClient

        return WorkspaceClient(host=self.url, token=self.token, auth_type="pat")

    def redact(self, text: str) -> str:
        """Replace secret values (4 characters or more) by ``[REDACTED]``, as Databricks does in run output."""
        values = sorted(
            {v for keys in self._secrets.values() for v in keys.values() if isinstance(v, str) and len(v) >= 4},
            key=len,
            reverse=True,
        )
        for value in values:
            text = text.replace(value, "[REDACTED]")
        return text

    # ---------------------------------------------------------------- HTTP plumbing

    def _authorized(self, header: str | None) -> None:
        if not header:
            raise ApiError(401, "UNAUTHENTICATED", "Credential was not sent or was of an unsupported type for this API.")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise ApiError(401, "UNAUTHENTICATED", "Credential was not sent or was of an unsupported type for this API.")
        if not hmac.compare_digest(credential.strip().encode(), self.token.encode()):
            raise ApiError(403, "PERMISSION_DENIED", "Invalid access token.")

    def _refuse_without_dbfs_root(self, path: str, raw: bytes, query: dict) -> None:
        """In ``dbfs_root=False`` mode, the DBFS API refuses every call, naming the path it was given."""
        if self.dbfs_root or not path.startswith("/api/2.0/dbfs/"):
            return
        try:
            body = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            body = {}
        target = (body if isinstance(body, dict) else {}).get("path") or query.get("path") or ""
        if not target and isinstance(body, dict):
            target = body.get("source_path") or ""
        raise ApiError(403, "PERMISSION_DENIED", f"Public DBFS root is disabled. Access is denied on path: {target}")

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._request_log.append(RequestRecord(time.time(), method, path, status))

    def _route(self, method: str, path: str):
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if match and route_method == method:
                return getattr(self, name), match.groups()
        if any(pattern.fullmatch(path) for _, pattern, _ in _ROUTES):
            raise ApiError(405, "ENDPOINT_NOT_FOUND", f"The Databricks emulator does not allow {method} {path}")
        raise ApiError(
            404, "ENDPOINT_NOT_FOUND", f"No API found for '{method} {path}' (not implemented by the Databricks emulator)"
        )

    # ---------------------------------------------------------------- identity, index

    def api_me(self, body, query):
        return {
            "id": "1",
            "userName": USER_NAME,
            "displayName": "Databricks emulator",
            "active": True,
            "emails": [{"value": USER_NAME, "primary": True, "type": "work"}],
            "groups": [{"display": "admins", "value": "1"}],
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        }

    def api_index(self, body, query):
        with self._lock:
            runs = [self._run_summary(run) for run in self._runs.values()]
        return {"emulator": "databricks", "url": self.url, "runs": runs}

    def api_run_page(self, body, query, run_id):
        with self._lock:
            run = self._lookup_run(int(run_id))
            out = self._run_json(run)
        out["stdout_tail"] = self.redact(_tail(run.stdout_path, 64 * 1024)[0])
        out["stderr_tail"] = self.redact(_tail(run.stderr_path, 64 * 1024)[0])
        out["would_install"] = list(run.would_install)
        return out

    # ---------------------------------------------------------------- DBFS

    def _dbfs_local(self, path: Any) -> tuple[str, Path]:
        if not isinstance(path, str) or not path:
            raise _invalid("Path is required")
        try:
            canonical = normalize(path)
        except DbfsPathError as e:
            raise _invalid(str(e)) from None
        return canonical, self.dbfs.local(canonical)

    def _check_parents_are_dirs(self, canonical: str, local: Path) -> None:
        for parent in local.parents:
            if parent == self.dbfs.folder.parent:
                break
            if parent.exists() and not parent.is_dir():
                raise ApiError(
                    409,
                    "RESOURCE_ALREADY_EXISTS",
                    f"A file exists at {self.dbfs.dbfs_path(parent)}, where a directory is needed for {canonical}.",
                )

    def _file_info(self, local: Path) -> dict:
        stat = local.stat()
        return {
            "path": self.dbfs.dbfs_path(local),
            "is_dir": local.is_dir(),
            "file_size": 0 if local.is_dir() else stat.st_size,
            "modification_time": int(stat.st_mtime * 1000),
        }

    @staticmethod
    def _decode_block(data: Any) -> bytes:
        if data is None:
            return b""
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise _invalid("data is not valid base64") from None
        if len(raw) > MIB:
            raise ApiError(400, "MAX_BLOCK_SIZE_EXCEEDED", f"A block may hold at most 1 MB; this one has {len(raw)} bytes.")
        return raw

    def api_dbfs_create(self, body, query):
        canonical, local = self._dbfs_local(body.get("path"))
        overwrite = bool(body.get("overwrite", False))
        self._check_parents_are_dirs(canonical, local)
        if local.is_dir() or (local.exists() and not overwrite):
            raise ApiError(
                409, "RESOURCE_ALREADY_EXISTS", f"A file or directory already exists at the input path {canonical}."
            )
        with self._lock:
            handle = next(self._handles)
            tmp = self.root / "uploads" / f"{handle}.part"
            tmp.write_bytes(b"")
            self._uploads[handle] = _Upload(canonical, tmp, overwrite)
        return {"handle": handle}

    def _upload(self, body) -> tuple[int, _Upload]:
        handle = body.get("handle")
        with self._lock:
            upload = self._uploads.get(handle) if isinstance(handle, int) else None
        if upload is None:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"The handle {handle} does not exist (or is closed).")
        return handle, upload

    def api_dbfs_add_block(self, body, query):
        _, upload = self._upload(body)
        raw = self._decode_block(body.get("data"))
        with open(upload.tmp, "ab") as handle:
            handle.write(raw)
        return {}

    def api_dbfs_close(self, body, query):
        handle, upload = self._upload(body)
        with self._lock:
            self._uploads.pop(handle, None)
        local = self.dbfs.local(upload.dbfs_path)
        self._check_parents_are_dirs(upload.dbfs_path, local)
        if local.is_dir() or (local.exists() and not upload.overwrite):
            upload.tmp.unlink(missing_ok=True)
            raise ApiError(
                409, "RESOURCE_ALREADY_EXISTS", f"A file or directory already exists at the input path {upload.dbfs_path}."
            )
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(upload.tmp, local)
        return {}

    def api_dbfs_put(self, body, query):
        canonical, local = self._dbfs_local(body.get("path"))
        raw = self._decode_block(body.get("contents"))
        overwrite = bool(body.get("overwrite", False))
        self._check_parents_are_dirs(canonical, local)
        if local.is_dir() or (local.exists() and not overwrite):
            raise ApiError(
                409, "RESOURCE_ALREADY_EXISTS", f"A file or directory already exists at the input path {canonical}."
            )
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "uploads" / f"put-{next(self._handles)}.part"
        tmp.write_bytes(raw)
        os.replace(tmp, local)
        return {}

    def _existing(self, path: Any) -> tuple[str, Path]:
        canonical, local = self._dbfs_local(path)
        if not local.exists():
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"No file or directory exists on path {canonical}.")
        return canonical, local

    @staticmethod
    def _int_arg(query: dict, name: str, default: int) -> int:
        value = query.get(name, default)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _invalid(f"{name} must be an integer, got {value!r}") from None

    def api_dbfs_read(self, body, query):
        canonical, local = self._existing(query.get("path"))
        if local.is_dir():
            raise _invalid(f"Cannot read {canonical}: it is a directory.")
        offset = self._int_arg(query, "offset", 0)
        length = self._int_arg(query, "length", DEFAULT_READ_LENGTH)
        if offset < 0 or length < 0:
            raise _invalid("offset and length must not be negative")
        if length > MIB:
            raise ApiError(400, "MAX_READ_SIZE_EXCEEDED", f"Cannot read more than 1 MB at once; asked for {length} bytes.")
        with open(local, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        return {"bytes_read": len(data), "data": base64.b64encode(data).decode()}

    def api_dbfs_get_status(self, body, query):
        _, local = self._existing(query.get("path"))
        return self._file_info(local)

    def api_dbfs_list(self, body, query):
        _, local = self._existing(query.get("path"))
        if local.is_dir():
            return {"files": [self._file_info(child) for child in sorted(local.iterdir())]}
        return {"files": [self._file_info(local)]}

    def api_dbfs_mkdirs(self, body, query):
        canonical, local = self._dbfs_local(body.get("path"))
        self._check_parents_are_dirs(canonical, local)
        if local.exists() and not local.is_dir():
            raise ApiError(409, "RESOURCE_ALREADY_EXISTS", f"A file exists at {canonical}.")
        local.mkdir(parents=True, exist_ok=True)
        return {}

    def api_dbfs_delete(self, body, query):
        canonical, local = self._dbfs_local(body.get("path"))
        if canonical == "/":
            raise _invalid("The DBFS root cannot be deleted.")
        if not local.exists():
            return {}
        if local.is_dir():
            if any(local.iterdir()) and not body.get("recursive", False):
                raise ApiError(400, "IO_ERROR", f"{canonical} is a non-empty directory; set recursive to delete it.")
            shutil.rmtree(local)
        else:
            local.unlink()
        return {}

    def api_dbfs_move(self, body, query):
        source, src = self._existing(body.get("source_path"))
        destination, dst = self._dbfs_local(body.get("destination_path"))
        if dst.exists():
            raise ApiError(409, "RESOURCE_ALREADY_EXISTS", f"A file or directory already exists at {destination}.")
        if source == "/":
            raise _invalid("The DBFS root cannot be moved.")
        self._check_parents_are_dirs(destination, dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return {}

    # ---------------------------------------------------------------- Jobs: runs

    def _lookup_run(self, run_id: Any) -> EmulatedRun:
        try:
            run_id = int(run_id)
        except (TypeError, ValueError):
            raise _invalid(f"run_id must be an integer, got {run_id!r}") from None
        run_id = self._task_runs.get(run_id, run_id)
        run = self._runs.get(run_id)
        if run is None:
            raise _invalid(f"Run {run_id} does not exist.")
        return run

    def _translate_uri(self, value: str, what: str) -> str:
        """A task's path argument -> what the local driver opens: ``/dbfs/x`` -> the local file of DBFS
        ``/x``; ``dbfs:/x`` -> ``file:///<that file>`` (still a URI, for Spark and dbutils)."""
        try:
            if value.startswith("dbfs:"):
                return self.dbfs.local(value).as_uri()
            if is_fuse_path(value):
                return str(self.dbfs.local(from_fuse(value)))
        except DbfsPathError as e:
            raise _invalid(f"{what}: {e}") from None
        return value

    def api_runs_submit(self, body, query):
        tasks = body.get("tasks")
        legacy = tasks is None
        if legacy:  # Jobs API 2.0 single-task form: the task fields at the top level
            task_fields = (*TASK_KINDS, "new_cluster", "existing_cluster_id", "libraries")
            tasks = [{k: v for k, v in body.items() if k in task_fields}]
        if not isinstance(tasks, list) or len(tasks) != 1:
            raise _invalid("The Databricks emulator runs exactly one task per submitted run.")
        task = tasks[0]
        kinds = [kind for kind in TASK_KINDS if task.get(kind) is not None]
        if kinds != ["spark_python_task"]:
            raise _invalid(
                f"The Databricks emulator runs spark_python_task only; this task has {kinds or 'no task'}."
            )
        spt = task["spark_python_task"]
        python_file = spt.get("python_file")
        if not isinstance(python_file, str) or not (python_file.startswith("dbfs:") or is_volume_path(python_file)):
            raise _invalid(
                f"spark_python_task.python_file must be a dbfs:/ or /Volumes/ path in the Databricks emulator, got {python_file!r}."
            )
        if spt.get("source") not in (None, "WORKSPACE"):
            raise _invalid("spark_python_task.source GIT is not supported by the Databricks emulator.")
        parameters = spt.get("parameters") or []
        if not isinstance(parameters, list) or not all(isinstance(p, str) for p in parameters):
            raise _invalid("spark_python_task.parameters must be a list of strings.")
        new_cluster = task.get("new_cluster")
        existing = task.get("existing_cluster_id")
        is_serverless = serverless.is_serverless(task)
        if (new_cluster is not None) + (existing is not None) + is_serverless != 1:
            raise _invalid(
                "The Databricks emulator needs exactly one of new_cluster, existing_cluster_id or environment_key "
                "(serverless) (job clusters are not emulated)."
            )
        libraries = task.get("libraries") or []
        if is_serverless:
            if libraries:
                # https://docs.databricks.com/aws/en/compute/serverless/dependencies: environments, not libraries
                raise _invalid("Libraries field is not supported for serverless task, please specify libraries in environment.")
            try:
                spec = serverless.environment_of(body, task)
                runtime = _runtime_for(serverless.spark_version_of(spec), "environments[].spec.environment_version")
                libraries = serverless.libraries_of(spec)
            except serverless.ServerlessError as e:
                raise _invalid(str(e)) from None
        elif new_cluster is not None:
            runtime = _runtime_for(new_cluster.get("spark_version"), "new_cluster.spark_version")
        else:
            with self._lock:
                known = self._clusters.get(existing, {}).get("spark_version")
            runtime = _runtime_for(known, f"cluster {existing}") if known or self.environments else None
        timeout = body.get("timeout_seconds") or task.get("timeout_seconds") or 0
        token = body.get("idempotency_token")
        try:
            local_file = self.volumes.local(python_file) if is_volume_path(python_file) else self.dbfs.local(python_file)
        except VolumeError as e:
            raise _invalid(e.message) from None
        translated = [self._translate_uri(p, "spark_python_task.parameters") for p in parameters]

        with self._lock:
            if token:
                for run in self._runs.values():
                    if run.idempotency_token == token:
                        return {"run_id": run.run_id, "number_in_job": run.run_id}
            run_id = next(self._ids)
            task_run_id = next(self._ids)
            cluster_id = existing or time.strftime("%m%d-%H%M%S-", time.gmtime()) + ("serverless" if is_serverless else f"emu{run_id}")
            if existing and existing not in self._clusters:
                self._clusters[existing] = {}
            run = EmulatedRun(
                run_id=run_id,
                task_run_id=task_run_id,
                job_id=next(self._job_ids),
                run_name=body.get("run_name") or "Untitled",
                task_key=task.get("task_key") or "task",
                spark_python_task=dict(spt),
                cluster_id=cluster_id,
                new_cluster=dict(new_cluster) if new_cluster is not None else None,
                existing_cluster_id=existing,
                libraries=list(libraries),
                timeout_seconds=int(timeout),
                submit_body=body,
                run_dir=self.root / "runs" / str(run_id),
                idempotency_token=token,
                runtime=runtime,
                serverless=is_serverless,
            )
            run.would_install = [json.dumps(lib, sort_keys=True) for lib in libraries]
            if legacy:
                run.notes.append("task submitted through the Jobs API 2.0 single-task form")
            self._runs[run_id] = run
            self._task_runs[task_run_id] = run_id
            if body.get("access_control_list"):
                self._permissions[("jobs", str(run.job_id))] = list(body["access_control_list"])
            thread = threading.Thread(
                target=self._execute, args=(run, local_file, translated), name=f"emulated-run-{run_id}", daemon=True
            )
            self._threads.append(thread)
        logger.info(
            "run %s submitted: %s %s on %s", run_id, python_file, parameters, existing or f"new cluster {cluster_id}"
        )
        thread.start()
        return {"run_id": run_id, "number_in_job": run_id}

    def api_runs_get(self, body, query):
        with self._lock:
            run = self._lookup_run(query.get("run_id"))
            if int(query["run_id"]) == run.task_run_id:
                return self._task_as_run_json(run)
            return self._run_json(run)

    def api_runs_get_output(self, body, query):
        with self._lock:
            run = self._lookup_run(query.get("run_id"))
            if int(query["run_id"]) != run.task_run_id:
                raise _invalid(
                    "Retrieving the output of runs with multiple tasks is not supported. "
                    "Please retrieve the output of each individual task run instead."
                )
            metadata = self._task_as_run_json(run)
        logs, truncated = _tail(run.stdout_path, MAX_LOG_BYTES)
        out: dict[str, Any] = {"metadata": metadata, "logs": self.redact(logs), "logs_truncated": truncated}
        if run.terminated and run.result_state not in ("SUCCESS", None):
            trace = self._error_trace(run)
            if trace:
                out["error_trace"] = trace
                out["error"] = trace.strip().splitlines()[-1]
            elif run.state_message:
                out["error"] = run.state_message
        return out

    def api_runs_cancel(self, body, query):
        with self._lock:
            run = self._lookup_run(body.get("run_id"))
            if not run.terminated and not run.cancel_requested:
                run.cancel_requested = True
                logger.info("run %s: cancel requested", run.run_id)
                self._state_changed.notify_all()
        return {}

    def api_runs_list(self, body, query):
        with self._lock:
            runs = sorted(self._runs.values(), key=lambda r: r.run_id, reverse=True)
            if str(query.get("active_only", "")).lower() == "true":
                runs = [r for r in runs if not r.terminated]
            if str(query.get("completed_only", "")).lower() == "true":
                runs = [r for r in runs if r.terminated]
            offset = self._int_arg(query, "offset", 0)
            limit = self._int_arg(query, "limit", 25) or 25
            page = runs[offset : offset + limit]
            return {"runs": [self._run_json(r) for r in page], "has_more": offset + limit < len(runs)}

    # ---------------------------------------------------------------- run JSON

    def _state_json(self, run: EmulatedRun) -> dict:
        state = {
            "life_cycle_state": run.life_cycle_state,
            "state_message": run.state_message,
            "user_cancelled_or_timedout": run.cancel_requested or run.timed_out,
        }
        if run.result_state:
            state["result_state"] = run.result_state
        return state

    def _status_json(self, run: EmulatedRun) -> dict:
        v2 = {"INTERNAL_ERROR": "TERMINATED", "SKIPPED": "TERMINATED"}.get(run.life_cycle_state, run.life_cycle_state)
        status: dict[str, Any] = {"state": v2}
        if run.terminated:
            status["termination_details"] = {
                "code": run.termination_code,
                "type": run.termination_type,
                "message": run.state_message,
            }
        return status

    def _timing_json(self, run: EmulatedRun) -> dict:
        out: dict[str, Any] = {"start_time": run.submit_time}
        setup_end = run.start_time or run.end_time
        if setup_end:
            out["setup_duration"] = setup_end - run.submit_time
        if run.end_time:
            out["end_time"] = run.end_time
            out["execution_duration"] = run.end_time - run.start_time if run.start_time else 0
            out["cleanup_duration"] = 0
            out["run_duration"] = run.end_time - run.submit_time
        return out

    def _run_page_url(self, run: EmulatedRun, run_id: int) -> str:
        return f"{self.url}/emulator/runs/{run.run_id}#job/{run.job_id}/run/{run_id}"

    def _cluster_spec_json(self, run: EmulatedRun) -> dict:
        if run.new_cluster is not None:
            return {"new_cluster": run.new_cluster}
        if run.serverless:
            return {"environment_key": run.submit_body["tasks"][0]["environment_key"]}
        return {"existing_cluster_id": run.existing_cluster_id}

    def _task_json(self, run: EmulatedRun) -> dict:
        return {
            "run_id": run.task_run_id,
            "task_key": run.task_key,
            "spark_python_task": run.spark_python_task,
            **self._cluster_spec_json(run),
            "libraries": run.libraries,
            "state": self._state_json(run),
            "status": self._status_json(run),
            "cluster_instance": {"cluster_id": run.cluster_id, "spark_context_id": str(run.run_id)},
            "attempt_number": 0,
            "run_page_url": self._run_page_url(run, run.task_run_id),
            **({"timeout_seconds": run.timeout_seconds} if run.timeout_seconds else {}),
            **self._timing_json(run),
        }

    def _run_json(self, run: EmulatedRun) -> dict:
        return {
            "job_id": run.job_id,
            "run_id": run.run_id,
            "number_in_job": run.run_id,
            "original_attempt_run_id": run.run_id,
            "creator_user_name": USER_NAME,
            "run_name": run.run_name,
            "run_type": "SUBMIT_RUN",
            "trigger": "ONE_TIME",
            "format": "MULTI_TASK",
            "attempt_number": 0,
            "state": self._state_json(run),
            "status": self._status_json(run),
            "tasks": [self._task_json(run)],
            "run_page_url": self._run_page_url(run, run.run_id),
            **self._timing_json(run),
        }

    def _task_as_run_json(self, run: EmulatedRun) -> dict:
        task = self._task_json(run)
        task.update(job_id=run.job_id, parent_run_id=run.run_id, run_type="SUBMIT_RUN", run_name=run.run_name)
        return task

    def _run_summary(self, run: EmulatedRun) -> dict:
        return {
            "run_id": run.run_id,
            "task_run_id": run.task_run_id,
            "run_name": run.run_name,
            "life_cycle_state": run.life_cycle_state,
            "result_state": run.result_state,
            "python_file": run.spark_python_task.get("python_file"),
            "cluster_id": run.cluster_id,
            "run_page": f"{self.url}/emulator/runs/{run.run_id}",
        }

    def _error_trace(self, run: EmulatedRun) -> str:
        if run.error_path.exists():
            return self.redact(run.error_path.read_text(errors="replace"))
        if run.result_state in ("FAILED",) and run.returncode not in (0, None):
            return self.redact(_last_lines(_tail(run.stderr_path, 64 * 1024)[0], 30, STATE_MESSAGE_CHARS))
        return ""

    # ---------------------------------------------------------------- running a task

    def _cluster_spec(self, run: EmulatedRun) -> dict:
        if run.new_cluster is not None:
            return run.new_cluster
        return self._clusters.get(run.existing_cluster_id, {})

    def _task_python(self, run: EmulatedRun) -> str:
        return str(run.environment.python) if run.environment is not None else self.python

    def _task_env(self, run: EmulatedRun, cluster: dict) -> dict[str, str]:
        python = self._task_python(run)
        env = dict(os.environ)
        if run.environment is not None:
            # The runtime's Python only: nothing of the emulator's environment may leak into it (a
            # PYTHONPATH holding this checkout would hand the task the package the launcher ships).
            for name in ("PYTHONPATH", "VIRTUAL_ENV", "SPARK_HOME", "PYTHONHOME", "CONDA_PREFIX"):
                env.pop(name, None)
            env["VIRTUAL_ENV"] = str(run.environment.folder)
            # Its Python caches the bytecode of what it imports there (the environment is built without
            # it, see environments.py): with PYTHONDONTWRITEBYTECODE set, as on these machines, every task
            # and Spark Python worker would compile dagster, pandas, pyarrow... from source at each start.
            # Python writes each file atomically, so parallel tasks can share the environment.
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PATH"] = os.pathsep.join([str(run.environment.folder / "bin"), env.get("PATH", "")])
        env.update(self.env)
        for key, value in (cluster.get("spark_env_vars") or {}).items():
            value = _expand(str(value), env)
            if key in FORCED_PYTHON_VARS and value != python:
                run.notes.append(f"spark_env_vars {key}={value} ignored: Python workers run {python}")
                continue
            env[key] = value
        env.update({var: python for var in FORCED_PYTHON_VARS})
        # Databricks sets the runtime's major.minor in every cluster process ("17.3" for 17.3.x-scala2.13).
        if run.runtime is not None:
            env["DATABRICKS_RUNTIME_VERSION"] = run.runtime.version
        else:
            env.pop("DATABRICKS_RUNTIME_VERSION", None)
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
        env["PYTHONUNBUFFERED"] = "1"
        env["DATABRICKS_EMULATOR_URL"] = self.url
        # The task runner is part of fruit_assets_dev, which is not installed: it lives beside the package.
        if run.environment is not None and self.environments is not None:
            # Only what the emulator was given (`env`, e.g. a test's import guard) and the runner's package.
            given = self.env.get("PYTHONPATH")
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [given, str(self.environments.emulator_path(REPOSITORY))]))
        else:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
        return env

    def _install_libraries(self, run: EmulatedRun, cluster: dict) -> bool:
        """Build (or find) the run's environment: its runtime's Python and packages, then its pypi libraries.
        False when that failed: the run has then ended, as a cluster whose libraries fail to install ends it."""
        assert self.environments is not None and run.runtime is not None
        requirements, notes = pypi_requirements(run.libraries)
        if run.serverless:
            requirements = tuple(sorted({*requirements, serverless.connect_requirement(run.runtime.spark)}))
        run.notes.extend(notes)
        self._set_state(run, state_message=f"Installing libraries on the emulated {run.runtime.name} runtime")
        build_log = run.run_dir / "library_install.log"

        def log(message: str) -> None:
            with open(build_log, "a") as handle:
                handle.write(message + "\n")

        try:
            environment = self.environments.environment(run.runtime, requirements, log=log)
        except LibraryInstallError as e:
            detail = self.redact(str(e))
            log(detail)
            self._set_state(
                run, life_cycle_state="INTERNAL_ERROR", result_state="FAILED",
                state_message=f"Library installation failed for the run's libraries on {run.runtime.name}: {detail}"[:STATE_MESSAGE_CHARS],
                termination_code="LIBRARY_INSTALLATION_ERROR", termination_type="CLIENT_ERROR", end_time=_now_ms(),
            )
            return False
        run.environment = environment
        where = f"built in {environment.build_seconds:.0f} s" if environment.build_seconds is not None else "cached"
        run.notes.append(f"emulated {run.runtime.name} runtime ({where}): {environment.folder}")
        if environment.conflicts:
            run.notes.append(f"the libraries left dependency conflicts (as pip would warn): {environment.conflicts}")
        return True

    def _serverless_compute(self, run: EmulatedRun, env: dict[str, str]) -> str:
        """The URL of the Spark Connect server of the run's environment (serverless.py), started now if
        this is its first task."""
        self._set_state(run, state_message="Waiting for serverless compute")
        python = self._task_python(run)
        key = str(run.environment.folder) if run.environment is not None else python
        return self._connect_servers.url(key, python, env=env, spark_master=self.spark_master,
                                         wrap=lambda command: mount_command(self.volumes.folder, command) or command)

    def _set_state(self, run: EmulatedRun, **changes) -> None:
        with self._state_changed:
            for key, value in changes.items():
                setattr(run, key, value)
            self._state_changed.notify_all()

    def _execute(self, run: EmulatedRun, local_file: Path, parameters: list[str]) -> None:
        try:
            self._execute_inner(run, local_file, parameters)
        except Exception as e:
            logger.exception("run %s: the emulator failed", run.run_id)
            self._set_state(
                run,
                life_cycle_state="INTERNAL_ERROR",
                result_state="FAILED",
                state_message=f"Databricks emulator error: {type(e).__name__}: {e}",
                termination_code="INTERNAL_ERROR",
                termination_type="INTERNAL_ERROR",
                end_time=_now_ms(),
            )

    def _execute_inner(self, run: EmulatedRun, local_file: Path, parameters: list[str]) -> None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "driver").mkdir(exist_ok=True)
        with self._lock:
            cluster = dict(self._cluster_spec(run))
        installing = self.environments is not None and run.runtime is not None and not run.cancel_requested
        if installing and not self._install_libraries(run, cluster):
            return
        with self._lock:
            env = self._task_env(run, cluster)
            if run.cancel_requested:
                self._finish(run, cluster, returncode=None, stopped=True)
                return
        if cluster.get("spark_conf", {}).get("spark.master"):
            run.notes.append(f"spark_conf spark.master={cluster['spark_conf']['spark.master']} ignored: "
                             f"the emulator runs {self.spark_master}")
        connect_url = self._serverless_compute(run, env) if run.serverless else None
        spec = {
            "parent_pid": os.getpid(),
            "python_file": str(local_file),
            "python_file_uri": run.spark_python_task["python_file"],
            "parameters": parameters,
            "dbfs_root": str(self.dbfs.folder),
            "spark_master": self.spark_master,
            "spark_conf": {k: v for k, v in (cluster.get("spark_conf") or {}).items() if k != "spark.master"},
            "app_name": f"databricks-emulator-run-{run.run_id}",
            "libraries": run.libraries,
            "notes": run.notes,
            "ready_file": str(run.ready_path),
            "error_file": str(run.error_path),
            "runtime_file": str(run.runtime_path),
            "runtime": run.runtime.name if run.runtime is not None else None,
            "installed": run.environment is not None,
            "serverless": run.serverless,
            "connect_url": connect_url,
            "secrets": self._secrets,
        }
        command = [self._task_python(run), "-m", "fruit_assets_dev.databricks_emulator.runner"]
        mounted = mount_command(self.volumes.folder, command)
        if mounted is None:
            run.notes.append("no /Volumes in this task: mounting the emulator's volumes needs root and unshare")
        with open(run.stdout_path, "wb") as out, open(run.stderr_path, "wb") as err:
            process = subprocess.Popen(
                mounted or command,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=run.run_dir / "driver",
                env=env,
                start_new_session=True,
            )
        self._set_state(run, pid=process.pid, state_message="Starting the task (local Spark driver)")
        try:
            process.stdin.write(json.dumps(spec).encode())
            process.stdin.close()
        except BrokenPipeError:
            pass
        del spec

        deadline = time.monotonic() + run.timeout_seconds if run.timeout_seconds else None
        killed_at = None
        while True:
            returncode = process.poll()
            if run.life_cycle_state == "PENDING" and run.ready_path.exists():
                self._set_state(run, life_cycle_state="RUNNING", state_message="In run", start_time=_now_ms())
            if returncode is not None:
                break
            if deadline is not None and time.monotonic() > deadline and not run.timed_out:
                self._set_state(run, timed_out=True)
            if (run.cancel_requested or run.timed_out) and killed_at is None:
                self._set_state(run, life_cycle_state="TERMINATING", state_message="Cancelling the run")
                self._signal_group(process.pid, signal.SIGTERM)
                killed_at = time.monotonic()
            elif killed_at is not None and time.monotonic() - killed_at > self.kill_grace_seconds:
                self._signal_group(process.pid, signal.SIGKILL)
            with self._state_changed:
                self._state_changed.wait(0.1)
        # Anything the task left behind in its process group (the Spark JVM, Python workers) goes too,
        # before the run is reported terminal.
        self._signal_group(process.pid, signal.SIGKILL)
        if not self._wait_group_gone(process.pid, timeout=10.0):
            logger.warning("run %s: processes of group %s still present 10 s after SIGKILL", run.run_id, process.pid)
        self._finish(run, cluster, returncode=returncode, stopped=killed_at is not None)

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not running_group_members(pgid):
                return True
            time.sleep(0.05)
        return False

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def _finish(self, run: EmulatedRun, cluster: dict, returncode: int | None, stopped: bool) -> None:
        """The final state. ``stopped``: the emulator ended the task (cancel, timeout); a task that ended by
        itself just before a cancel keeps its own outcome, as a cancel of a finished run does nothing."""
        started = run.ready_path.exists()
        if stopped and run.cancel_requested:
            final = dict(
                life_cycle_state="TERMINATED",
                result_state="CANCELED",
                state_message="Run cancelled.",
                termination_code="USER_CANCELED",
                termination_type="SUCCESS",
            )
        elif stopped and run.timed_out:
            final = dict(
                life_cycle_state="TERMINATED",
                result_state="TIMEDOUT",
                state_message=f"Run timed out after {run.timeout_seconds} seconds.",
                termination_code="CANCELED",
                termination_type="CLIENT_ERROR",
            )
        elif not started:
            detail = _last_lines(self.redact(_tail(run.stderr_path, 64 * 1024)[0]), 20, STATE_MESSAGE_CHARS)
            final = dict(
                life_cycle_state="INTERNAL_ERROR",
                result_state="FAILED",
                state_message=f"The emulated cluster failed before the task started (exit code {returncode}):\n{detail}",
                termination_code="CLUSTER_ERROR",
                termination_type="CLIENT_ERROR",
            )
        elif returncode == 0:
            final = dict(
                life_cycle_state="TERMINATED",
                result_state="SUCCESS",
                state_message="",
                termination_code="SUCCESS",
                termination_type="SUCCESS",
            )
        else:
            trace = self._error_trace(run) if run.error_path.exists() else ""
            detail = _last_lines(trace or self.redact(_tail(run.stderr_path, 64 * 1024)[0]), 20, STATE_MESSAGE_CHARS)
            final = dict(
                life_cycle_state="TERMINATED",
                result_state="FAILED",
                state_message=f"Task {run.task_key} failed with exit code {returncode}:\n{detail}",
                termination_code="RUN_EXECUTION_ERROR",
                termination_type="CLIENT_ERROR",
            )
        self._deliver_cluster_logs(run, cluster)
        self._set_state(run, returncode=returncode, end_time=_now_ms(), **final)
        logger.info("run %s: %s %s", run.run_id, run.life_cycle_state, run.result_state)

    def _deliver_cluster_logs(self, run: EmulatedRun, cluster: dict) -> None:
        """Cluster log delivery to DBFS (``cluster_log_conf.dbfs``), as ``<destination>/<cluster_id>/driver/
        {stdout,stderr}``. Databricks delivers every few minutes; the emulator once, when the run ends."""
        destination = ((cluster.get("cluster_log_conf") or {}).get("dbfs") or {}).get("destination")
        if not destination:
            return
        try:
            folder = self.dbfs.local(destination) / run.cluster_id / "driver"
        except DbfsPathError:
            run.notes.append(f"cluster_log_conf destination {destination!r} is not a DBFS path: no logs delivered")
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name, source in (("stdout", run.stdout_path), ("stderr", run.stderr_path)):
            (folder / name).write_text(self.redact(_tail(source, 64 * MIB)[0]))

    # ---------------------------------------------------------------- clusters, libraries, permissions, secrets

    def _cluster_json(self, cluster_id: str) -> dict:
        with self._lock:
            runs = [r for r in self._runs.values() if r.cluster_id == cluster_id]
            if cluster_id in self._clusters:
                spec, source, state = self._clusters[cluster_id], "UI", "RUNNING"
            elif runs:
                run = runs[0]
                spec, source = run.new_cluster or {}, "JOB"
                state = "TERMINATED" if run.terminated else ("RUNNING" if run.start_time else "PENDING")
            else:
                raise _invalid(f"Cluster {cluster_id} does not exist")
        out = {k: v for k, v in spec.items() if k not in ("size", "nodes")}
        out.update(
            cluster_id=cluster_id,
            cluster_name=spec.get("cluster_name")
            or (f"job-{runs[0].job_id}-run-{runs[0].run_id}" if source == "JOB" else cluster_id),
            state=state,
            cluster_source=source,
            creator_user_name=USER_NAME,
            spark_version=spec.get("spark_version", "emulator-local"),
            driver={"host_private_ip": "127.0.0.1"},
        )
        out["spark_conf"] = {**(spec.get("spark_conf") or {}), "spark.master": self.spark_master}
        return out

    def api_clusters_get(self, body, query):
        cluster_id = query.get("cluster_id")
        if not cluster_id:
            raise _invalid("cluster_id is required")
        return self._cluster_json(cluster_id)

    def api_clusters_list(self, body, query):
        with self._lock:
            ids = list(self._clusters) + [r.cluster_id for r in self._runs.values() if r.new_cluster is not None]
        return {"clusters": [self._cluster_json(cid) for cid in dict.fromkeys(ids)]}

    def _libraries_of(self, cluster_id: str) -> list:
        with self._lock:
            libraries = list(self._cluster_libraries.get(cluster_id, []))
            for run in self._runs.values():
                if run.cluster_id == cluster_id:
                    libraries += [lib for lib in run.libraries if lib not in libraries]
        return libraries

    def api_libraries_cluster_status(self, body, query):
        cluster_id = query.get("cluster_id")
        if not cluster_id:
            raise _invalid("cluster_id is required")
        self._cluster_json(cluster_id)  # existence check
        return {"cluster_id": cluster_id, "library_statuses": self._library_statuses(cluster_id)}

    def _library_statuses(self, cluster_id: str) -> list:
        note = ("Databricks emulator: installed in the emulated runtime's environment" if self.environments is not None
                else "Databricks emulator: not installed, the local environment is used")
        return [
            {"library": lib, "status": "INSTALLED", "messages": [note], "is_library_for_all_clusters": False}
            for lib in self._libraries_of(cluster_id)
        ]

    def api_libraries_all_cluster_statuses(self, body, query):
        with self._lock:
            ids = list(dict.fromkeys([*self._clusters, *(r.cluster_id for r in self._runs.values())]))
        return {"statuses": [{"cluster_id": cid, "library_statuses": self._library_statuses(cid)} for cid in ids]}

    def api_libraries_install(self, body, query):
        cluster_id = body.get("cluster_id")
        self._cluster_json(cluster_id or "")
        with self._lock:
            known = self._cluster_libraries.setdefault(cluster_id, [])
            known += [lib for lib in body.get("libraries") or [] if lib not in known]
        logger.info("libraries for cluster %s recorded (would install): %s", cluster_id, body.get("libraries"))
        return {}

    def api_libraries_uninstall(self, body, query):
        cluster_id = body.get("cluster_id")
        with self._lock:
            known = self._cluster_libraries.get(cluster_id, [])
            self._cluster_libraries[cluster_id] = [lib for lib in known if lib not in (body.get("libraries") or [])]
        return {}

    def _permissions_json(self, object_type: str, object_id: str) -> dict:
        acl = self._permissions.get((object_type, object_id), [])
        entries = []
        for entry in acl:
            principal = {k: v for k, v in entry.items() if k != "permission_level"}
            level = entry.get("permission_level")
            entries.append({**principal, "all_permissions": [{"permission_level": level, "inherited": False}]})
        return {
            "object_id": f"/{object_type}/{object_id}",
            "object_type": object_type.rstrip("s"),
            "access_control_list": entries,
        }

    def api_permissions_get(self, body, query, object_type, object_id):
        with self._lock:
            return self._permissions_json(object_type, object_id)

    def api_permissions_set(self, body, query, object_type, object_id):
        with self._lock:
            self._permissions[(object_type, object_id)] = list(body.get("access_control_list") or [])
            return self._permissions_json(object_type, object_id)

    def api_permissions_update(self, body, query, object_type, object_id):
        with self._lock:
            acl = self._permissions.setdefault((object_type, object_id), [])
            acl += list(body.get("access_control_list") or [])
            return self._permissions_json(object_type, object_id)

    def permissions(self, object_type: str, object_id: str) -> list[dict]:
        """The access control list recorded for an object (``"jobs"``, ``"clusters"``...)."""
        with self._lock:
            return list(self._permissions.get((object_type, str(object_id)), []))

    def api_secret_scopes_list(self, body, query):
        return {"scopes": [{"name": scope, "backend_type": "DATABRICKS"} for scope in sorted(self._secrets)]}

    def api_secrets_list(self, body, query):
        scope = query.get("scope")
        if scope not in self._secrets:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"Scope {scope} does not exist!")
        return {"secrets": [{"key": key, "last_updated_timestamp": 0} for key in sorted(self._secrets[scope])]}

    def api_secrets_get(self, body, query):
        raise ApiError(
            403, "PERMISSION_DENIED", "The Databricks emulator serves secret values to tasks only (dbutils.secrets.get)."
        )


def _r(method: str, pattern: str, name: str):
    return method, re.compile(pattern), name


_JOBS = r"/api/2\.[012]/jobs/runs"
_ROUTES = [
    _r("GET", r"/", "api_index"),
    _r("GET", r"/emulator/runs/(\d+)", "api_run_page"),
    _r("GET", r"/api/2\.0/preview/scim/v2/Me", "api_me"),
    _r("POST", r"/api/2\.0/dbfs/create", "api_dbfs_create"),
    _r("POST", r"/api/2\.0/dbfs/add-block", "api_dbfs_add_block"),
    _r("POST", r"/api/2\.0/dbfs/close", "api_dbfs_close"),
    _r("POST", r"/api/2\.0/dbfs/put", "api_dbfs_put"),
    _r("GET", r"/api/2\.0/dbfs/read", "api_dbfs_read"),
    _r("GET", r"/api/2\.0/dbfs/get-status", "api_dbfs_get_status"),
    _r("GET", r"/api/2\.0/dbfs/list", "api_dbfs_list"),
    _r("POST", r"/api/2\.0/dbfs/mkdirs", "api_dbfs_mkdirs"),
    _r("POST", r"/api/2\.0/dbfs/delete", "api_dbfs_delete"),
    _r("POST", r"/api/2\.0/dbfs/move", "api_dbfs_move"),
    _r("POST", _JOBS + r"/submit", "api_runs_submit"),
    _r("GET", _JOBS + r"/get", "api_runs_get"),
    _r("GET", _JOBS + r"/get-output", "api_runs_get_output"),
    _r("POST", _JOBS + r"/cancel", "api_runs_cancel"),
    _r("GET", _JOBS + r"/list", "api_runs_list"),
    _r("GET", r"/api/2\.[01]/clusters/get", "api_clusters_get"),
    _r("GET", r"/api/2\.[01]/clusters/list", "api_clusters_list"),
    _r("GET", r"/api/2\.0/libraries/cluster-status", "api_libraries_cluster_status"),
    _r("GET", r"/api/2\.0/libraries/all-cluster-statuses", "api_libraries_all_cluster_statuses"),
    _r("POST", r"/api/2\.0/libraries/install", "api_libraries_install"),
    _r("POST", r"/api/2\.0/libraries/uninstall", "api_libraries_uninstall"),
    _r("GET", r"/api/2\.0/permissions/([^/]+)/([^/]+)", "api_permissions_get"),
    _r("PUT", r"/api/2\.0/permissions/([^/]+)/([^/]+)", "api_permissions_set"),
    _r("PATCH", r"/api/2\.0/permissions/([^/]+)/([^/]+)", "api_permissions_update"),
    _r("GET", r"/api/2\.0/secrets/scopes/list", "api_secret_scopes_list"),
    _r("GET", r"/api/2\.0/secrets/list", "api_secrets_list"),
    _r("GET", r"/api/2\.0/secrets/get", "api_secrets_get"),
]


class _Handler(BaseHTTPRequestHandler):
    emulator: DatabricksEmulator
    protocol_version = "HTTP/1.1"
    server_version = "DatabricksEmulator/1"

    def setup(self) -> None:
        super().setup()
        with self.emulator._lock:
            self.emulator._connections.add(self.connection)

    def finish(self) -> None:
        with self.emulator._lock:
            self.emulator._connections.discard(self.connection)
        super().finish()

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        if is_files_api(path):
            self._handle_files(path, parts.query)
            return
        status, payload = 200, {}
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self.emulator._authorized(self.headers.get("Authorization"))
            handler, args = self.emulator._route(self.command, path)
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            self.emulator._refuse_without_dbfs_root(path, raw, query)
            try:
                body = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                raise ApiError(400, "MALFORMED_REQUEST", "The request body is not valid JSON.") from None
            if not isinstance(body, dict):
                raise ApiError(400, "MALFORMED_REQUEST", "The request body must be a JSON object.")
            payload = handler(body, query, *args)
        except ApiError as e:
            status, payload = e.status, {"error_code": e.error_code, "message": e.message}
        except Exception as e:
            logger.exception("%s %s failed", self.command, path)
            message = f"Databricks emulator: {type(e).__name__}: {e}"
            status, payload = 500, {"error_code": "INTERNAL_ERROR", "message": message}
        self.emulator._record(self.command, path, status)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has no body: the client would read it as the next answer
            self.wfile.write(data)

    def _handle_files(self, path: str, query: str) -> None:
        """The Files API (volumes.py): raw bytes in and out, JSON only for errors and listings."""
        status, headers, data = 200, {}, b""
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self.emulator._authorized(self.headers.get("Authorization"))
            arguments = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
            status, headers, data = self.emulator.volumes.handle(self.command, path, arguments, raw)
        except (ApiError, VolumeError) as e:
            status, headers = e.status, {"Content-Type": "application/json"}
            data = json.dumps({"error_code": e.error_code, "message": e.message}).encode()
        self.emulator._record(self.command, path, status)
        self.send_response(status)
        for name, value in headers.items():
            if name != "Content-Length":
                self.send_header(name, value)
        # HEAD answers say the file's length, and send no body.
        self.send_header("Content-Length", headers.get("Content-Length", str(len(data))))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)
