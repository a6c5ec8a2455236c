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
runner starts a Spark Connect server (a local Spark with the Connect plugin) in a process of its own,
and the task's process is only its client, so anything that needs the JVM in the driver fails here as
it would there.
"""

from __future__ import annotations

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
