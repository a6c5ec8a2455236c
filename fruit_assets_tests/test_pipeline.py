"""The four assets end to end on the embedded default: real local Spark, TensorFlow and Dagster runs."""

import os

import numpy as np
import pandas as pd
import pytest

from fruit_assets_tests.support import local_resources, materialize_all, metadata_of, private_copy, read_asset

ROWS = 72  # 24 labels x 3 images


def read(storage, name) -> pd.DataFrame:
    return read_asset(storage, name).sort_values("path" if name != "pca_model" else "component", ignore_index=True)


def test_graph_materializes_on_demo_set(demo_run, demo_images):
    result, storage = demo_run
    assert result.success
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} == {
        "raw_images", "image_features", "pca_model", "reduced_features"
    }
    raw = metadata_of(result, "raw_images")
    assert (raw["rows"], raw["labels"]) == (ROWS, 24)
    assert {r.data["images"] for r in raw["images_per_label"].records} == {3}

    features = metadata_of(result, "image_features")
    assert features["rows"] == ROWS and features["skipped"] == 0
    assert features["weights_source"] == "random:0" and features["weights_meaningful"] is False
    # The rate is what it says: the featurized images over the featurization's seconds.
    assert features["featurized"] == ROWS and features["featurize_seconds"] > 0
    assert features["throughput_images_per_s"] == pytest.approx(ROWS / features["featurize_seconds"], abs=0.01)
    assert features["dagster/row_count"] == ROWS

    pca = metadata_of(result, "pca_model")
    assert pca["k"] == 50 and pca["dagster/row_count"] == 50
    # The total is the sum of the stored components' ratios (test_pca_agrees_with_numpy_eigendecomposition
    # checks those against numpy).
    stored = read(storage, "pca_model")
    assert pca["explained_variance_total"] == pytest.approx(stored.explained_variance.sum(), abs=1e-6)

    # Plots for the UI: embedded as markdown images, and stored beside the assets.
    from fruit_assets.pipeline.plots import png_from_markdown

    for asset, key in [("raw_images", "sample_images"), ("pca_model", "explained_variance_plot"), ("reduced_features", "pca_scatter_plot")]:
        metadata = metadata_of(result, asset)
        png = png_from_markdown(metadata[key])
        assert png.startswith(b"\x89PNG"), (asset, key)
        assert (storage / "_plots" / asset / f"{key}.png").read_bytes() == png
        assert metadata[f"{key}_file"] == str(storage / "_plots" / asset / f"{key}.png")

    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["one_row_per_image"].passed
    assert checks["vectors_are_finite_floats_of_the_model_dimension"].passed
    assert checks["k_columns_and_same_rows"].passed
    assert checks["pca_model_is_an_exact_decomposition"].passed
    variance = checks["explained_variance_reaches_target"]
    assert variance.passed == (pca["explained_variance_total"] >= 0.95)


def test_outputs_are_readable_without_spark(demo_run, demo_images):
    import polars as pl
    from deltalake import DeltaTable

    _, storage = demo_run
    table = DeltaTable(str(storage / "image_features")).to_pyarrow_table()
    assert table.num_rows == ROWS
    features = np.stack(table.column("features").to_numpy(zero_copy_only=False))
    assert features.shape == (ROWS, 1280) and features.dtype == np.float32
    assert np.isfinite(features).all()
    # The random-but-calibrated model must still tell images apart.
    assert features.std(axis=0).mean() > 1e-3

    raw = read(storage, "raw_images")
    assert list(raw.columns) == ["path", "label", "size_bytes", "modified_at"]
    assert sorted(raw.label.unique()) == sorted(p.name for p in demo_images.iterdir())
    assert list(raw.size_bytes) == [os.path.getsize(demo_images / path) for path in raw.path]

    reduced = read(storage, "reduced_features")
    assert reduced.shape == (ROWS, 3)
    assert {len(v) for v in reduced.pca_features} == {50}
    for name in ("raw_images", "image_features", "pca_model", "reduced_features"):
        assert pl.read_delta(str(storage / name)).height == (50 if name == "pca_model" else ROWS), name


