"""Progress of a running Spark action, as image_features logs it."""

import time

from pyspark.sql import functions as F
from pyspark.sql.functions import udf

from fruit_assets.plumbing.spark_progress import reporting_progress


def test_progress_is_reported_while_the_action_runs(spark):
    @udf("long")
    def slow(value):
        time.sleep(0.1)
        return value

    reports = []
    frame = spark.range(0, 80, numPartitions=8).select(slow(F.col("id")).alias("id"))
    with reporting_progress(spark, 80, lambda done, total, seconds: reports.append((done, total, seconds)), every_seconds=0.3):
        rows = frame.collect()
    assert len(rows) == 80
    done = [d for d, _, _ in reports]
    assert any(0 < d < 80 for d in done), reports  # seen mid-way, not only at the end
    assert done == sorted(set(done)) and all(total == 80 for _, total, _ in reports)
    assert all(seconds > 0 for _, _, seconds in reports)
    # The job group is cleared afterwards: later actions are not counted as this one's.
    assert spark.sparkContext.getLocalProperty("spark.jobGroup.id") is None
