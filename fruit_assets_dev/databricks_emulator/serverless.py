"""Serverless compute in the emulator: a task with an `environment_key`, run on Spark Connect.

A serverless Python task names no cluster: it has an `environment_key`, and the run's `environments`
give that key a `spec` with the environment version (`environment_version`, formerly `client`) and its
`dependencies` (pip requirement strings, wheels in volumes)
(https://docs.databricks.com/api/workspace/jobs/submit, "environments";
https://docs.databricks.com/aws/en/compute/serverless/dependencies). The emulator builds that as it
builds a runtime (environments.py): environment version 4 is Python 3.12 with Databricks Connect 17
(https://docs.databricks.com/aws/en/release-notes/serverless/environment-version/four), emulated by the
17.3 LTS runtime's packages with pyspark's `connect` extra (what Databricks Connect brings).

The task then gets a Spark Connect session only, as serverless gives
(https://docs.databricks.com/aws/en/compute/serverless/limitations): no `sc`, no SparkContext, no RDD
API, no broadcast variables, no accumulators (Spark Connect has none of them:
https://spark.apache.org/docs/latest/spark-connect-overview.html); `spark.sparkContext` raises. The
task's process is only a client of a Spark Connect server (a local Spark with the Connect plugin), so
anything that needs the JVM in the driver fails here as it would there.

Serverless compute is shared and already running: a job run gets a session on it, not a Spark of its
own, and does not wait for a cluster to start
(https://docs.databricks.com/aws/en/compute/serverless/). So the emulator keeps one Connect server per
environment (`ConnectServers`), started by the first task that needs it and stopped with the emulator,
and each task gets its own Connect session on it (sessions do not share SQL settings or temporary
views). Not emulated: cancelling a run does not interrupt the operations its session still has on the
server (they finish); a task's process is killed as on a cluster.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Environment versions emulated, with the runtime whose packages stand in for them.
ENVIRONMENT_RUNTIMES = {"4": "17.3.x-scala2.13"}


class ServerlessError(ValueError):
    """The task's serverless environment is missing or not emulated (the API's 400)."""


def is_serverless(task: dict) -> bool:
    return bool(task.get("environment_key"))


def environment_of(body: dict, task: dict) -> dict:
    """The `spec` of the task's environment in the run's `environments`."""
    key = task["environment_key"]
    for environment in body.get("environments") or []:
        if isinstance(environment, dict) and environment.get("environment_key") == key:
            spec = environment.get("spec")
            if isinstance(spec, dict):
                return spec
    raise ServerlessError(f"The task's environment_key {key!r} is not one of the run's environments.")


def spark_version_of(spec: dict) -> str:
    version = str(spec.get("environment_version") or spec.get("client") or "")
    if version not in ENVIRONMENT_RUNTIMES:
        raise ServerlessError(
            f"Serverless environment version {version!r} is not emulated: the Databricks emulator runs "
            f"{', '.join(sorted(ENVIRONMENT_RUNTIMES))} (Python 3.12, Spark Connect 4.0)."
        )
    return ENVIRONMENT_RUNTIMES[version]


def libraries_of(spec: dict) -> list[dict[str, Any]]:
    """The environment's dependencies as the cluster libraries the emulator installs."""
    dependencies = spec.get("dependencies") or []
    if not isinstance(dependencies, list) or not all(isinstance(d, str) for d in dependencies):
        raise ServerlessError("environments[].spec.dependencies must be a list of pip requirement strings.")
    return [{"pypi": {"package": dependency}} for dependency in dependencies]


def connect_requirement(spark: str) -> str:
    """What the environment adds to the runtime's packages: the Spark Connect client (Databricks Connect)."""
    return f"pyspark[connect]=={spark}"


CONNECT_SERVER = """
import json, sys
from pyspark.sql import SparkSession
builder = SparkSession.builder
for key, value in json.loads(sys.argv[1]).items():
    builder = builder.config(key, value)
spark = builder.getOrCreate()
print("ready", flush=True)
sys.stdin.read()  # until the emulator closes the pipe: stop(), or its process ended
"""


class ConnectServers:
    """One Spark Connect server per serverless environment (a Python environment folder): started by
    the first task that needs it, then shared by the environment's tasks, until `stop()`."""

    def __init__(self, log_folder: Path):
        self._log_folder = log_folder
        self._lock = threading.Lock()
        self._servers: dict[str, tuple[subprocess.Popen, str]] = {}

    def url(self, key: str, python: str, *, env: dict[str, str], spark_master: str,
            wrap: Callable[[list[str]], list[str]]) -> str:
        """The `sc://` URL of the environment's server (`key`), started with `python`, `env` and the
        command wrapper `wrap` (the volumes' mount namespace) if it is not running."""
        with self._lock:
            running = self._servers.get(key)
            if running is not None and running[0].poll() is None:
                return running[1]
            process, url = self._start(key, python, env, spark_master, wrap)
            self._servers[key] = (process, url)
            return url

    def _start(self, key: str, python: str, env: dict[str, str], spark_master: str, wrap) -> tuple[subprocess.Popen, str]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = {
            "spark.master": spark_master, "spark.ui.enabled": "false", "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1", "spark.app.name": f"databricks-emulator-serverless-{Path(key).name}",
            "spark.plugins": "org.apache.spark.sql.connect.SparkConnectPlugin",
            "spark.connect.grpc.binding.address": "127.0.0.1", "spark.connect.grpc.binding.port": str(port),
            "spark.sql.session.timeZone": "UTC",
        }
        self._log_folder.mkdir(parents=True, exist_ok=True)
        log = self._log_folder / f"connect-server-{Path(key).name}.log"
        with open(log, "ab") as err:
            process = subprocess.Popen(wrap([python, "-c", CONNECT_SERVER, json.dumps(conf)]), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=err, env=env, cwd=self._log_folder, text=True)
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            process.kill()
            raise RuntimeError(f"the emulated serverless compute's Spark Connect server did not start (see {log})")
        return process, f"sc://127.0.0.1:{port}"

    def stop(self) -> None:
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for process, _ in servers:
            if process.stdin is not None:
                process.stdin.close()  # the server's script returns: Spark stops
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
