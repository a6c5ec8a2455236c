"""Progress of a Spark action, reported from the driver while it runs.

Spark's status tracker counts finished tasks per job group; the action's work (here: images) is
estimated from the fraction of finished tasks, so the estimate is as fine as the partitioning. No
Dagster here: the caller passes a `report(done, total, seconds)` callback.

Spark Connect (serverless, standard access mode) has neither job groups nor a status tracker (both
belong to the `SparkContext`): there the body's actions run under a job tag (`spark.addTag`, which
`spark.interruptTag` can cancel), and no progress is reported (`PROGRESS_ON_CONNECT` says so once).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pyspark.sql import SparkSession

from fruit_assets.plumbing.spark_connect import is_connect

PROGRESS_ON_CONNECT = (
    "progress is not reported on Spark Connect (serverless, standard access mode): it has no status tracker; "
    "the actions run under the job tag {tag}"
)


def _task_counts(spark: SparkSession, group: str) -> tuple[int, int] | None:
    """Finished and total tasks of the group's latest submitted stage while it runs, else None.

    The latest stage is the one doing the work (featurizing) once the short stages before it
    (reading, shuffling; with adaptive execution each runs as a job of its own) are done; between
    stages, and after the last one, there is nothing to report."""
    tracker = spark.sparkContext.statusTracker()
    stages = [
        stage
        for job_id in tracker.getJobIdsForGroup(group)
        for job in [tracker.getJobInfo(job_id)] if job
        for stage_id in job.stageIds
        for stage in [tracker.getStageInfo(stage_id)] if stage is not None
    ]
    if not stages:
        return None
    latest = max(stages, key=lambda stage: stage.stageId)
    if latest.numCompletedTasks >= latest.numTasks:
        return None
    return latest.numCompletedTasks, latest.numTasks


@contextmanager
def reporting_progress(
    spark: SparkSession,
    work: int,
    report: Callable[[int, int, float], None],
    every_seconds: float = 10.0,
    note: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Run the body's Spark actions in a job group; every `every_seconds`, call
    `report(estimated units of work done, work, seconds so far)` until the body ends.

    On Spark Connect: the body's actions run under a job tag, nothing is reported, and `note` (if
    given) is told why, once."""
    group = f"fruit-progress-{uuid.uuid4().hex[:8]}"
    if is_connect(spark):
        with _tagged(spark, group):
            if note is not None:
                note(PROGRESS_ON_CONNECT.format(tag=group))
            yield
        return
    with _job_group_polled(spark, group, work, report, every_seconds):
        yield


@contextmanager
def _job_group_polled(
    spark: SparkSession, group: str, work: int, report: Callable[[int, int, float], None], every_seconds: float
) -> Iterator[None]:
    """`reporting_progress` on classic Spark: the body's actions in job group `group`, which a thread
    polls until the body ends."""
    spark.sparkContext.setJobGroup(group, "fruit_assets", interruptOnCancel=True)
    stop = threading.Event()
    thread = threading.Thread(
        target=_poll, args=(spark, group, work, report, every_seconds, stop), name=group, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every_seconds + 1)
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)  # type: ignore[arg-type]  # None unsets it


def _poll(
    spark: SparkSession,
    group: str,
    work: int,
    report: Callable[[int, int, float], None],
    every_seconds: float,
    stop: threading.Event,
) -> None:
    """Every `every_seconds` until `stop` is set, report the work done so far, estimated from the
    job group's tasks; never a figure smaller than the last."""
    started = time.perf_counter()
    last = -1
    while not stop.wait(every_seconds):
        counts = _task_counts(spark, group)
        if counts is None:
            continue
        done = round(work * counts[0] / counts[1]) if counts[1] else 0
        if done > last:
            report(done, work, time.perf_counter() - started)
            last = done


@contextmanager
def _tagged(spark, tag: str) -> Iterator[None]:
    """The body's actions under a Spark Connect job tag (this thread's), removed afterwards."""
    spark.addTag(tag)
    try:
        yield
    finally:
        spark.removeTag(tag)
