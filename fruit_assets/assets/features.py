"""image_features: the model spec's features of every image (MobileNetV2 by default), computed in Spark,
incrementally."""

import functools
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Failure,
    MetadataValue,
    Output,
    ResourceParam,
    asset,
)
from dagster_pyspark import PySparkResource

from fruit_assets.assets.metadata import table
from fruit_assets.ml.featurize import Featurizer, PreparedModel, WorkerModelSetup
from fruit_assets.ml.spec import DEFAULT_SPEC
from fruit_assets.pipeline.spark_work import FeaturizeResult, featurize_incremental
from fruit_assets.plumbing.spark_progress import reporting_progress
from fruit_assets.resources import FeatureModel
from fruit_assets.settings import resolved
from fruit_assets.storage.resource import Storage

GROUP = "fruit_features"
PROGRESS_EVERY_SECONDS = 10.0  # how often featurization logs images done and the rate
CHECKS = [
    AssetCheckSpec("one_row_per_image", asset="image_features",
                   description="Every catalogued image has a feature row, or is listed as skipped with its reason."),
    AssetCheckSpec("vectors_are_finite_floats_of_the_model_dimension", asset="image_features",
                   description="Every vector written by this run is finite floats, as many as the model spec's output "
                   f"dimension ({DEFAULT_SPEC.output_dim} for {DEFAULT_SPEC.name}); the others were checked when written."),
]


@asset(group_name=GROUP, kinds={"spark", "onnx", "delta"}, check_specs=CHECKS)
def image_features(
    context: AssetExecutionContext,
    raw_images: pa.Table,
    feature_model: FeatureModel,
    storage: Storage,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """The model spec's features of every image (MobileNetV2's 1280 by default), computed in Spark
    (runtime: ONNX Runtime by default, or a frozen TensorFlow graph; see the feature_model resource).

    Incremental: an image whose file (path, size, modification time) was featurized by the same weights
    and model spec keeps its stored vector and its data file; only new and replaced images go through the
    model, and only the data files that hold a deleted or replaced image are rewritten. Up to 64 images
    to featurize (an upload, usually) run on the driver, with the same runtime settings: a Spark job
    would cost more than they do."""
    spark, settings = pyspark.spark_session, feature_model.featurize_settings()
    # Resolved and converted here, or on a Databricks cluster the model the host staged (resources/__init__.py).
    model = feature_model.feature_extractor()
    if not model.meaningful:
        context.log.warning(f"featurizing with {model.metadata['weights_source']}: {model.metadata.get('weights_note', '')}")
    featurizer = Featurizer(model, settings, WorkerModelSetup(spark), feature_model.partitions)
    stored = storage.snapshot(context.asset_key)
    progress = functools.partial(logged_progress, spark, context.log.info)
    max_skipped_fraction = resolved(feature_model.max_skipped_fraction)
    with featurize_incremental(spark, raw_images, stored, featurizer, progress=progress) as result:
        context.log.info(summary(result))
        refuse_too_many_skipped(result, max_skipped_fraction)
        yield Output(result.change, metadata=features_metadata(result, model, settings.batch_size, featurizer.workers_setup))
        yield from feature_checks(result, max_skipped_fraction, model.spec.output_dim)


def logged_progress(spark, log: Callable[[str], None], total: int):
    """Featurization's progress in the run's log while the Spark job runs."""

    def report(done: int, total: int, seconds: float) -> None:
        log(f"featurizing: about {done} of {total} images done in {seconds:.0f} s ({done / seconds:.1f} images/s)")

    return reporting_progress(spark, total, report, PROGRESS_EVERY_SECONDS, note=log)


def summary(result: FeaturizeResult) -> str:
    return (
        f"{result.rows} of {result.catalogued} images have features: {result.featurized} featurized "
        f"{'on the driver' if result.where == 'driver' else 'in Spark'} in {result.seconds['featurize']:.1f} s, "
        f"{result.reused} reused, {result.removed} stored row(s) removed, "
        f"{len(result.skipped)} skipped ({result.plan_reason})"
    )


def refuse_too_many_skipped(result: FeaturizeResult, max_skipped_fraction: float) -> None:
    """Raised before the output is yielded: nothing is written, the last good version stays."""
    if result.skipped_fraction <= max_skipped_fraction:
        return
    examples = "; ".join(f"{row.path}: {row.error}" for row in result.skipped.head(5).itertuples())
    raise Failure(
        description=f"{len(result.skipped)} of {result.catalogued} images ({result.skipped_fraction:.1%}) could "
        f"not be featurized, over max_skipped_fraction={max_skipped_fraction} (feature_model resource). "
        f"First ones: {examples}",
        metadata={"skipped": len(result.skipped), "skipped_fraction": result.skipped_fraction,
                  "skipped_images": table(result.skipped)},
    )


def features_metadata(result: FeaturizeResult, model: PreparedModel, batch_size: int,
                      workers_setup: WorkerModelSetup | None = None) -> dict:
    seconds = result.seconds["featurize"]
    # Of featurize_seconds, about this long went to the workers building their model (in parallel).
    worker_setup = round(min(workers_setup.per_worker(), seconds), 2) if workers_setup else 0.0
    running = seconds - worker_setup
    if workers_setup is None or workers_setup.measured:
        workers = {
            "worker_model_setup_seconds": worker_setup,  # per worker that built its model (0: all kept theirs)
            "workers_built_model": workers_setup.built() if workers_setup else 0,
        }
    else:  # Spark Connect: no accumulators
        workers = {"worker_model_setup_note": workers_setup.NOT_MEASURED}
    return {
        "rows": result.rows,
        "featurized": result.featurized,
        "reused": result.reused,
        "removed": result.removed,  # stored rows removed: deleted images and the old rows of replaced ones
        "dropped": result.dropped,  # of those, deleted images
        "skipped": len(result.skipped),
        "skipped_images": table(result.skipped) if len(result.skipped) else MetadataValue.text("none"),
        "plan": result.plan_reason,
        **model.metadata,
        "weights_fingerprint": model.fingerprint,  # of the weights and the model spec
        "featurized_on": result.where,  # "driver": a few images, without a Spark job
        "partitions": result.partitions,
        "batch_size": batch_size,
        "model_setup_seconds": round(model.seconds, 2),
        "plan_seconds": result.seconds["plan"],
        "featurize_seconds": seconds,
        "throughput_images_per_s": round(result.featurized / seconds, 2) if result.featurized and seconds else 0.0,
        **workers,
        # The model running, once the workers have it: what the rate is on a larger set.
        "throughput_after_model_setup_images_per_s": round(result.featurized / running, 2) if result.featurized and running > 0 else 0.0,
    }


def feature_checks(result: FeaturizeResult, max_skipped_fraction: float, feature_dim: int):
    yield AssetCheckResult(
        check_name="one_row_per_image",
        passed=bool(result.rows + len(result.skipped) == result.catalogued),
        metadata={"catalogued": result.catalogued, "with_features": result.rows, "skipped": len(result.skipped),
                  "skipped_fraction": round(result.skipped_fraction, 4), "max_skipped_fraction": max_skipped_fraction},
    )
    yield AssetCheckResult(
        check_name="vectors_are_finite_floats_of_the_model_dimension",
        passed=bool(result.bad_vectors == 0),
        metadata={"bad_vectors": result.bad_vectors, "vectors_checked": result.featurized, "feature_dim": feature_dim},
    )
