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
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from dagster_pipes import (
    PipesCliArgsParamsLoader,
    PipesDefaultLogWriter,
    PipesDefaultLogWriterChannel,
    PipesEnvVarParamsLoader,
    PipesLogWriter,
    PipesParams,
    PipesUnityCatalogVolumesContextLoader,
    PipesUnityCatalogVolumesMessageWriter,
    open_dagster_pipes,
)

MESSAGE_INTERVAL_SECONDS = 1.0  # how often log lines and reports reach the Dagster run, at most
CLI_CONTEXT_ARGUMENT = "--dagster-pipes-context"
INTERVAL_ARGUMENT = "--message-interval"  # the host's poll interval, a task parameter (host.task_spec)


def params_loader():
    """A new job cluster gets the Pipes parameters as environment variables (`spark_env_vars`); an
    existing cluster and serverless, which have none to set, as task parameters (dagster-databricks)."""
    return PipesCliArgsParamsLoader() if CLI_CONTEXT_ARGUMENT in sys.argv else PipesEnvVarParamsLoader()


def message_interval(argv: Sequence[str]) -> float:
    """How often the task writes its messages and forwards its stdout and stderr: as often as the host
    reads them (its poll interval, given as a task parameter), at most MESSAGE_INTERVAL_SECONDS apart."""
    if INTERVAL_ARGUMENT not in argv:
        return MESSAGE_INTERVAL_SECONDS
    return min(MESSAGE_INTERVAL_SECONDS, float(argv[argv.index(INTERVAL_ARGUMENT) + 1]))


class _StdioChannel(PipesDefaultLogWriterChannel):
    """Forwards stdout or stderr every `interval`, and waits as long for `tee` when it closes: dagster-pipes
    (1.13.27) waits 1 s there whatever the interval, then polls its copy every interval until 1 s after."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.WAIT_FOR_TEE_SECONDS = self.interval


class _StdioWriter(PipesDefaultLogWriter):
    def make_channel(self, params: PipesParams, stream) -> PipesDefaultLogWriterChannel:
        return _StdioChannel(message_channel=self.message_channel, stream=stream,
                             name=f"PipesDefaultLogWriterChannel({stream})", interval=self.interval)


class MessageWriter(PipesUnityCatalogVolumesMessageWriter):
    """dagster-pipes' writer for a Unity Catalog volume, forwarding stdout and stderr at its own interval.

    Its `open` is the parent's (dagster-pipes 1.13.27, `PipesBlobStoreMessageWriter.open`), with one
    change: the stdio log writer gets this writer's interval, where the parent's keeps its 1 s default.
    Closing that writer cost 4-5 s of each task against the emulator: two streams, each a 1 s wait for
    `tee` and 1-2 s more of polling (py-spy, 2-core AMD EPYC Zen 4). With a host that polls every 0.5 s the
    whole close took 2.6 s; the tests poll every 0.2 s. With the 1 s default, nothing changes."""

    @contextmanager
    def open(self, params: PipesParams) -> Iterator[Any]:
        channel = self.make_channel(params)
        with channel.buffered_upload_loop():
            if params.get(self.INCLUDE_STDIO_IN_MESSAGES_KEY):
                with _StdioWriter(message_channel=channel, interval=self.interval).open(
                        params.get(PipesLogWriter.LOG_WRITER_KEY, {})):
                    yield channel
            else:
                yield channel


class Terminated(SystemExit):
    """The task got SIGTERM: its run was cancelled, or its cluster is going away."""


def _terminated(signum, frame) -> None:
    raise Terminated(f"the task got signal {signal.Signals(signum).name}: its run was cancelled, or its cluster is going away")


def main(package: str) -> None:
    # Python dies at once on SIGTERM by default, and the Pipes session with it: the host then hears
    # nothing more and waits 10 s for messages that cannot come (dagster's reader, after a cancel). Raised
    # here instead, it closes the session, which tells the host why.
    signal.signal(signal.SIGTERM, _terminated)
    with open_dagster_pipes(
        context_loader=PipesUnityCatalogVolumesContextLoader(),
        message_writer=MessageWriter(interval=message_interval(sys.argv)),
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
