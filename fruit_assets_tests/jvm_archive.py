"""A class-data-sharing archive of Spark's classes, for the tests' JVMs.

Each test JVM (the workers' sessions, CLI runs, the workspace emulator's tasks, dagster dev's runs) lives
for seconds, and most of its start-up goes into loading and verifying Spark's classes from the jars. A
dynamic AppCDS archive (JDK 13+: `-XX:ArchiveClassesAtExit`, then `-XX:SharedArchiveFile`) holds them
parsed and verified. Measured on 2 cores (AMD EPYC, Zen 4, AVX-512): a session that starts, runs two small
jobs and stops took 10.2 CPU-seconds of its JVM without the archive and 5.0 with it (wall 10.5 -> 5.6 s).
The archive changes where classes come from, not what they do.

The JVM takes the archive only when the class path matches the one it was made with (the same pyspark
jars); otherwise, or while the file does not exist yet, it runs without it. `-Xlog:cds=off` keeps those
cases silent, as a test run must be (the JVM would print a warning).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Runs in a child process: a session with the pipeline's settings, doing what the pipeline's Spark code
# does (Arrow conversions, a pandas UDF, an aggregation, the Delta data source), so that those classes
# are loaded when the JVM exits and writes the archive.
_WORKLOAD = """
import sys
import pandas as pd
from pyspark.sql import SparkSession
from fruit_assets.resources import local_spark_config
from fruit_assets.storage import delta, resolve, spark_io

builder = SparkSession.builder
for key, value in (local_spark_config("local[2]") | {"spark.ui.enabled": "false"}).items():
    builder = builder.config(key, value)
spark = builder.getOrCreate()
frame = spark.createDataFrame(pd.DataFrame({"path": [f"p{i}" for i in range(64)], "x": [float(i) for i in range(64)]}))
frame = frame.mapInPandas(lambda batches: (b.assign(x=b.x * 2) for b in batches), frame.schema)
frame.groupBy((frame.x % 3).alias("k")).count().toPandas()
location = resolve(sys.argv[1])  # a Delta table folder
spark_io.commit_frame(frame.repartition(2), location, None, {})
spark_io.read_table(spark, delta.snapshot(location)).toPandas()
gateway, process = spark.sparkContext._gateway, spark.sparkContext._gateway.proc
spark.stop()
gateway.shutdown()
process.stdin.close()  # the JVM exits normally (and writes the archive) when its stdin closes
sys.exit(process.wait())
"""


def java_options(archive: Path) -> str:
    """The JVM options that use `archive` when it exists and matches, and are silent when not."""
    return f"-XX:SharedArchiveFile={archive} -Xlog:cds=off -Xlog:cds+dynamic=off"


def build(archive: Path, base_options: str, timeout: float = 300) -> None:
    """Write the archive (atomically: a JVM that starts meanwhile runs without it)."""
    partial = archive.with_name(f".{archive.name}.{os.getpid()}.partial")
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, SPARK_LOCAL_IP="127.0.0.1",
               JDK_JAVA_OPTIONS=f"{base_options} -XX:ArchiveClassesAtExit={partial} -Xlog:cds=off -Xlog:cds+dynamic=off")
    table = archive.with_name(f"{archive.name}.table")
    done = subprocess.run([sys.executable, "-c", _WORKLOAD, str(table)], env=env, capture_output=True, text=True, timeout=timeout)
    shutil.rmtree(table, ignore_errors=True)
    if done.returncode != 0 or not partial.exists():
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building the JVM class archive failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    os.replace(partial, archive)
