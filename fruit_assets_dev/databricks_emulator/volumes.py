"""Unity Catalog volumes in the emulator: the Files API over a local folder.

Databricks serves volumes at `/Volumes/<catalog>/<schema>/<volume>/...` through the Files API
(https://docs.databricks.com/api/workspace/files): `PUT|GET|HEAD|DELETE /api/2.0/fs/files<path>` (the
body is the file's raw bytes, not JSON) and `PUT|GET|HEAD|DELETE /api/2.0/fs/directories<path>`
(create like `mkdir -p`, list as `{"contents": [...]}`, check, delete an empty one). These are the
calls databricks-sdk's `FilesAPI` makes (`databricks/sdk/service/files.py`), which dagster-databricks'
`PipesUnityCatalogVolumesContextInjector` and `PipesUnityCatalogVolumesMessageReader` use.

On a cluster or serverless task the same files are plain paths under `/Volumes` (a FUSE mount:
https://docs.databricks.com/aws/en/volumes/volume-files). The emulator gives each task that mount with
a private mount namespace (`unshare --mount`) in which `<root>/volumes` is bound at `/Volumes`: it needs
root, as a FUSE mount would; without root the tasks see no `/Volumes` and say so in their log.
"""

from __future__ import annotations

import email.utils
import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote

FILES_PREFIX = "/api/2.0/fs/files"
DIRECTORIES_PREFIX = "/api/2.0/fs/directories"
MOUNT_POINT = "/Volumes"


class VolumeError(Exception):
    def __init__(self, status: int, error_code: str, message: str):
        super().__init__(message)
        self.status, self.error_code, self.message = status, error_code, message


def is_files_api(path: str) -> bool:
    return path.startswith((FILES_PREFIX, DIRECTORIES_PREFIX))


def is_volume_path(path: str) -> bool:
    return path == MOUNT_POINT or path.startswith(MOUNT_POINT + "/")


class Volumes:
    """`/Volumes/...` paths as files under `folder`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def local(self, path: str) -> Path:
        """The local file of `/Volumes/<catalog>/<schema>/<volume>/...`; a 400 for any other path (the
        Files API serves volumes and workspace files; the emulator only volumes)."""
        parts = [p for p in path.split("/") if p]
        if not is_volume_path(path) or len(parts) < 4 or any(p in (".", "..") for p in parts):
            raise VolumeError(400, "INVALID_PARAMETER_VALUE",
                              f"The emulator's Files API serves /Volumes/<catalog>/<schema>/<volume>/... paths, not {path!r}")
        return self.folder.joinpath(*parts[1:])

    def handle(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """One Files API request: (status, headers, body)."""
        files = path.startswith(FILES_PREFIX)
        target = unquote(path[len(FILES_PREFIX if files else DIRECTORIES_PREFIX):])
        local = self.local(target)
        if files:
            return self._file(method, target, local, query, body)
        return self._directory(method, target, local)

    def _file(self, method: str, target: str, local: Path, query: dict, body: bytes):
        if method == "PUT":
            if local.exists() and str(query.get("overwrite", "true")).lower() == "false":
                raise VolumeError(409, "ALREADY_EXISTS", f"The file being created already exists: {target}")
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(f".{local.name}.{os.getpid()}.partial")
            partial.write_bytes(body)
            os.replace(partial, local)  # a reader sees the old file or the new one, never half of it
            return 204, {}, b""
        if not local.is_file():
            raise VolumeError(404, "NOT_FOUND", f"The file does not exist: {target}")
        if method == "DELETE":
            local.unlink()
            return 204, {}, b""
        headers = {"Content-Type": "application/octet-stream", "Last-Modified": _http_date(local)}
        if method == "HEAD":
            return 200, headers | {"Content-Length": str(local.stat().st_size)}, b""
        return 200, headers, local.read_bytes()

    def _directory(self, method: str, target: str, local: Path):
        if method == "PUT":
            if local.is_file():
                raise VolumeError(409, "ALREADY_EXISTS", f"A file exists at the directory's path: {target}")
            local.mkdir(parents=True, exist_ok=True)
            return 204, {}, b""
        if not local.is_dir():
            raise VolumeError(404, "NOT_FOUND", f"The directory does not exist: {target}")
        if method == "HEAD":
            return 200, {}, b""
        if method == "DELETE":
            if any(local.iterdir()):
                raise VolumeError(409, "DIRECTORY_NOT_EMPTY", f"The directory is not empty: {target}")
            shutil.rmtree(local)
            return 204, {}, b""
        entries = [_entry(target, child) for child in sorted(local.iterdir()) if not child.name.endswith(".partial")]
        return 200, {"Content-Type": "application/json"}, json.dumps({"contents": entries}).encode()


def _entry(directory: str, child: Path) -> dict:
    stat = child.stat()
    entry = {"path": f"{directory.rstrip('/')}/{child.name}", "name": child.name, "is_directory": child.is_dir(),
             "last_modified": int(stat.st_mtime * 1000)}
    return entry if child.is_dir() else entry | {"file_size": stat.st_size}


def _http_date(local: Path) -> str:
    return email.utils.formatdate(local.stat().st_mtime, usegmt=True)


_SCRIPT = 'mount --bind "$0" /Volumes && exec "$@"'


@functools.cache
def can_mount() -> bool:
    """Whether this machine lets the emulator bind a folder at /Volumes in a private mount namespace: root,
    `unshare`, and the right to mount (a container without CAP_SYS_ADMIN has not). Tried once."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        os.makedirs(MOUNT_POINT, exist_ok=True)  # the mount point, made once, empty, on the host
        probe = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, tempfile.gettempdir(), "true"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def mount_command(volumes_folder: Path, command: list[str]) -> list[str] | None:
    """`command` in a private mount namespace where `volumes_folder` is `/Volumes`, or None where this
    machine cannot (`can_mount`): its tasks then see no /Volumes."""
    if not can_mount():
        return None
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _SCRIPT, str(volumes_folder), *command]
