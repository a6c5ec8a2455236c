"""What the Spark-Connect-safe code costs on classic Spark (issue 24; results: BENCHMARKS.md, "Spark Connect").

    .venv/bin/python -m benchmarks.spark_connect ship [PAYLOAD_FILE] [--tasks 8] [--runs 16]
    .venv/bin/python -m benchmarks.spark_connect statistics [--rows 4000] [--runs 5]

- ship: seconds per job of a scalar-iterator pandas UDF that reads a payload (default: 14 MB of random
  bytes; pass the ONNX model file for the real one) which reaches the workers by `sc.broadcast` (what
  featurization did) or in the UDF's closure (what it does now, on classic Spark and Spark Connect),
  and with no payload; interleaved runs on local[2], the first one dropped.
- statistics: the PCA statistics of random rows by the RDD `treeReduce` the pipeline used before (a
  copy below) and by `ml.pca.feature_statistics` (DataFrame operations), on 2 and 16 partitions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd


def _session():
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").config(
        "spark.ui.showConsoleProgress", "false"
    ).getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def ship(args) -> None:
    from pyspark.sql.functions import pandas_udf

    payload = Path(args.payload).read_bytes() if args.payload else np.random.default_rng(0).bytes(14_000_000)
    spark = _session()
    frame = spark.range(0, args.tasks * 10, numPartitions=args.tasks)

    def none():
        @pandas_udf("long")  # type: ignore[call-overload]
        def f(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            for batch in batches:
                yield batch * 0 + 1

        return f

    def by_broadcast():
        shipped = spark.sparkContext.broadcast(payload)

        @pandas_udf("long")  # type: ignore[call-overload]
        def f(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            size = len(shipped.value)
            for batch in batches:
                yield batch * 0 + size

        return f

    def by_closure():
        @pandas_udf("long")  # type: ignore[call-overload]
        def f(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
            size = len(payload)
            for batch in batches:
                yield batch * 0 + size

        return f

    times: dict[str, list[float]] = {"no payload": [], "sc.broadcast": [], "closure": []}
    for _ in range(args.runs):
        for name, make in zip(times, (none, by_broadcast, by_closure), strict=True):
            started = time.perf_counter()
            assert len(frame.select(make()("id")).collect()) == args.tasks * 10
            times[name].append(time.perf_counter() - started)
    print(f"payload {len(payload) / 1e6:.1f} MB, {args.tasks} tasks per job, seconds per job (median, min, max):")
    for name, values in times.items():
        values = values[1:]
        print(f"  {name:13s} {statistics.median(values):.3f} {min(values):.3f} {max(values):.3f}")
    spark.stop()


def tree_reduce_statistics(features, column: str = "features", dimensions: int = 1280):
    """`ml.pca.feature_statistics` before issue 24: per-partition numpy sums, added by an RDD treeReduce."""
    import pyarrow as pa

    from fruit_assets.ml.pca import FeatureStatistics, vectors_of

    def partial(batches):
        total = FeatureStatistics.zeros(dimensions)
        for batch in batches:
            total = total + FeatureStatistics.of(vectors_of(batch.column(column), dimensions))
        yield pa.RecordBatch.from_pydict({"rows": [total.rows], "sums": [total.sums.tobytes()], "gram": [total.gram.tobytes()]})

    def decode(row):
        return FeatureStatistics(
            row.rows,
            np.frombuffer(row.sums, dtype=np.float64).copy(),
            np.frombuffer(row.gram, dtype=np.float64).reshape(dimensions, dimensions).copy(),
        )

    partials = features.select(column).mapInArrow(partial, "rows long, sums binary, gram binary")
    return partials.rdd.map(decode).treeReduce(lambda a, b: a + b, depth=2)


def statistics_benchmark(args) -> None:
    from fruit_assets.ml.pca import FeatureStatistics, feature_statistics

    spark = _session()
    x = np.random.default_rng(0).standard_normal((args.rows, 1280)).astype(np.float32)
    reference = FeatureStatistics.of(x)
    for partitions in (2, 16):
        frame = spark.createDataFrame(pd.DataFrame({"features": list(x)}), "features array<float>").repartition(partitions).cache()
        frame.count()
        times: dict[str, list[float]] = {"treeReduce": [], "DataFrame": []}
        for _ in range(args.runs):
            for name, compute in zip(times, (tree_reduce_statistics, feature_statistics), strict=True):
                started = time.perf_counter()
                result = compute(frame)
                times[name].append(time.perf_counter() - started)
                error = np.abs(result.gram - reference.gram).max() / np.abs(reference.gram).max()
                assert error < 1e-12, (name, error)
        medians = ", ".join(f"{name} {statistics.median(values[1:]):.2f} s" for name, values in times.items())
        print(f"{args.rows} rows, {partitions} partitions: {medians} (median of the last {args.runs - 1})")
        frame.unpersist()
    spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    shipping = commands.add_parser("ship")
    shipping.add_argument("payload", nargs="?")
    shipping.add_argument("--tasks", type=int, default=8)
    shipping.add_argument("--runs", type=int, default=16)
    sums = commands.add_parser("statistics")
    sums.add_argument("--rows", type=int, default=4000)
    sums.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    ship(args) if args.command == "ship" else statistics_benchmark(args)


if __name__ == "__main__":
    main()