def test_pca_agrees_with_numpy_eigendecomposition(demo_run):
    _, storage = demo_run
    features = read(storage, "image_features")
    x = np.stack(features.features).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x, rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    ratio = eigenvalues / eigenvalues.sum()

    pca = read(storage, "pca_model")
    k = len(pca)
    np.testing.assert_allclose(pca.explained_variance, ratio[:k], atol=1e-6)
    np.testing.assert_allclose(pca.cumulative_explained_variance, np.cumsum(ratio)[:k], atol=1e-6)
    components = np.stack(pca.loadings)
    # Components are defined up to sign; compare those whose eigenvalue is well separated.
    separated = [i for i in range(k - 1) if ratio[i] - ratio[i + 1] > 1e-3 * ratio[0]][:10]
    assert len(separated) >= 3
    for i in separated:
        assert abs(components[i] @ eigenvectors[:, i]) == pytest.approx(1.0, abs=1e-4)

    # reduced_features is the projection of the raw features (Spark ML does not centre them).
    reduced = read(storage, "reduced_features")
    assert list(reduced.path) == list(features.path)
    expected = x @ components.T
    np.testing.assert_allclose(np.stack(reduced.pca_features), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_spark_can_load_the_stored_pca_model(demo_run, spark):
    from pyspark.ml.feature import PCAModel
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import DataFrame as SparkDataFrame

    from fruit_assets.resources.io_manager import load_asset

    _, storage = demo_run
    model = load_asset(str(storage), "pca_model", PCAModel)
    features = load_asset(str(storage), "image_features", SparkDataFrame)
    transformed = model.transform(features.select("path", array_to_vector("features").alias("vector")))
    again = transformed.select("path", vector_to_array("pca", "float32").alias("pca_features")).toPandas()
    again = again.sort_values("path", ignore_index=True)
    stored = read(storage, "reduced_features")
    np.testing.assert_allclose(np.stack(again.pca_features), np.stack(stored.pca_features), rtol=1e-5, atol=1e-6)


def test_rematerializing_gives_the_same_results(demo_run, demo_images, spark, tmp_path):
    storage = private_copy(demo_run[1], tmp_path)  # the run's tables are shared (local_run_storage): read only
    before = {name: read(storage, name) for name in ("raw_images", "image_features", "pca_model", "reduced_features")}
    again = materialize_all(local_resources(demo_images, storage))
    assert again.success
    # All 72 vectors were reused, through a join: still at most one file per core (the session's default
    # parallelism, what featurize partitions by), not one per shuffle partition (200).
    from deltalake import DeltaTable

    assert len(DeltaTable(str(storage / "image_features")).file_uris()) <= spark.sparkContext.defaultParallelism
    # An eigenvector's sign is arbitrary; the project fixes it (largest entry positive), so another
    # summation order (another partitioning) gives the same components, not flipped ones.
    old, new = np.stack(before["pca_model"].loadings), np.stack(read(storage, "pca_model").loadings)
    signs = np.sign(np.einsum("ij,ij->i", old, new))
    assert (signs == 1).all()
    for name, frame in before.items():
        after = read(storage, name)
        assert list(after.columns) == list(frame.columns), name
        assert len(after) == len(frame), name
        for column in frame.columns:
            if frame[column].dtype == object and isinstance(frame[column].iloc[0], np.ndarray):
                actual, expected = np.stack(after[column]), np.stack(frame[column])
                if column == "loadings":
                    actual = actual * signs[:, None]
                elif column == "pca_features":
                    actual = actual * signs[None, :]
                np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5, err_msg=f"{name}.{column}")
            else:
                pd.testing.assert_series_equal(after[column], frame[column], check_names=False)


def test_variance_target_chooses_the_smallest_k(demo_run, demo_images, tmp_path):
    storage = private_copy(demo_run[1], tmp_path)
    features = read(storage, "image_features")
    x = np.stack(features.features).astype(np.float64)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    cumulative = np.cumsum(eigenvalues / eigenvalues.sum())
    expected_k = int(np.argmax(cumulative >= 0.9)) + 1

    result = materialize_all(
        local_resources(demo_images, storage),
        selection=["pca_model"],
        run_config={"ops": {"pca_model": {"config": {"k": None, "variance_target": 0.9}}}},
    )
    pca = metadata_of(result, "pca_model")
    assert pca["k"] == expected_k
    assert pca["explained_variance_total"] >= 0.9
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"explained_variance_reaches_target": True, "pca_model_is_an_exact_decomposition": True}
    assert len(read(storage, "pca_model")) == expected_k


def test_k_larger_than_the_images_is_refused_and_keeps_the_last_model(demo_run, demo_images, tmp_path):
    storage = private_copy(demo_run[1], tmp_path)
    before = read(storage, "pca_model")
    result = materialize_all(
        local_resources(demo_images, storage),
        selection=["pca_model"],
        run_config={"ops": {"pca_model": {"config": {"k": 500}}}},
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    message = error.cause.message if error.cause else error.message
    assert "k=500" in message and "number of images=72" in message
    pd.testing.assert_frame_equal(read(storage, "pca_model"), before)
