"""The Databricks side of FRUIT_DEPLOYMENT=databricks_pipes: one task materializes one asset.

`entry.py` (the task's python_file, in the volume) puts the package's zip on the path and calls `main`.
`main` opens Dagster Pipes the way the host's `PipesUnityCatalogVolumesContextInjector` and
`PipesUnityCatalogVolumesMessageReader` expect (context file and message chunks under `/Volumes`, which
the task reads and writes as plain files), takes the run's settings from the Pipes extras (no
credentials: those come from the cluster's instance profile or the settings file's secret scope), gives
the package to Spark's Python workers, and runs the asset's work (`work.py`), which commits the Delta
table itself and reports the materialization and the check results back to the Dagster run.

The same code runs on a classic cluster (a SparkSession with a SparkContext) and on serverless compute
(Spark Connect only); `spark_connect.py` keeps the difference in one place.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from dagster_pipes import (
    PipesCliArgsParamsLoader,
    PipesEnvVarParamsLoader,
    PipesUnityCatalogVolumesContextLoader,
    PipesUnityCatalogVolumesMessageWriter,
    open_dagster_pipes,
)

MESSAGE_INTERVAL_SECONDS = 1.0  # how often log lines and reports reach the Dagster run
CLI_CONTEXT_ARGUMENT = "--dagster-pipes-context"


def params_loader():
    """A new job cluster gets the Pipes parameters as environment variables (`spark_env_vars`); an
    existing cluster and serverless, which have none to set, as task parameters (dagster-databricks)."""
    return PipesCliArgsParamsLoader() if CLI_CONTEXT_ARGUMENT in sys.argv else PipesEnvVarParamsLoader()


def main(package: str) -> None:
    with open_dagster_pipes(
        context_loader=PipesUnityCatalogVolumesContextLoader(),
        message_writer=PipesUnityCatalogVolumesMessageWriter(interval=MESSAGE_INTERVAL_SECONDS),
        params_loader=params_loader(),
    ) as pipes:
        apply_settings(pipes.extras)
        spark = spark_session(package)
        from fruit_assets.databricks.pipes.work import WORK

        pipes.log.info(f"{pipes.asset_key} on {'Spark Connect' if is_connect(spark) else 'classic Spark'} {spark.version}")
        WORK[pipes.asset_key](pipes, spark)


def is_connect(spark) -> bool:
    from fruit_assets.plumbing.spark_connect import is_connect as connect

    return connect(spark)


def apply_settings(extras: Mapping[str, Any]) -> None:
    """The host's settings (FRUIT_*, AWS region and endpoint) and the staged model's name, as this
    process's environment, before anything reads them; then the storage keys of the secret scope, if
    the settings file names one (never sent through Pipes)."""
    os.environ.update({name: str(value) for name, value in (extras.get("environment") or {}).items()})
    # The feature model resource reads the model the host staged (resources.FeatureModel.uses_staged_model).
    os.environ["FRUIT_DEPLOYMENT"] = "databricks_cluster"
    scope = extras.get("storage_secret_scope")
    if scope:
        dbutils = _dbutils()
        os.environ["AWS_ACCESS_KEY_ID"] = dbutils.secrets.get(scope["scope"], scope["access_key_key"])
        os.environ["AWS_SECRET_ACCESS_KEY"] = dbutils.secrets.get(scope["scope"], scope["secret_key_key"])


def _dbutils():
    try:  # classic clusters
        from pyspark.dbutils import DBUtils  # type: ignore[import-not-found]

        return DBUtils()
    except ImportError:  # serverless: https://docs.databricks.com/aws/en/dev-tools/sdk-python#use-databricks-utilities
        from databricks.sdk.runtime import dbutils  # type: ignore[import-not-found]

        return dbutils


def spark_session(package: str):
    """The task's session (classic, or Spark Connect on serverless), with the package given to its Python
    workers: the featurization UDF and the PCA's statistics run functions of `fruit_assets` there."""
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()
    if is_connect(spark):
        # No SparkContext on Connect: the zip is a session artifact, put on the workers' path.
        spark.addArtifacts(package, pyfile=True)
    else:
        spark.sparkContext.addPyFile(package)
    return spark
