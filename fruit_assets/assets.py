"""The four assets: raw_images -> image_features -> pca_model -> reduced_features.

Thin Dagster wiring: the work is done by `catalog`, `ml.featurize` and `ml.pca`. The Spark assets take
the `step_launcher` resource so that a deployment can run them elsewhere (Databricks) by changing
resources only; locally it is None and they run in-process.

Checks are computed in the same Spark pass as the data they check (a separate check step would read the
features back and, on Databricks, launch another remote step), and reported as asset check results.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
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
)
from dagster_pyspark import PySparkResource
from pydantic import Field
from pyspark.ml.feature import PCAModel
from pyspark.sql import DataFrame as SparkDataFrame
from pyspark.sql import functions as F
from pyspark.storagelevel import StorageLevel

from fruit_assets import plots
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


@asset(group_name=GROUP, kinds={"python", "parquet"})
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


@asset(
    group_name=GROUP,
    kinds={"spark", "tensorflow", "parquet"},
    check_specs=[
        AssetCheckSpec("one_row_per_image", asset="image_features",
                       description="Every catalogued image has a feature row, or is listed as skipped with its reason."),
        AssetCheckSpec("vectors_are_1280_finite_floats", asset="image_features"),
    ],
)
def image_features(
    context: AssetExecutionContext,
    raw_images: SparkDataFrame,
    feature_model: FeatureModel,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """MobileNetV2 (classification head removed) 1280-d features of every image, computed in Spark.

    Incremental: an image whose file (path, size, modification time) was featurized by the same
    weights in the stored version keeps its vector; only new and changed images go through the
    model, and images no longer catalogued are dropped."""
    from fruit_assets.ml.featurize import FeaturizeSettings, default_partitions, featurize, plan_incremental
    from fruit_assets.ml.model import feature_extractor_weights

    source = feature_model.weights_source()
    described = source.describe()
    started = time.perf_counter()
    weights = feature_extractor_weights(source)
    model_seconds = time.perf_counter() - started
    fingerprint = weights_fingerprint(weights)
    if not described["weights_meaningful"]:
        context.log.warning(f"featurizing with {described['weights_source']}: {described.get('weights_note', '')}")

    catalog = raw_images.select("path", "label", "size_bytes", "modified_at")
    previous = context.resources.io_manager.load_stored(context.asset_key, SparkDataFrame)
    plan = plan_incremental(catalog, previous, fingerprint)
    to_featurize = plan.todo.count()
    partitions = feature_model.partitions or default_partitions(pyspark.spark_session, to_featurize)
    settings = FeaturizeSettings(
        batch_size=feature_model.batch_size, tf_intra_op_threads=feature_model.tf_intra_op_threads
    )
    results = featurize(plan.todo, weights, fingerprint, settings, partitions).withColumn("reused", F.lit(False))
    if plan.reused is not None:
        reused = plan.reused.withColumn("error", F.lit(None).cast("string")).withColumn("reused", F.lit(True))
        results = results.unionByName(reused)
    results = results.withColumn("weights_fingerprint", F.lit(fingerprint)).persist(StorageLevel.MEMORY_AND_DISK)
    def log_progress(done: int, total: int, seconds: float) -> None:
        context.log.info(f"featurizing: about {done} of {total} images done in {seconds:.0f} s ({done / seconds:.1f} images/s)")

    try:
        started = time.perf_counter()
        finite = F.forall("features", lambda x: ~F.isnan(x) & (F.abs(x) < float("inf")))
        with reporting_progress(pyspark.spark_session, to_featurize, log_progress, PROGRESS_EVERY_SECONDS):
            stats = results.agg(
                F.count("*").alias("rows"),
                F.count("features").alias("with_features"),
                F.sum(F.when(~F.col("reused") & F.col("features").isNotNull(), 1).otherwise(0)).alias("featurized"),
                F.sum(F.when(F.col("features").isNotNull() & ((F.size("features") != FEATURE_DIM) | ~finite), 1).otherwise(0)).alias("bad_vectors"),
            ).first()
        seconds = time.perf_counter() - started
        dropped = plan.dropped.count() if plan.dropped is not None else 0
        skipped = results.where(F.col("error").isNotNull()).select("path", "label", "error").toPandas()
        featurized, rows, catalog_rows = stats["featurized"] or 0, stats["with_features"], stats["rows"]
        reused_count = rows - featurized
        context.log.info(
            f"{rows} of {catalog_rows} images have features: "
            f"{featurized} featurized in {seconds:.1f} s, {reused_count} reused, {dropped} dropped, {len(skipped)} skipped"
        )

        rate = len(skipped) / catalog_rows if catalog_rows else 0.0
        if rate > feature_model.max_skipped_fraction:
            examples = "; ".join(f"{row.path}: {row.error}" for row in skipped.head(5).itertuples())
            # Raised before the output is yielded: nothing is written, the last good version stays.
            raise Failure(
                description=f"{len(skipped)} of {catalog_rows} images ({rate:.1%}) could not be featurized, "
                f"over max_skipped_fraction={feature_model.max_skipped_fraction} (feature_model resource). "
                f"First ones: {examples}",
                metadata={"skipped": len(skipped), "skipped_fraction": rate, "skipped_images": _table(skipped)},
            )

        # Reused rows come out of a join: up to spark.sql.shuffle.partitions (200) partitions of a few
        # rows each. Written as they are, every incremental run would store that many tiny files, and
        # every later read would pay for them. Coalescing reads the cached rows, so it does not narrow
        # the featurization itself.
        written_partitions = default_partitions(pyspark.spark_session, catalog_rows)
        yield Output(
            results.where(F.col("error").isNull())
            .select("path", "label", "features", "size_bytes", "modified_at", "weights_fingerprint")
            .coalesce(written_partitions),
            metadata={
                "rows": rows,
                "featurized": featurized,
                "reused": reused_count,
                "dropped": dropped,
                "skipped": len(skipped),
                "skipped_images": _table(skipped) if len(skipped) else MetadataValue.text("none"),
                **described,
                "weights_fingerprint": fingerprint,
                "feature_dim": FEATURE_DIM,
                "partitions": partitions,
                "batch_size": feature_model.batch_size,
                "featurize_seconds": round(seconds, 2),
                "model_setup_seconds": round(model_seconds, 2),
                "throughput_images_per_s": round(featurized / seconds, 2) if featurized and seconds else 0.0,
            },
        )
        yield AssetCheckResult(
            check_name="one_row_per_image",
            passed=bool(rows + len(skipped) == catalog_rows),
            metadata={"catalogued": catalog_rows, "with_features": rows, "skipped": len(skipped),
                      "skipped_fraction": round(rate, 4), "max_skipped_fraction": feature_model.max_skipped_fraction},
        )
        yield AssetCheckResult(
            check_name="vectors_are_1280_finite_floats",
            passed=bool(stats["bad_vectors"] == 0),
            metadata={"bad_vectors": stats["bad_vectors"]},
        )
    finally:
        results.unpersist()


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
    kinds={"spark", "parquet"},
    check_specs=[AssetCheckSpec("explained_variance_reaches_target", asset="pca_model")],
)
def pca_model(
    context: AssetExecutionContext,
    config: PcaConfig,
    image_features: SparkDataFrame,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """Spark ML PCA fitted on the features; stored as a components table and a Spark ML model."""
    from fruit_assets.ml.pca import fit_pca

    result = fit_pca(image_features, config.k, config.variance_target, config.max_k, FEATURE_DIM)
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
        result.model,
        metadata={
            **_plot(context, "explained_variance_plot",
                    plots.explained_variance_plot(result.explained_variance, result.k, config.variance_target)),
            "k": result.k,
            "k_chosen_by": "fixed k" if config.k is not None else f"variance_target {config.variance_target}",
            "variance_target": config.variance_target,
            "explained_variance_total": round(kept, 6),
            "explained_variance": _table(table),
            "rows": result.rows,
        },
    )
    yield AssetCheckResult(
        check_name="explained_variance_reaches_target",
        passed=kept >= config.variance_target - 1e-9,
        severity=AssetCheckSeverity.WARN,
        description=f"{result.k} components keep {kept:.1%} of the variance (target {config.variance_target:.0%})",
        metadata={"k": result.k, "explained_variance_total": kept, "variance_target": config.variance_target},
    )


@asset(
    group_name=GROUP,
    kinds={"spark", "parquet"},
    check_specs=[AssetCheckSpec("k_columns_and_same_rows", asset="reduced_features")],
)
def reduced_features(
    context: AssetExecutionContext,
    image_features: SparkDataFrame,
    pca_model: PCAModel,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """The image features projected onto the PCA components: path, label, pca_features (k float32)."""
    from fruit_assets.ml.pca import project

    k = pca_model.getK()
    reduced = project(image_features, pca_model).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        stats = reduced.agg(
            F.count("*").alias("rows"),
            F.min(F.size("pca_features")).alias("min_k"),
            F.max(F.size("pca_features")).alias("max_k"),
        ).first()
        source_rows = image_features.count()
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
