"""The Databricks runtimes a cluster step may run on, and the checks that refuse any other one early.

Dagster-free: the host checks the launcher YAML's `spark_version` when it reads the file (resources/__init__.py,
`databricks_launcher_config`), and the cluster checks `DATABRICKS_RUNTIME_VERSION` before the step does
any Spark work (`preflight.cluster_preflight`).

Why only these: the storage layer reads Delta tables through `pyspark.sql.datasource` (Spark 4 Python
data sources) and the package is tested with numpy 2 and pandas 2.2+. 15.4 LTS and 16.4 LTS ship numpy
1.x, pandas 1.5 and pyarrow 14/15 in their Python, which cluster libraries would have to upgrade under
the runtime's own packages; nothing here shows the code runs there, so they are refused.

Library versions are those of the release notes' "System environment" / "Installed Python libraries"
(the BRIEF's table of 2026-12-06):
- 17.3 LTS: https://docs.databricks.com/aws/en/release-notes/runtime/17.3lts
- 18 LTS: https://docs.databricks.com/aws/en/release-notes/runtime/ (the 18 LTS entry; Spark 4.1.0)
`spark_version` keys are the API's (`GET /api/2.1/clusters/spark-versions`): "17.3.x-scala2.13" and
"18.0.x-scala2.13" are the keys public cluster specs use for these two. On the cluster, Databricks sets
DATABRICKS_RUNTIME_VERSION to the runtime's major.minor ("17.3"); "18" and "18.0" are taken as the same.

`preinstalled` holds more of the runtime's own Python packages, for the workspace emulator, which builds
each runtime's Python from this table (`Runtime.python_packages`; fruit_assets_dev/databricks_emulator/
environments.py): the table is kept here only, so the product and the emulator cannot drift apart.
- protobuf, boto3, databricks-sdk: the release notes, as above (the BRIEF's table of 2026-12-06).
- 18 LTS grpcio 1.67.0 and requests 2.32.3 (protobuf 5.29.4, databricks-sdk 0.67.0, numpy, pandas and
  pyarrow agree with the table): Databricks' requirements file of the 18.x base image (client.5.x),
  https://docs.databricks.com/aws/en/assets/files/requirements-8e972929dcac249709ddd4214f2e1b2a.txt
- NOT FOUND in the sources searched: grpcio and requests of 17.3 LTS, and pyyaml of both. 17.3 is given
  18's grpcio and requests (both runtimes ship the same protobuf 5.29.4, which pins grpcio's generation),
  and pyyaml 6.0.2 for both: assumptions, to be checked against the release notes' "Installed Python
  libraries" of each runtime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The environment variable Databricks sets in every cluster process (driver and executors).
RUNTIME_VARIABLE = "DATABRICKS_RUNTIME_VERSION"
_ENV = re.compile(r"^(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Runtime:
    """One supported Databricks runtime and the Python it ships (before any cluster library)."""

    name: str  # as Databricks names it
    spark_version: str  # the key of a cluster spec (`run_config.cluster.new.spark_version`)
    version: str  # DATABRICKS_RUNTIME_VERSION on the cluster
    spark: str
    python: str
    numpy: str
    pandas: str
    pyarrow: str
    pillow: str
    deltalake: str | None  # preinstalled deltalake, if any
    preinstalled: tuple[tuple[str, str], ...] = ()  # more of its Python packages (distribution, version)

    @property
    def python_minor(self) -> str:
        """"3.12" for "3.12.3": the Python the emulator must run it on."""
        return ".".join(self.python.split(".")[:2])

    def python_packages(self) -> dict[str, str]:
        """Every Python package of the runtime pinned here (pip distribution name -> version), pyspark
        included: what the emulator installs before the cluster's libraries."""
        packages = {"pyspark": self.spark, "numpy": self.numpy, "pandas": self.pandas, "pyarrow": self.pyarrow,
                    "pillow": self.pillow, **({"deltalake": self.deltalake} if self.deltalake else {})}
        return packages | dict(self.preinstalled)

    @property
    def major_minor(self) -> tuple[int, int]:
        return _major_minor(self.version) or (0, 0)


SUPPORTED_RUNTIMES: tuple[Runtime, ...] = (
    Runtime("17.3 LTS", "17.3.x-scala2.13", "17.3", spark="4.0.0", python="3.12.3", numpy="2.1.3",
            pandas="2.2.3", pyarrow="19.0.1", pillow="11.1.0", deltalake=None,
            preinstalled=(("protobuf", "5.29.4"), ("boto3", "1.36.2"), ("databricks-sdk", "0.49.0"),
                          ("grpcio", "1.67.0"), ("requests", "2.32.3"), ("pyyaml", "6.0.2"))),
    Runtime("18 LTS", "18.0.x-scala2.13", "18.0", spark="4.1.0", python="3.12", numpy="2.1.3",
            pandas="2.2.3", pyarrow="21.0.0", pillow="11.1.0", deltalake="1.1.4",
            preinstalled=(("protobuf", "5.29.4"), ("boto3", "1.40.45"), ("databricks-sdk", "0.67.0"),
                          ("grpcio", "1.67.0"), ("requests", "2.32.3"), ("pyyaml", "6.0.2"))),
)
DEFAULT_RUNTIME = SUPPORTED_RUNTIMES[0]  # the one databricks.yaml names


class UnsupportedRuntimeError(ValueError):
    """A Databricks runtime outside SUPPORTED_RUNTIMES."""


def supported_list() -> str:
    return ", ".join(f"{r.name} (spark_version {r.spark_version})" for r in SUPPORTED_RUNTIMES)


def _major_minor(text: str) -> tuple[int, int] | None:
    match = _ENV.match(text.strip())
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _refusal(what: str, where: str) -> UnsupportedRuntimeError:
    return UnsupportedRuntimeError(
        f"Databricks runtime {what} is not supported by fruit_assets ({where}). Supported runtimes: "
        f"{supported_list()}. Set run_config.cluster.new.spark_version in the launcher YAML "
        "(FRUIT_DATABRICKS_CONFIG) to one of them; see README, 'Run on Databricks (AWS)'."
    )


def runtime_for_spark_version(spark_version: object, where: str = "cluster.new.spark_version") -> Runtime:
    """The supported runtime a cluster spec's `spark_version` names; UnsupportedRuntimeError otherwise.

    Only the plain keys are accepted: ML, GPU and Photon variants ship other Python libraries and
    are not checked here."""
    key = str(spark_version or "").strip()
    for runtime in SUPPORTED_RUNTIMES:
        if key == runtime.spark_version:
            return runtime
    raise _refusal(repr(key) if key else "(none: spark_version is missing)", where)


def runtime_for_environment(value: str, where: str = RUNTIME_VARIABLE) -> Runtime:
    """The supported runtime of a cluster process, from DATABRICKS_RUNTIME_VERSION's value."""
    found = _major_minor(value)
    for runtime in SUPPORTED_RUNTIMES:
        if found is not None and found == runtime.major_minor:
            return runtime
    raise _refusal(repr(value), f"{where}={value} on this cluster")

