"""The PCA is exact on every machine, and verifies itself.

The fixture `data/spark_ml_pca_wrong_features.npy` is the 96 x 1280 feature matrix of the demo
generator's seed-1 set (24 labels x 4 images) under `random:0` weights. On a stock pip install
(no system LAPACK), `pyspark.ml.feature.PCA(k=10).fit` on these rows reports a first
explained-variance ratio of 0.044 where numpy's eigendecomposition gives 0.273, every time (measured
on an AMD EPYC and an Intel Xeon). The project's PCA must equal numpy on it.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fruit_assets.ml.pca import FeatureStatistics, PcaResult, decompose, feature_statistics, verify
from fruit_assets.resources.io_manager import load_asset
from fruit_assets_tests.support import local_resources, materialize_all, metadata_of, read_asset

FIXTURE = Path(__file__).parent / "data" / "spark_ml_pca_wrong_features.npy"
DIMENSIONS = 1280  # the fixture's vectors: MobileNetV2 features


@pytest.fixture(scope="module")
def features_matrix() -> np.ndarray:
    return np.load(FIXTURE)


def numpy_reference(x: np.ndarray):
    """Eigenvalue ratios and eigenvectors (as rows) of numpy.cov, by decreasing eigenvalue."""
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x.astype(np.float64), rowvar=False))
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0, None)
    return eigenvalues / eigenvalues.sum(), eigenvectors[:, order].T


def assert_equals_numpy(explained, components, x, spectrum_tolerance=1e-6, component_tolerance=1e-4):
    """Spectrum within 1e-6; components up to sign within 1e-4, where eigenvalues are separated."""
    ratios, eigenvectors = numpy_reference(x)
    k = len(explained)
    np.testing.assert_allclose(explained, ratios[:k], atol=spectrum_tolerance)
    separated = [
        i for i in range(k - 1) if ratios[i] - ratios[i + 1] > 1e-3 * ratios[0] and (i == 0 or ratios[i - 1] - ratios[i] > 1e-3 * ratios[0])
    ]
    assert len(separated) >= 3
    for i in separated:
        sign = np.sign(components[i] @ eigenvectors[i])
        np.testing.assert_allclose(components[i] * sign, eigenvectors[i], atol=component_tolerance)


def features_frame(spark, x: np.ndarray, partitions: int = 3):
    rows = [(f"img/{i:03d}.jpg", f"label{i % 24}", row.tolist()) for i, row in enumerate(x)]
    return spark.createDataFrame(rows, "path string, label string, features array<float>").repartition(partitions)


def test_spark_sums_the_statistics_numpy_would(spark, features_matrix):
    statistics = feature_statistics(features_frame(spark, features_matrix), DIMENSIONS)
    expected = FeatureStatistics.of(features_matrix)
    assert statistics.rows == 96
    np.testing.assert_allclose(statistics.sums, expected.sums, rtol=1e-12)
    np.testing.assert_allclose(statistics.gram, expected.gram, rtol=1e-12, atol=1e-12 * np.abs(expected.gram).max())
    covariance = np.cov(features_matrix.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(statistics.covariance(), covariance, atol=1e-12 * np.abs(covariance).max())


def test_decomposition_equals_numpy_where_spark_ml_is_wrong(spark, features_matrix):
    result = decompose(feature_statistics(features_frame(spark, features_matrix), DIMENSIONS), k=50, variance_target=0.95, max_k=256)
    assert result.k == 50
    assert_equals_numpy(result.explained_variance, result.components, features_matrix)
    assert verify(result.statistics, result.components, result.explained_variance).passed


def test_spark_ml_pca_fails_verification_exactly_when_it_disagrees_with_numpy(spark, features_matrix):
    """What the blocking check is for: Spark ML's own fit, wrong on a stock install, is caught."""
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector

    vectors = features_frame(spark, features_matrix).select(array_to_vector("features").alias("vector"))
    model = PCA(k=10, inputCol="vector", outputCol="pca").fit(vectors)
    spark_ratios = model.explainedVariance.toArray()
    agrees = np.allclose(spark_ratios, numpy_reference(features_matrix)[0][:10], atol=1e-6)
    verification = verify(FeatureStatistics.of(features_matrix), model.pc.toArray().T, spark_ratios)
    assert verification.passed == agrees, (spark_ratios[:3], verification.problems)


