"""The settings file of FRUIT_DEPLOYMENT=databricks_pipes (FRUIT_DATABRICKS_PIPES_CONFIG: the repository's
databricks_pipes.yaml for a classic cluster, databricks_pipes_serverless.yaml for serverless), read and
checked on the host before anything reaches the workspace; every error names the file and the key."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

CONFIG_SETTING = "FRUIT_DATABRICKS_PIPES_CONFIG"
COMPUTE_KINDS = ("new_cluster", "existing_cluster_id", "serverless")
_VOLUME = re.compile(r"^/Volumes/[^/]+/[^/]+/[^/]+(/[^/]+)*$")


class PipesSettingsError(ValueError):
    """The settings file is missing, unreadable or wrong; the message names the file and the key."""


@dataclass(frozen=True)
class PipesSettings:
    path: str
    volume: str  # /Volumes/<catalog>/<schema>/<volume>[/<folder>]: code, Pipes context and messages
    compute: dict[str, Any]  # exactly one of COMPUTE_KINDS
    libraries: list[str] = field(default_factory=list)  # pip requirements of the task
    storage_secret_scope: dict[str, str] | None = None
    poll_interval_seconds: float = 5.0
    timeout_seconds: int = 86400

    @property
    def serverless(self) -> bool:
        return "serverless" in self.compute


def load_settings(path: str | None = None) -> PipesSettings:
    path = (path or os.environ.get(CONFIG_SETTING, "")).strip()
    if not path:
        raise PipesSettingsError(
            f"FRUIT_DEPLOYMENT=databricks_pipes needs {CONFIG_SETTING}: the path of a YAML file such as the "
            "repository's databricks_pipes.yaml (classic cluster) or databricks_pipes_serverless.yaml (see README)"
        )
    raw = _read(path)
    volume = raw.get("volume")
    if not isinstance(volume, str) or not _VOLUME.match(volume.rstrip("/")):
        raise PipesSettingsError(
            f"volume in {path} must be a Unity Catalog volume path /Volumes/<catalog>/<schema>/<volume>, got {volume!r}"
        )
    compute = raw.get("compute")
    if not isinstance(compute, dict) or len([kind for kind in COMPUTE_KINDS if kind in compute]) != 1 or len(compute) != 1:
        raise PipesSettingsError(f"compute in {path} must have exactly one of {', '.join(COMPUTE_KINDS)}, got {compute!r}")
    _check_compute(compute, path)
    libraries = raw.get("libraries") or []
    if not isinstance(libraries, list) or not all(isinstance(item, str) for item in libraries):
        raise PipesSettingsError(f"libraries in {path} must be a list of pip requirements such as 'deltalake==1.6.6'")
    scope = raw.get("storage_secret_scope")
    if scope is not None and (not isinstance(scope, dict) or set(scope) != {"scope", "access_key_key", "secret_key_key"}):
        raise PipesSettingsError(f"storage_secret_scope in {path} must have scope, access_key_key and secret_key_key")
    try:
        poll, timeout = float(raw.get("poll_interval_seconds", 5)), int(raw.get("timeout_seconds", 86400))
    except (TypeError, ValueError):
        raise PipesSettingsError(f"poll_interval_seconds and timeout_seconds in {path} must be numbers") from None
    return PipesSettings(path, volume.rstrip("/"), compute, libraries, scope, poll, timeout)


def _read(path: str) -> dict:
    import yaml

    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as error:
        raise PipesSettingsError(f"{CONFIG_SETTING}={path!r} cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise PipesSettingsError(f"{CONFIG_SETTING}={path!r} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise PipesSettingsError(f"{CONFIG_SETTING}={path!r} must be a YAML mapping with volume and compute")
    return raw


def _check_compute(compute: dict, path: str) -> None:
    """A new cluster's runtime must be a supported one (databricks_runtimes.py); serverless must name its
    environment version (4: Python 3.12, Spark Connect 4.0, the version these tasks are tested on)."""
    from fruit_assets.databricks.runtimes import runtime_for_spark_version

    if "new_cluster" in compute:
        cluster = compute["new_cluster"]
        if not isinstance(cluster, dict):
            raise PipesSettingsError(f"compute.new_cluster in {path} must be a cluster spec (spark_version, node_type_id, ...)")
        runtime_for_spark_version(cluster.get("spark_version"), f"compute.new_cluster.spark_version in {path}")
    elif "serverless" in compute:
        version = str((compute["serverless"] or {}).get("environment_version", ""))
        if version != "4":
            raise PipesSettingsError(f"compute.serverless.environment_version in {path} must be \"4\", got {version!r}")
