"""The four assets: raw_images -> image_features -> pca_model -> reduced_features.

Thin Dagster wiring: the work is done by `catalog`, `ml.featurize` and `ml.pca`. The Spark assets take
the `step_launcher` resource so that a deployment can run them elsewhere (Databricks) by changing
resources only; locally it is None and they run in-process.

Checks are computed in the same Spark pass as the data they check (a separate check step would read the
features back and, on Databricks, launch another remote step), and reported as asset check results.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MetadataValue,
    Output,
    ResourceParam,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
    asset_check,
    AssetCheckExecutionContext,
)
from dagster_pyspark import PySparkResource
from pydantic import Field
from pyspark.sql import DataFrame as SparkDataFrame
from pyspark.sql import functions as F
from pyspark.storagelevel import StorageLevel

from fruit_assets import plots
from fruit_assets.delta_tables import Snapshot
from fruit_assets.incremental import FeaturizeResult
from fruit_assets.ml.pca import PcaResult
from fruit_assets.ml.featurize import read_bytes
from fruit_assets.resources import FeatureModel, ImageSource, weights_fingerprint
from fruit_assets.spark_progress import reporting_progress

GROUP = "fruit_features"
PROGRESS_EVERY_SECONDS = 10.0  # how often featurization logs images done and the rate
SCATTER_POINTS = 5000  # the scatter shows a sample: enough to see the structure, cheap to collect
FEATURE_DIM = 1280


def _table(frame: pd.DataFrame) -> MetadataValue:
    schema = TableSchema(columns=[TableColumn(name=str(name), type=str(dtype)) for name, dtype in frame.dtypes.items()])
    records = [TableRecord({key: _plain(value) for key, value in row.items()}) for row in frame.to_dict("records")]
    return MetadataValue.table(records=records, schema=schema)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _plot(context: AssetExecutionContext, name: str, png: bytes) -> dict:
    """Metadata showing a PNG plot in the UI (markdown with a data: URI, which Dagster renders), plus
    the same PNG stored beside the assets at <storage>/_plots/<asset>/<name>.png."""
    saved = plots.save_png(context.resources.io_manager.root(), context.asset_key.path[-1], name, png)
    return {name: MetadataValue.md(plots.markdown_image(png, name)), f"{name}_file": MetadataValue.path(saved.uri)}


CONTACT_SHEET_LABELS = 24  # the sheet is embedded in every materialization event: keep it small
SAMPLE_READERS = 16  # the contact sheet's images are read this many at a time
LABEL_TABLE_ROWS = 500  # so is the images-per-label table: with 100,000 labels it would weigh megabytes


@asset(group_name=GROUP, kinds={"python", "delta"})
def raw_images(context: AssetExecutionContext, images: ImageSource) -> Output[pd.DataFrame]:
    """Catalog of the image files under FRUIT_IMAGES_URI (<root>/<Label>/<file>, .jpg/.jpeg/.png)."""
    root = images.location()
    started = time.perf_counter()
    listing = images.list_images()
    seconds = time.perf_counter() - started
    if not listing.images.num_rows:
        raise ValueError(
            f"no images found under {root.uri} (FRUIT_IMAGES_URI): expected <root>/<Label>/<file>.jpg; "
            f"{listing.ignored} other file(s) ignored"
        )
    how = "as one flat listing" if listing.flat else f"{listing.folders} folders, {images.list_concurrency} at a time"
    context.log.info(f"listed {listing.images.num_rows} images under {root.uri} in {seconds:.1f} s ({how})")
    if listing.ignored:
        context.log.warning(
            f"ignored {listing.ignored} file(s) that are not images in a label folder, e.g. {list(listing.ignored_examples[:3])}"
        )
    catalog = listing.catalog()
    counts = catalog.groupby("label").size().rename("images").reset_index()
    samples = catalog[catalog.label.isin(sorted(counts.label)[:CONTACT_SHEET_LABELS])].groupby("label").head(3)
    # Two requests per image (HEAD, GET): one after the other, 72 images were 7 s at 50 ms per request.
    with ThreadPoolExecutor(SAMPLE_READERS) as pool:
        with_bytes = list(zip(samples.label, pool.map(read_bytes, samples.path)))
    return Output(
        catalog,
        metadata={
            **_plot(context, "sample_images", plots.contact_sheet(with_bytes)),
            "images_uri": MetadataValue.path(root.uri),
            "rows": len(catalog),
            "labels": len(counts),
            "images_per_label": _table(counts.head(LABEL_TABLE_ROWS)),
            "ignored_files": listing.ignored,
            "listing_seconds": round(seconds, 2),
        },
    )


@dataclass(frozen=True)
class _PreparedModel:
    payload: Any  # what the workers get by broadcast (see ml.featurize.prepare_model)
    fingerprint: str  # of the weights: the workers' model cache key, and what reuse is keyed on
    metadata: dict  # weights source and runtime, recorded in the materialization
    seconds: float


def _prepare_model(context: AssetExecutionContext, feature_model: FeatureModel) -> _PreparedModel:
    """Resolve the weights on the driver and prepare the model for the configured runtime (for
    onnxruntime: convert to ONNX once, then read it from the cache)."""
    from fruit_assets.ml.featurize import prepare_model
    from fruit_assets.ml.model import feature_extractor_weights

    source = feature_model.weights_source()
    described = source.describe()
    if not described["weights_meaningful"]:
        context.log.warning(f"featurizing with {described['weights_source']}: {described.get('weights_note', '')}")
    started = time.perf_counter()
    weights = feature_extractor_weights(source)
    fingerprint = weights_fingerprint(weights)
    payload, runtime = prepare_model(weights, fingerprint, feature_model.featurize_settings())
    seconds = time.perf_counter() - started
    if runtime.get("onnx_converted_now"):
        context.log.info(f"converted the model to ONNX in {runtime['onnx_model_seconds']} s, cached at {runtime['onnx_model_file']}")
    return _PreparedModel(payload, fingerprint, described | runtime, seconds)


def _fail_if_too_many_skipped(result: FeaturizeResult, max_skipped_fraction: float) -> None:
    """Raised before the output is yielded: nothing is written, the last good version stays."""
    if result.skipped_fraction > max_skipped_fraction:
        examples = "; ".join(f"{row.path}: {row.error}" for row in result.skipped.head(5).itertuples())
        raise Failure(
            description=f"{len(result.skipped)} of {result.catalogued} images ({result.skipped_fraction:.1%}) could "
            f"not be featurized, over max_skipped_fraction={max_skipped_fraction} (feature_model resource). "
            f"First ones: {examples}",
            metadata={"skipped": len(result.skipped), "skipped_fraction": result.skipped_fraction,
                      "skipped_images": _table(result.skipped)},
        )


def _features_metadata(result: FeaturizeResult, model: _PreparedModel, batch_size: int) -> dict:
    seconds = result.seconds["featurize"]
    return {
        "rows": result.rows,
        "featurized": result.featurized,
        "reused": result.reused,
        "removed": result.removed,  # stored rows removed: deleted images and the old rows of replaced ones
        "dropped": result.dropped,  # of those, deleted images
        "skipped": len(result.skipped),
        "skipped_images": _table(result.skipped) if len(result.skipped) else MetadataValue.text("none"),
        "plan": result.plan_reason,
        **model.metadata,
        "weights_fingerprint": model.fingerprint,
        "feature_dim": FEATURE_DIM,
        "partitions": result.partitions,
        "batch_size": batch_size,
        "model_setup_seconds": round(model.seconds, 2),
        "plan_seconds": result.seconds["plan"],
        "featurize_seconds": seconds,
        "throughput_images_per_s": round(result.featurized / seconds, 2) if result.featurized and seconds else 0.0,
    }


def _feature_checks(result: FeaturizeResult, max_skipped_fraction: float):
    yield AssetCheckResult(
        check_name="one_row_per_image",
        passed=bool(result.rows + len(result.skipped) == result.catalogued),
        metadata={"catalogued": result.catalogued, "with_features": result.rows, "skipped": len(result.skipped),
                  "skipped_fraction": round(result.skipped_fraction, 4), "max_skipped_fraction": max_skipped_fraction},
    )
    yield AssetCheckResult(
        check_name="vectors_are_1280_finite_floats",
        passed=bool(result.bad_vectors == 0),
        metadata={"bad_vectors": result.bad_vectors, "vectors_checked": result.featurized},
    )


@asset(
    group_name=GROUP,
    kinds={"spark", "onnx", "delta"},
    check_specs=[
        AssetCheckSpec("one_row_per_image", asset="image_features",
                       description="Every catalogued image has a feature row, or is listed as skipped with its reason."),
        AssetCheckSpec("vectors_are_1280_finite_floats", asset="image_features",
                       description="Every vector written by this run is 1280 finite floats (the others were checked when written)."),
    ],
)
def image_features(
    context: AssetExecutionContext,
    raw_images: pa.Table,
    feature_model: FeatureModel,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """MobileNetV2 (classification head removed) 1280-d features of every image, computed in Spark
    (runtime: ONNX Runtime by default, or a frozen TensorFlow graph; see the feature_model resource).

    Incremental: an image whose file (path, size, modification time) was featurized by the same
    weights keeps its stored vector and its data file; only new and replaced images go through the
    model, and only the data files that hold a deleted or replaced image are rewritten."""
    from fruit_assets.incremental import featurize_incremental
    from fruit_assets.ml.featurize import featurize

    spark = pyspark.spark_session
    model = _prepare_model(context, feature_model)
    settings = feature_model.featurize_settings()

    def featurize_rows(rows, partitions):
        return featurize(rows, model.payload, model.fingerprint, settings, feature_model.partitions or partitions)

    def progress(total):
        def log(done: int, total: int, seconds: float) -> None:
            context.log.info(f"featurizing: about {done} of {total} images done in {seconds:.0f} s ({done / seconds:.1f} images/s)")

        return reporting_progress(spark, total, log, PROGRESS_EVERY_SECONDS)

    stored = context.resources.io_manager.snapshot(context.asset_key)
    result = featurize_incremental(spark, raw_images, stored, featurize_rows, model.fingerprint, progress)
    try:
        context.log.info(
            f"{result.rows} of {result.catalogued} images have features: {result.featurized} featurized in "
            f"{result.seconds['featurize']:.1f} s, {result.reused} reused, {result.removed} stored row(s) removed, "
            f"{len(result.skipped)} skipped ({result.plan_reason})"
        )
        _fail_if_too_many_skipped(result, feature_model.max_skipped_fraction)
        yield Output(result.change, metadata=_features_metadata(result, model, settings.batch_size))
        yield from _feature_checks(result, feature_model.max_skipped_fraction)
    finally:
        result.cached.unpersist()


class PcaConfig(Config):
    k: int | None = Field(
        default=50, ge=1, le=FEATURE_DIM,
        description="Number of components (1..1280, and at most the number of images). Null: the smallest k reaching variance_target.",
    )
    variance_target: float = Field(
        default=0.95, gt=0, le=1,
        description="Fraction of variance to keep when k is null; with a fixed k, the check warns below it.",
    )
    max_k: int = Field(default=256, ge=1, le=FEATURE_DIM, description="Upper bound on k when choosing it from variance_target.")


@asset(
    group_name=GROUP,
    kinds={"spark", "numpy", "delta"},
    check_specs=[AssetCheckSpec("explained_variance_reaches_target", asset="pca_model")],
)
def pca_model(
    context: AssetExecutionContext,
    config: PcaConfig,
    image_features: Snapshot,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """PCA of the features: Spark sums the covariance's statistics, numpy decomposes it on the driver.
    Stored as a components table, the statistics, and a Spark ML PCAModel.

    Incremental: the statistics of the previous version are updated by the rows of the data files
    added to and removed from image_features since, when that can be proven; else a full pass."""
    from dataclasses import replace

    from fruit_assets.incremental import feature_statistics_since, provenance
    from fruit_assets.ml.pca import decompose

    started = time.perf_counter()
    try:
        previous = context.resources.io_manager.load_stored(context.asset_key, PcaResult)
    except FileNotFoundError:  # stored by an earlier release, without its statistics
        previous = None
    update = feature_statistics_since(
        pyspark.spark_session, image_features,
        previous.statistics if previous else None, previous.provenance if previous else {},
    )
    context.log.info(f"PCA statistics: {update.mode} ({update.reason}), {update.rows_read} feature rows read")
    statistics_seconds = time.perf_counter() - started
    result = replace(decompose(update.statistics, config.k, config.variance_target, config.max_k), provenance=provenance(image_features))
    cumulative = result.cumulative
    table = pd.DataFrame(
        {
            "component": np.arange(1, result.k + 1),
            "explained_variance": np.round(result.explained_variance, 6),
            "cumulative": np.round(cumulative, 6),
        }
    )
    kept = float(cumulative[-1])
    context.log.info(f"PCA: k={result.k} keeps {kept:.1%} of the variance of {result.rows} images")
    yield Output(
        result,
        metadata={
            **_plot(context, "explained_variance_plot",
                    plots.explained_variance_plot(result.explained_variance, result.k, config.variance_target)),
            "k": result.k,
            "k_chosen_by": "fixed k" if config.k is not None else f"variance_target {config.variance_target}",
            "variance_target": config.variance_target,
            "explained_variance_total": round(kept, 6),
            "explained_variance": _table(table),
            "rows": result.rows,
            "decomposition": "numpy.linalg.eigh of the covariance summed by Spark",
            "statistics_mode": update.mode,
            "statistics_reason": update.reason,
            "feature_rows_read": update.rows_read,
            "features_version": image_features.version,
            "statistics_seconds": round(statistics_seconds, 2),
            "decomposition_seconds": round(time.perf_counter() - started - statistics_seconds, 2),
        },
    )
    yield AssetCheckResult(
        check_name="explained_variance_reaches_target",
        passed=kept >= config.variance_target - 1e-9,
        severity=AssetCheckSeverity.WARN,
        description=f"{result.k} components keep {kept:.1%} of the variance (target {config.variance_target:.0%})",
        metadata={"k": result.k, "explained_variance_total": kept, "variance_target": config.variance_target},
    )


@asset_check(
    asset=pca_model,
    blocking=True,
    description="The stored components are orthonormal eigenvectors of the covariance of the stored "
    "statistics, with the explained variances they report, sorted, and the top k; the stored Spark ML "
    "model holds the same components. A failure stops reduced_features.",
)
def pca_model_is_an_exact_decomposition(context: AssetCheckExecutionContext) -> AssetCheckResult:
    from fruit_assets.ml.pca import PcaResult, verify

    io_manager = context.resources.io_manager
    stored = io_manager.load_stored(pca_model.key, PcaResult)
    verification = verify(stored.statistics, stored.components, stored.explained_variance)
    problems = list(verification.problems)
    spark_components = io_manager.stored_spark_components(pca_model.key)
    spark_difference = (
        float(np.abs(spark_components - stored.components).max())
        if spark_components.shape == stored.components.shape else float("inf")
    )
    if spark_difference > 0:
        problems.append(f"the Spark ML model's components differ from the components table by {spark_difference:.2e}")
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        description="; ".join(problems) or f"{stored.k} components verified against the covariance of {stored.rows} images",
        metadata={**verification.metadata(), "spark_model_difference": spark_difference, "k": stored.k},
    )


@asset(
    group_name=GROUP,
    kinds={"spark", "delta"},
    check_specs=[AssetCheckSpec("k_columns_and_same_rows", asset="reduced_features")],
)
def reduced_features(
    context: AssetExecutionContext,
    image_features: Snapshot,
    pca_model: PcaResult,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """The image features projected onto the PCA components: path, label, pca_features (k float32).
    One pass: read the features, project them in the Python workers, write; no shuffle."""
    from fruit_assets.ml.pca import project
    from fruit_assets.spark_delta import read_table

    k = pca_model.k
    features = read_table(pyspark.spark_session, image_features, columns=["path", "label", "features"])
    reduced = project(features, pca_model.components).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        stats = reduced.agg(
            F.count("*").alias("rows"),
            F.min(F.size("pca_features")).alias("min_k"),
            F.max(F.size("pca_features")).alias("max_k"),
        ).first()
        source_rows = image_features.rows
        sample = reduced.select("label", F.slice("pca_features", 1, 2).alias("xy")).limit(SCATTER_POINTS).toPandas()
        scatter = plots.pca_scatter_plot(np.stack(sample.xy) if len(sample) else np.zeros((0, 2)), list(sample.label))
        yield Output(
            reduced,
            metadata={"rows": stats["rows"], "k": k, **_plot(context, "pca_scatter_plot", scatter)},
        )
        yield AssetCheckResult(
            check_name="k_columns_and_same_rows",
            passed=bool(stats["rows"] == source_rows and stats["min_k"] == k and stats["max_k"] == k),
            metadata={"rows": stats["rows"], "image_features_rows": source_rows, "k": k},
        )
    finally:
        reduced.unpersist()
