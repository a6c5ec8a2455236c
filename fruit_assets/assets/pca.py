"""pca_model, its blocking check, and reduced_features."""

from typing import Any

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Output,
    ResourceParam,
    asset,
    asset_check,
)
from dagster_pyspark import PySparkResource
from pydantic import Field

from fruit_assets.assets.metadata import plot, table
from fruit_assets.ml.pca import PcaResult, verify
from fruit_assets.ml.pca_store import pca_result_of
from fruit_assets.ml.spec import DEFAULT_SPEC
from fruit_assets.pipeline import plots
from fruit_assets.pipeline.spark_work import PcaFit, fit_pca, project_features
from fruit_assets.storage.delta import Snapshot
from fruit_assets.storage.resource import Storage

GROUP = "fruit_features"
SCATTER_POINTS = 5000  # the scatter shows a sample: enough to see the structure, cheap to collect


class PcaConfig(Config):
    # No upper bound here: the features' dimension is their model spec's, known when they are read (the
    # fit refuses a k above it, or above the number of images, saying both).
    k: int | None = Field(
        default=50, ge=1,
        description=f"Number of components (at most the features' dimension, {DEFAULT_SPEC.output_dim} with "
        f"{DEFAULT_SPEC.name}, and the number of images). Null: the smallest k reaching variance_target.",
    )
    variance_target: float = Field(
        default=0.95, gt=0, le=1,
        description="Fraction of variance to keep when k is null; with a fixed k, the check warns below it.",
    )
    max_k: int = Field(default=256, ge=1, description="Upper bound on k when choosing it from variance_target.")


@asset(group_name=GROUP, kinds={"spark", "numpy", "delta"},
       check_specs=[AssetCheckSpec("explained_variance_reaches_target", asset="pca_model")])
def pca_model(
    context: AssetExecutionContext,
    config: PcaConfig,
    image_features: Snapshot,
    storage: Storage,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """PCA of the features: Spark sums the covariance's statistics, numpy decomposes it on the driver.
    Stored as a components table, the statistics, and a Spark ML PCAModel.

    Incremental: the statistics of the previous version are updated by the rows of the data files
    added to and removed from image_features since, when that can be proven; else a full pass."""
    fit = fit_pca(pyspark.spark_session, image_features, previous_pca(storage, context.asset_key),
                  config.k, config.variance_target, config.max_k)
    update, result = fit.update, fit.result
    context.log.info(f"PCA statistics: {update.mode} ({update.reason}), {update.rows_read} feature rows read")
    kept = float(result.cumulative[-1])
    context.log.info(f"PCA: k={result.k} keeps {kept:.1%} of the variance of {result.rows} images")
    curve = plots.explained_variance_plot(result.explained_variance, result.k, config.variance_target)
    metadata = pca_metadata(fit, config, image_features.version)
    yield Output(result, metadata={**plot(storage, context.asset_key, "explained_variance_plot", curve), **metadata})
    yield AssetCheckResult(
        check_name="explained_variance_reaches_target",
        passed=kept >= config.variance_target - 1e-9,
        severity=AssetCheckSeverity.WARN,
        description=f"{result.k} components keep {kept:.1%} of the variance (target {config.variance_target:.0%})",
        metadata={"k": result.k, "explained_variance_total": kept, "variance_target": config.variance_target},
    )


def previous_pca(storage: Storage, asset_key) -> PcaResult | None:
    """The stored PCA with its statistics, or None (never stored, or by a release without them)."""
    stored = storage.snapshot(asset_key)
    try:
        return pca_result_of(stored) if stored is not None else None
    except FileNotFoundError:
        return None


def pca_metadata(fit: PcaFit, config: PcaConfig, features_version: int) -> dict:
    result, update = fit.result, fit.update
    spectrum = pd.DataFrame({
        "component": np.arange(1, result.k + 1),
        "explained_variance": np.round(result.explained_variance, 6),
        "cumulative": np.round(result.cumulative, 6),
    })
    return {
        "k": result.k,
        "k_chosen_by": "fixed k" if config.k is not None else f"variance_target {config.variance_target}",
        "variance_target": config.variance_target,
        "explained_variance_total": round(float(result.cumulative[-1]), 6),
        "explained_variance": table(spectrum),
        "rows": result.rows,
        "decomposition": "numpy.linalg.eigh of the covariance summed by Spark",
        "statistics_mode": update.mode,
        "statistics_reason": update.reason,
        "feature_rows_read": update.rows_read,
        "features_version": features_version,
        "statistics_seconds": fit.seconds["statistics"],
        "decomposition_seconds": fit.seconds["decomposition"],
    }


@asset_check(
    asset=pca_model,
    blocking=True,
    description="The stored components are orthonormal eigenvectors of the covariance of the stored "
    "statistics, with the explained variances they report, sorted, and the top k. A failure stops "
    "reduced_features.",
)
def pca_model_is_an_exact_decomposition(context: AssetCheckExecutionContext, storage: Storage) -> AssetCheckResult:
    snapshot = storage.snapshot(pca_model.key)
    assert snapshot is not None, "the check runs after pca_model is stored"
    stored = pca_result_of(snapshot)
    verification = verify(stored.statistics, stored.components, stored.explained_variance)
    return AssetCheckResult(
        passed=not verification.problems,
        severity=AssetCheckSeverity.ERROR,
        description="; ".join(verification.problems) or f"{stored.k} components verified against the covariance of {stored.rows} images",
        metadata={**verification.metadata(), "k": stored.k},
    )


@asset(group_name=GROUP, kinds={"spark", "delta"},
       check_specs=[AssetCheckSpec("k_columns_and_same_rows", asset="reduced_features")])
def reduced_features(
    context: AssetExecutionContext,
    image_features: Snapshot,
    pca_model: PcaResult,
    storage: Storage,
    pyspark: PySparkResource,
    step_launcher: ResourceParam[Any],
):
    """The image features projected onto the PCA components: path, label, pca_features (k float32).
    One pass: read the features, project them, write; no shuffle. Up to 100,000 rows on the driver
    (a Spark job costs more than the work), more in Spark's Python workers: the same numpy code."""
    projection = project_features(pyspark.spark_session, image_features, pca_model, SCATTER_POINTS)
    try:
        points = np.stack(projection.sample.xy) if len(projection.sample) else np.zeros((0, 2))
        scatter = plots.pca_scatter_plot(points, list(projection.sample.label))
        yield Output(projection.rows, metadata={
            "rows": projection.count, "k": pca_model.k, "projected_on": projection.where,
            **plot(storage, context.asset_key, "pca_scatter_plot", scatter),
        })
        k, rows = pca_model.k, image_features.rows
        yield AssetCheckResult(
            check_name="k_columns_and_same_rows",
            passed=bool(projection.count == rows and projection.min_k == k and projection.max_k == k),
            metadata={"rows": projection.count, "image_features_rows": rows, "k": k},
        )
    finally:
        projection.release()
