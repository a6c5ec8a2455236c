"""PCA of the image features with Spark ML, and the small numpy maths around it.

Spark ML's `PCAModel.explainedVariance` is each component's eigenvalue over the sum of ALL eigenvalues
of the covariance matrix, so the cumulative sum of the first k entries is the fraction of the total
variance that k components keep: we can choose k for a variance target from one fit.
Note that `PCAModel.transform` projects the raw vectors (it does not subtract the mean); so does
`project` below, so both agree.

No Dagster here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.ml.feature import PCA, PCAModel
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import DataFrame
from pyspark.sql import functions as F


class PcaConfigError(ValueError):
    """The requested number of components or variance target cannot be honoured."""


@dataclass(frozen=True)
class PcaResult:
    model: PCAModel
    k: int
    explained_variance: np.ndarray  # per component, fraction of total variance
    rows: int

    @property
    def cumulative(self) -> np.ndarray:
        return np.cumsum(self.explained_variance)


def choose_k(explained_variance: np.ndarray, target: float) -> int:
    """The smallest k whose cumulative explained variance reaches `target` (or all of them)."""
    cumulative = np.cumsum(explained_variance)
    reached = np.nonzero(cumulative >= target - 1e-12)[0]
    return int(reached[0]) + 1 if reached.size else len(explained_variance)


def _fit(vectors: DataFrame, k: int) -> PCAModel:
    return PCA(k=k, inputCol="vector", outputCol="pca").fit(vectors)


def fit_pca(
    features: DataFrame,
    k: int | None,
    variance_target: float,
    max_k: int,
    dimensions: int,
) -> PcaResult:
    """Fit Spark ML PCA on the `features` column.

    With `k` set, fit exactly k components. With `k=None`, fit up to `max_k` components (bounded by the
    number of rows and dimensions) and keep the smallest k reaching `variance_target`."""
    if not 0 < variance_target <= 1:
        raise PcaConfigError(f"variance_target must be in (0, 1], got {variance_target}")
    # Not cached. With .cache() here, about one test session in three fitted a PCA whose spectrum
    # disagreed with numpy on the same stored files (the files themselves were right); without it, no
    # failure in the runs since. The root cause, somewhere between Spark's in-memory cache and the
    # Python data source's Arrow batches, is not found. Each PCA pass re-reads the files instead:
    # cheap next to featurization.
    vectors = features.select(array_to_vector("features").alias("vector"))
    rows = vectors.count()
    if rows < 2:
        raise PcaConfigError(f"PCA needs at least 2 images with features, got {rows}")
    limit = min(rows, dimensions)
    if k is not None:
        if not 1 <= k <= limit:
            raise PcaConfigError(
                f"k={k} is out of range: it must be between 1 and min(number of images={rows}, "
                f"feature dimensions={dimensions}) = {limit}; lower k or set k to null and use "
                "variance_target"
            )
        model = _fit(vectors, k)
    else:
        if max_k < 1:
            raise PcaConfigError(f"max_k must be at least 1, got {max_k}")
        wide = _fit(vectors, min(max_k, limit))
        k = choose_k(wide.explainedVariance.toArray(), variance_target)
        model = wide if k == wide.getK() else _fit(vectors, k)
    return PcaResult(model=model, k=k, explained_variance=model.explainedVariance.toArray(), rows=rows)


def project(features: DataFrame, model: PCAModel) -> DataFrame:
    """path, label, pca_features (k float32): the features projected by the fitted model."""
    vectors = features.select("path", "label", array_to_vector("features").alias("vector"))
    return model.transform(vectors).select(
        "path", "label", vector_to_array(F.col("pca"), dtype="float32").alias("pca_features")
    )


def components_table(model: PCAModel) -> pd.DataFrame:
    """One row per component, readable without Spark: loadings (a unit vector in feature space),
    its explained variance ratio and the cumulative ratio."""
    components = model.pc.toArray().T  # (k, dimensions)
    explained = model.explainedVariance.toArray()
    return pd.DataFrame(
        {
            "component": np.arange(len(explained), dtype=np.int32),
            "explained_variance": explained,
            "cumulative_explained_variance": np.cumsum(explained),
            "loadings": list(components),
        }
    )
