"""DBFS paths <-> the emulator's local folder.

Two spellings of a DBFS location exist on Databricks, and the emulator maps both into ``<root>/dbfs``:

* DBFS paths, as the REST API and ``dbutils.fs`` take them: ``dbfs:/a/b``, ``dbfs:///a/b`` or ``/a/b``.
* The FUSE mount a task sees on the driver: ``/dbfs/a/b`` (plain local-file access to DBFS path ``/a/b``).

No path can leave the DBFS folder: ``..`` components are resolved against the DBFS root first, as
on DBFS itself (``/../x`` is ``/x``).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

FUSE_PREFIX = "/dbfs"


class DbfsPathError(ValueError):
    """A path that is not a DBFS path (relative, or with another scheme)."""


def normalize(path: str) -> str:
    """A DBFS path in canonical form: ``/a/b`` (``/`` for the root)."""
    if not isinstance(path, str) or not path:
        raise DbfsPathError("a DBFS path is required")
    p = path[len("dbfs:") :] if path.startswith("dbfs:") else path
    if "://" in p or (":" in p.split("/", 1)[0]):
        raise DbfsPathError(f"{path!r} is not a DBFS path (only dbfs:/... and absolute /... paths are)")
    if not p.startswith("/"):
        raise DbfsPathError(f"DBFS path {path!r} must be absolute")
    return posixpath.normpath("/" + p.lstrip("/")) if p.strip("/") else "/"


def is_fuse_path(path: str) -> bool:
    return path == FUSE_PREFIX or path.startswith(FUSE_PREFIX + "/")


def from_fuse(path: str) -> str:
    """``/dbfs/a/b`` (the driver's FUSE mount) -> DBFS path ``/a/b``."""
    if not is_fuse_path(path):
        raise DbfsPathError(f"{path!r} is not under {FUSE_PREFIX}/")
    return normalize(path[len(FUSE_PREFIX) :] or "/")


class DbfsRoot:
    """The local folder that holds DBFS."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()

    def local(self, dbfs_path: str) -> Path:
        """Local file for a DBFS path (``dbfs:/x``, ``/x``)."""
        rel = normalize(dbfs_path).lstrip("/")
        return self.folder / rel if rel else self.folder

    def local_for_fuse(self, fuse_path: str) -> Path:
        """Local file for a driver FUSE path (``/dbfs/x``)."""
        return self.local(from_fuse(fuse_path))

    def dbfs_path(self, local: str | Path) -> str:
        """DBFS path (``/x``) of a local file inside the folder."""
        rel = Path(local).resolve().relative_to(self.folder)
        return "/" + rel.as_posix() if rel.parts else "/"
