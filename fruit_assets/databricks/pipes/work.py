"""What a Databricks Pipes task does for each asset: the assets' own work functions and metadata
builders (assets/, incremental.py), its inputs read from storage, its output committed by the IO
manager's code (`io_manager.store_asset`), and everything reported through Dagster Pipes: the same
metadata as a local run (rows, Delta version, timings, plots) and the same check results.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pyarrow as pa
from dagster import AssetCheckResult, AssetKey

from fruit_assets.databricks.pipes.metadata import to_pipes
from fruit_assets.resources import FeatureModel
from fruit_assets.resources.io_manager import load_asset, store_asset
from fruit_assets.storage.resource import Storage


def _storage(pipes) -> Storage:
    return Storage(**pipes.extras["resources"]["storage"])


def _required(storage: Storage, name: str, as_type: type = object):
    value = load_asset(storage, name, as_type)
    if value is None:
        raise FileNotFoundError(f"{name} has no stored data at {storage.table(AssetKey(name)).uri}: materialize it first")
    return value


def report(pipes, name: str, metadata: dict, checks: list[AssetCheckResult]) -> None:
    pipes.report_asset_materialization(metadata=to_pipes(metadata), asset_key=name)
    for check in checks:
        pipes.report_asset_check(
            check_name=str(check.check_name), passed=bool(check.passed), asset_key=name,
            severity=check.severity.value, metadata=to_pipes(dict(check.metadata)),
        )


def image_features(pipes, spark) -> None:
    from fruit_assets.assets.features import feature_checks, features_metadata, logged_progress, refuse_too_many_skipped, summary
    from fruit_assets.ml.featurize import Featurizer, WorkerModelSetup
    from fruit_assets.pipeline.spark_work import featurize_incremental
    from fruit_assets.settings import resolved

    storage, feature_model = _storage(pipes), FeatureModel(**pipes.extras["resources"]["feature_model"])
    settings, model = feature_model.featurize_settings(), feature_model.feature_extractor()
    featurizer = Featurizer(model, settings, WorkerModelSetup(spark), feature_model.partitions)
    catalog = _required(storage, "raw_images", pa.Table)
    stored = storage.snapshot(AssetKey("image_features"))
    max_skipped = resolved(feature_model.max_skipped_fraction)
    progress = functools.partial(logged_progress, spark, pipes.log.info)
    with featurize_incremental(spark, catalog, stored, featurizer, progress=progress) as result:
        pipes.log.info(summary(result))
        refuse_too_many_skipped(result, max_skipped)
        metadata = features_metadata(result, model, settings.batch_size, featurizer.workers_setup)
        metadata |= store_asset(storage, AssetKey("image_features"), result.change, pipes.run_id)
        report(pipes, "image_features", metadata, list(feature_checks(result, max_skipped, model.spec.output_dim)))


def pca_model(pipes, spark) -> None:
    from dagster import AssetCheckSeverity

    from fruit_assets.assets.metadata import plot
    from fruit_assets.assets.pca import PcaConfig, pca_metadata, previous_pca
    from fruit_assets.pipeline import plots
    from fruit_assets.pipeline.spark_work import fit_pca

    storage, config = _storage(pipes), PcaConfig(**pipes.extras["pca_config"])
    key = AssetKey("pca_model")
    features = storage.snapshot(AssetKey("image_features"))
    if features is None:
        raise FileNotFoundError("image_features has no stored data: materialize it first")
    fit = fit_pca(spark, features, previous_pca(storage, key), config.k, config.variance_target, config.max_k)
    result, kept = fit.result, float(fit.result.cumulative[-1])
    pipes.log.info(f"PCA statistics: {fit.update.mode} ({fit.update.reason}), {fit.update.rows_read} feature rows read")
    pipes.log.info(f"PCA: k={result.k} keeps {kept:.1%} of the variance of {result.rows} images")
    curve = plots.explained_variance_plot(result.explained_variance, result.k, config.variance_target)
    metadata = {**plot(storage, key, "explained_variance_plot", curve), **pca_metadata(fit, config, features.version)}
    metadata |= store_asset(storage, key, result, pipes.run_id)
    check = AssetCheckResult(
        check_name="explained_variance_reaches_target", passed=kept >= config.variance_target - 1e-9,
        severity=AssetCheckSeverity.WARN,
        metadata={"k": result.k, "explained_variance_total": kept, "variance_target": config.variance_target},
    )
    report(pipes, "pca_model", metadata, [check])


def reduced_features(pipes, spark) -> None:
    from fruit_assets.assets.metadata import plot
    from fruit_assets.assets.pca import SCATTER_POINTS
    from fruit_assets.ml.pca import PcaResult
    from fruit_assets.pipeline import plots
    from fruit_assets.pipeline.spark_work import project_features

    storage, key = _storage(pipes), AssetKey("reduced_features")
    features = storage.snapshot(AssetKey("image_features"))
    pca = _required(storage, "pca_model", PcaResult)
    if features is None:
        raise FileNotFoundError("image_features has no stored data: materialize it first")
    projection = project_features(spark, features, pca, SCATTER_POINTS)
    try:
        points = np.stack(projection.sample.xy) if len(projection.sample) else np.zeros((0, 2))
        scatter = plots.pca_scatter_plot(points, list(projection.sample.label))
        metadata = {"rows": projection.count, "k": pca.k, "projected_on": projection.where,
                    **plot(storage, key, "pca_scatter_plot", scatter)}
        metadata |= store_asset(storage, key, projection.rows, pipes.run_id)
        passed = projection.count == features.rows and projection.min_k == pca.k and projection.max_k == pca.k
        check = AssetCheckResult(check_name="k_columns_and_same_rows", passed=bool(passed),
                                 metadata={"rows": projection.count, "image_features_rows": features.rows, "k": pca.k})
        report(pipes, "reduced_features", metadata, [check])
    finally:
        projection.release()


WORK: dict[str, Any] = {"image_features": image_features, "pca_model": pca_model, "reduced_features": reduced_features}
