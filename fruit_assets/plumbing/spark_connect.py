"""What differs between classic Spark and Spark Connect, each behind one small function.

Serverless compute and Unity Catalog standard (shared) access mode run Spark Connect: the session is a
client of a remote server, with no `SparkContext`, no RDD API, no broadcast variables and no
accumulators (`spark.sparkContext` raises there). The pipeline's Spark code is written against the
DataFrame API that both have; the few things that only classic Spark offers are asked for here, with
a Connect path that needs none of them:
- `default_parallelism`: classic reads `sparkContext.defaultParallelism`; Connect measures it with a
  tiny DataFrame job (`spark.range` is split into that many partitions);
- `master`: `spark.master`, read from the session's configuration on both;
- `ui_url`: the Spark UI's address on classic; none on Connect (the server's UI is not ours).
Elsewhere: `ml/featurize.py` (the model reaches the workers in the UDF's closure; the workers' model
set-up time is measured by accumulators on classic only), `ml/pca.py` (statistics summed by DataFrame
aggregation; the Spark ML `PCAModel` is built on classic only), `plumbing/spark_progress.py` (job groups and the
status tracker on classic, a job tag on Connect).

No Dagster here.
"""

from __future__ import annotations

import re


def is_connect(spark) -> bool:
    """Whether `spark` is a Spark Connect session (pyspark's `pyspark.sql.connect` client, also what
    Databricks serverless and standard access mode hand out), not a classic one. Decided by the
    session's class, not by `pyspark.sql.utils.is_remote()`, which is one flag for the whole process."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def master(spark) -> str:
    """The session's master URL (`local[2]`, `spark://...`), or "" where the server does not say."""
    try:
        return spark.conf.get("spark.master", None) or ""
    except Exception:  # a Connect server may refuse to show a static setting
        return ""


def is_local(spark) -> bool:
    """Whether every Spark process runs on this machine (a local master)."""
    return master(spark).startswith("local")


_LOCAL_CORES = re.compile(r"^local(?:\[(\d+|\*)(?:,\s*\d+)?\])?$")


def default_parallelism(spark) -> int:
    """Spark's default parallelism (on a local master: its cores): classic asks the SparkContext. On
    Connect, `local` and `local[N]` say it in the URL; otherwise (`local[*]` counts the server's cores,
    not ours; a cluster) one small job counts the partitions that `spark.range` is split into, which is
    `defaultParallelism` unless `spark.sql.leafNodeDefaultParallelism` says otherwise (then that, which
    is what a DataFrame job gets)."""
    if not is_connect(spark):
        return spark.sparkContext.defaultParallelism
    match = _LOCAL_CORES.match(master(spark).strip())
    if match and match.group(1) != "*":
        return int(match.group(1) or 1)
    from pyspark.sql import functions as F

    partitions = spark.range(0, 1 << 16).select(F.spark_partition_id().alias("partition"))
    [row] = partitions.agg(F.max("partition").alias("last")).collect()
    return int(row["last"]) + 1


def ui_url(spark) -> str | None:
    """The Spark UI's address on classic Spark; None on Connect (the server's UI, if any, is not ours)."""
    if is_connect(spark):
        return None
    return spark.sparkContext.uiWebUrl