def _rotated(result: PcaResult, degrees: float) -> np.ndarray:
    """Components 1 and 2 rotated into each other: still orthonormal, no longer eigenvectors."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    components = result.components.copy()
    components[0], components[1] = c * result.components[0] + s * result.components[1], c * result.components[1] - s * result.components[0]
    return components


CORRUPTIONS = {
    "rotated pair": lambda r: (_rotated(r, 20), r.explained_variance),
    "misreported variance": lambda r: (r.components, r.explained_variance * np.r_[1.05, np.ones(r.k - 1)]),
    "unsorted": lambda r: (r.components[[1, 0, *range(2, r.k)]], r.explained_variance[[1, 0, *range(2, r.k)]]),
    "top component missing": lambda r: (r.components[1:], r.explained_variance[1:]),
    "not unit length": lambda r: (r.components * 1.01, r.explained_variance),
}


@pytest.fixture(scope="module")
def exact(features_matrix) -> PcaResult:
    return decompose(FeatureStatistics.of(features_matrix), k=20, variance_target=0.95, max_k=256)


def test_verify_accepts_the_exact_decomposition(exact):
    assert verify(exact.statistics, exact.components, exact.explained_variance).passed


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_verify_rejects_a_corrupted_decomposition(exact, corruption):
    components, explained = CORRUPTIONS[corruption](exact)
    verification = verify(exact.statistics, components, explained)
    assert not verification.passed
    assert verification.problems


def test_canonical_signs_make_the_components_independent_of_summation_order(spark, features_matrix):
    one = decompose(feature_statistics(features_frame(spark, features_matrix, partitions=1), DIMENSIONS), 20, 0.95, 256)
    many = decompose(feature_statistics(features_frame(spark, features_matrix[::-1].copy(), partitions=7), DIMENSIONS), 20, 0.95, 256)
    np.testing.assert_allclose(one.components, many.components, atol=1e-8)


def _store_features(storage: Path, x: np.ndarray) -> None:
    """An image_features table holding the fixture matrix, as a user would write it."""
    from deltalake import write_deltalake

    table = pa.table(
        {
            "path": [f"/images/label{i % 24}/{i:03d}.jpg" for i in range(len(x))],
            "label": [f"label{i % 24}" for i in range(len(x))],
            "features": pa.array(list(x), type=pa.list_(pa.float32())),
        }
    )
    write_deltalake(str(storage / "image_features"), table)


def _stored(storage: Path, name: str) -> pd.DataFrame:
    return read_asset(storage, name)


def test_pca_model_asset_equals_numpy_on_the_matrix_spark_ml_gets_wrong(spark, tmp_path, features_matrix):
    _store_features(tmp_path, features_matrix)
    result = materialize_all(local_resources(tmp_path / "no_images", tmp_path), selection=["pca_model", "reduced_features"])
    pca = _stored(tmp_path, "pca_model").sort_values("component")
    assert_equals_numpy(pca.explained_variance.to_numpy(), np.stack(pca.loadings), features_matrix)
    assert metadata_of(result, "pca_model")["explained_variance_total"] == pytest.approx(
        pca.cumulative_explained_variance.iloc[-1], abs=1e-6
    )
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "pca_model_is_an_exact_decomposition"]
    assert check.passed

    # The Spark ML model loaded from it is the same PCA, and reduced_features equals its transform.
    from pyspark.ml.feature import PCAModel
    from pyspark.ml.functions import array_to_vector, vector_to_array

    model = load_asset(str(tmp_path), "pca_model", PCAModel)
    np.testing.assert_array_equal(model.pc.toArray().T, np.stack(pca.loadings))
    features = spark.createDataFrame(read_asset(tmp_path, "image_features"))
    transformed = model.transform(features.select("path", array_to_vector("features").alias("vector")))
    expected = transformed.select("path", vector_to_array("pca").alias("pca")).toPandas().sort_values("path")
    reduced = _stored(tmp_path, "reduced_features").sort_values("path")
    assert list(reduced.path) == list(expected.path)
    np.testing.assert_allclose(np.stack(reduced.pca_features), np.stack(expected.pca), rtol=1e-5, atol=1e-6)


def test_a_wrong_decomposition_fails_the_check_and_stops_reduced_features(spark, tmp_path, features_matrix, monkeypatch):
    import fruit_assets.pipeline.spark_work as pca_module  # where pca_model's work calls decompose

    _store_features(tmp_path, features_matrix)
    exact_decompose = pca_module.decompose

    def wrong_decompose(*args, **kwargs):
        exact = exact_decompose(*args, **kwargs)
        return PcaResult(_rotated(exact, 20), exact.eigenvalues, exact.explained_variance, exact.statistics)

    monkeypatch.setattr(pca_module, "decompose", wrong_decompose)
    result = materialize_all(
        local_resources(tmp_path / "no_images", tmp_path), selection=["pca_model", "reduced_features"], raise_on_error=False
    )
    [check] = [c for c in result.get_asset_check_evaluations() if c.check_name == "pca_model_is_an_exact_decomposition"]
    assert not check.passed
    assert "not an eigenvector" in check.description
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "reduced_features" not in materialized
    assert not (tmp_path / "reduced_features").exists()
