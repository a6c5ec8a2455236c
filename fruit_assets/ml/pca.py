"""PCA of the image features: Spark sums, numpy decomposes, and the result verifies itself.

Why not `pyspark.ml.feature.PCA.fit`: on a machine without a system LAPACK (most laptops, CI,
containers: pip's pyspark finds no `liblapack.so.3`) Spark ML decomposes the covariance with its
pure-Java LAPACK fallback, and that returns wrong eigenvalues for some inputs. On the 96-image
feature matrix frozen in `fruit_assets_tests/data/` it reports a first explained-variance ratio of
0.044 where numpy gives 0.273, every time, on AMD and Intel CPUs alike; with Debian's liblapack3
installed the same fit is exact. Spark's covariance itself is right. So:

1. Spark computes what needs the data, in one pass over it: per partition, numpy sums the row count,
   the feature sums and the Gram matrix X^T X in float64 (`feature_statistics`). These are
   sufficient statistics: they add over partitions, and over rows added later.
2. The driver eigendecomposes the 1280 x 1280 covariance with numpy (`decompose`), whose wheel
   bundles its own LAPACK on every platform.
3. `verify` checks a decomposition against the statistics it came from: orthonormal components,
   each an eigenvector of the covariance with the eigenvalue it reports, sorted, and no larger
   eigenvalue left out. The `pca_model` asset runs it as a blocking check on what it stored.

The result is still a Spark ML `PCAModel` (`to_spark_model`), so Spark users can load and apply it
(on classic Spark: Spark Connect cannot build one from given components).
Like `PCAModel.transform`, `project` does not subtract the mean.

No Dagster here.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Tolerances of `verify`, relative to the largest eigenvalue (float64 eigh is exact to ~1e-13 there).
ORTHONORMAL_TOLERANCE = 1e-8
EIGEN_RESIDUAL_TOLERANCE = 1e-8
RATIO_TOLERANCE = 1e-9


class PcaConfigError(ValueError):
    """The requested number of components or variance target cannot be honoured."""


@dataclass(frozen=True)
class FeatureStatistics:
    """Sufficient statistics of a set of feature vectors: enough to compute their covariance.

    `gram` is X^T X (not centred), so statistics of disjoint row sets add up, and the statistics of
    removed rows can be subtracted: the covariance follows exactly from the three together."""

    rows: int
    sums: np.ndarray  # (d,) float64
    gram: np.ndarray  # (d, d) float64

    @classmethod
    def zeros(cls, dimensions: int) -> FeatureStatistics:
        return cls(0, np.zeros(dimensions), np.zeros((dimensions, dimensions)))

    @classmethod
    def of(cls, vectors: np.ndarray) -> FeatureStatistics:
        x = np.asarray(vectors, dtype=np.float64)
        return cls(len(x), x.sum(axis=0), x.T @ x)

    def __add__(self, other: FeatureStatistics) -> FeatureStatistics:
        return FeatureStatistics(self.rows + other.rows, self.sums + other.sums, self.gram + other.gram)

    def __sub__(self, other: FeatureStatistics) -> FeatureStatistics:
        return FeatureStatistics(self.rows - other.rows, self.sums - other.sums, self.gram - other.gram)

    @property
    def dimensions(self) -> int:
        return len(self.sums)

    @property
    def mean(self) -> np.ndarray:
        return self.sums / self.rows

    def covariance(self) -> np.ndarray:
        """The sample covariance (n - 1 in the denominator, like numpy.cov and Spark ML)."""
        if self.rows < 2:
            raise PcaConfigError(f"PCA needs at least 2 images with features, got {self.rows}")
        centred = self.gram - np.outer(self.sums, self.sums) / self.rows
        covariance = centred / (self.rows - 1)
        return (covariance + covariance.T) / 2  # exactly symmetric, as eigh assumes


def vectors_of(column: pa.Array | pa.ChunkedArray, dimensions: int) -> np.ndarray:
    """An Arrow list<float> column of equal-length vectors as an (n, dimensions) float64 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        raise ValueError(f"{column.null_count} feature vectors are null")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != dimensions).any():
        raise ValueError(f"feature vectors must have {dimensions} values, found lengths {sorted(set(lengths.tolist()))[:5]}")
    values = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64).reshape(len(column), dimensions)


# The statistics travel between the Spark steps in pieces: piece -1 is the row count and the sums,
# piece i >= 0 rows [i * GRAM_PIECE_ROWS, (i + 1) * GRAM_PIECE_ROWS) of the Gram matrix (328 KB at 1280
# dimensions: 40 pieces). Pieces are what Spark's shuffle moves, and one Python call adds up one piece
# of every partition (it holds them all: 66 MB for 200 partitions); the driver receives the sums, 13 MB.
GRAM_PIECE_ROWS = 32
_PIECE_COLUMNS = "partition int, piece int, rows long, values binary"
_PIECE_SCHEMA = pa.schema([("partition", pa.int32()), ("piece", pa.int32()), ("rows", pa.int64()), ("values", pa.binary())])
_SUM_COLUMNS = "piece int, rows long, values binary"
_SUM_SCHEMA = pa.schema([("piece", pa.int32()), ("rows", pa.int64()), ("values", pa.binary())])


def _pieces(statistics: FeatureStatistics, partition: int) -> pa.RecordBatch:
    """One partition's statistics as pieces (see GRAM_PIECE_ROWS)."""
    starts = range(0, statistics.dimensions, GRAM_PIECE_ROWS)
    values = [statistics.sums.tobytes()] + [statistics.gram[start : start + GRAM_PIECE_ROWS].tobytes() for start in starts]
    return pa.RecordBatch.from_pydict(
        {
            "partition": [partition] * len(values),
            "piece": [-1, *range(len(starts))],
            "rows": [statistics.rows] + [0] * len(starts),
            "values": values,
        },
        schema=_PIECE_SCHEMA,
    )


def _partial_statistics(column: str, dimensions: int):
    """The per-partition step of `feature_statistics` (runs in Spark's Python workers): numpy sums the
    partition's rows in float64, and the partition's statistics leave as pieces, tagged with the
    partition's index (an empty partition sends nothing)."""

    def partial(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        total = FeatureStatistics.zeros(dimensions)
        for batch in batches:
            total = total + FeatureStatistics.of(vectors_of(batch.column(column), dimensions))
        if total.rows:
            context = TaskContext.get()
            yield _pieces(total, context.partitionId() if context else 0)

    return partial


def _sum_pieces(table: pa.Table) -> pa.Table:
    """The grouped step of `feature_statistics` (Spark's Python workers): one piece of every partition,
    added up in float64 in the order of the partitions, so the sum does not depend on the order in
    which the shuffle delivered them."""
    order = np.argsort(table.column("partition").to_numpy(), kind="stable")
    values = table.column("values").to_pylist()
    total = np.frombuffer(values[order[0]], dtype=np.float64).copy()
    for index in order[1:]:
        total = total + np.frombuffer(values[index], dtype=np.float64)
    rows = int(pc.sum(table.column("rows")).as_py() or 0)
    return pa.table({"piece": [table.column("piece")[0].as_py()], "rows": [rows], "values": [total.tobytes()]}, schema=_SUM_SCHEMA)


def _assemble(sums: pa.Table, dimensions: int) -> FeatureStatistics:
    """The statistics from their summed pieces, as the driver receives them."""
    if sums.num_rows == 0:
        return FeatureStatistics.zeros(dimensions)
    pieces = dict(zip(sums.column("piece").to_pylist(), sums.column("values").to_pylist(), strict=True))
    rows = dict(zip(sums.column("piece").to_pylist(), sums.column("rows").to_pylist(), strict=True))
    count = -(-dimensions // GRAM_PIECE_ROWS)
    gram = np.concatenate([np.frombuffer(pieces[index], dtype=np.float64) for index in range(count)]).reshape(dimensions, dimensions)
    return FeatureStatistics(int(rows[-1]), np.frombuffer(pieces[-1], dtype=np.float64).copy(), gram)


def feature_statistics(features, dimensions: int, column: str = "features") -> FeatureStatistics:
    """Row count, feature sums and Gram matrix of a Spark DataFrame's vector column, in one pass.

    Each partition sums its rows with numpy in float64 (`mapInArrow`); the partial sums (13 MB each)
    are added on the executors, piece by piece (`groupBy(piece).applyInArrow`), and the driver receives
    one set of statistics, whatever the number of partitions. DataFrame operations only, so the same
    code runs on classic Spark and on Spark Connect (which has no RDD API: this used to be an RDD
    `treeReduce`). The partial sums are added in partition order: the same float64 additions as before,
    but in an order that no longer depends on which task finished first."""
    partials = features.select(column).mapInArrow(_partial_statistics(column, dimensions), _PIECE_COLUMNS)
    sums = partials.groupBy("piece").applyInArrow(_sum_pieces, _SUM_COLUMNS)
    return _assemble(sums.toArrow(), dimensions)


@dataclass(frozen=True)
class PcaResult:
    """A fitted PCA: the first k principal components of the statistics it was computed from."""

    components: np.ndarray  # (k, d) float64, unit rows, by decreasing eigenvalue
    eigenvalues: np.ndarray  # (k,) variance along each component
    explained_variance: np.ndarray  # (k,) eigenvalue / total variance
    statistics: FeatureStatistics = field(repr=False)
    # What the statistics were computed from (which version of which table), stored with them so that
    # the next run can update them instead of summing every row again.
    provenance: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.explained_variance)

    @property
    def rows(self) -> int:
        return self.statistics.rows

    @property
    def cumulative(self) -> np.ndarray:
        return np.cumsum(self.explained_variance)


def choose_k(explained_variance: np.ndarray, target: float) -> int:
    """The smallest k whose cumulative explained variance reaches `target` (or all of them)."""
    cumulative = np.cumsum(explained_variance)
    reached = np.nonzero(cumulative >= target - 1e-12)[0]
    return int(reached[0]) + 1 if reached.size else len(explained_variance)


def _requested_k(rows: int, dimensions: int, k: int | None, max_k: int) -> int:
    """Validate k (or max_k, when k is chosen from a variance target) against the data."""
    limit = min(rows, dimensions)
    if k is not None:
        if not 1 <= k <= limit:
            raise PcaConfigError(
                f"k={k} is out of range: it must be between 1 and min(number of images={rows}, "
                f"feature dimensions={dimensions}) = {limit}; lower k or set k to null and use "
                "variance_target"
            )
        return k
    if max_k < 1:
        raise PcaConfigError(f"max_k must be at least 1, got {max_k}")
    return min(max_k, limit)


def _canonical_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each row so that its largest-magnitude entry is positive: an eigenvector's sign is
    arbitrary, and this makes it the same whatever order the statistics were summed in."""
    largest = np.abs(vectors).argmax(axis=1)
    signs = np.sign(vectors[np.arange(len(vectors)), largest])
    return vectors * np.where(signs == 0, 1.0, signs)[:, None]


def decompose(statistics: FeatureStatistics, k: int | None, variance_target: float, max_k: int) -> PcaResult:
    """The principal components of the statistics' covariance, by numpy's symmetric eigensolver.

    With `k` set, keep exactly k components. With `k=None`, keep the smallest k (at most `max_k`,
    the number of rows and the dimensions) whose components reach `variance_target`."""
    if not 0 < variance_target <= 1:
        raise PcaConfigError(f"variance_target must be in (0, 1], got {variance_target}")
    covariance = statistics.covariance()  # refuses fewer than 2 rows
    wanted = _requested_k(statistics.rows, statistics.dimensions, k, max_k)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    eigenvalues, eigenvectors = np.clip(eigenvalues[::-1], 0.0, None), eigenvectors[:, ::-1]
    total = eigenvalues.sum()
    if total <= 0:
        raise PcaConfigError(f"the {statistics.rows} feature vectors are all equal: there is no variance to explain")
    ratios = eigenvalues / total
    if k is None:
        wanted = min(wanted, choose_k(ratios[:wanted], variance_target))
    return PcaResult(
        components=_canonical_signs(eigenvectors[:, :wanted].T.copy()),
        eigenvalues=eigenvalues[:wanted].copy(),
        explained_variance=ratios[:wanted].copy(),
        statistics=statistics,
    )


@dataclass(frozen=True)
class Verification:
    """What `verify` measured, and the problems it found (empty: the decomposition is right)."""

    orthonormality_error: float
    max_eigen_residual: float
    max_ratio_error: float
    largest_left_out: float  # largest eigenvalue of the covariance outside the k components, / the top one
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems

    def metadata(self) -> dict:
        return {
            "orthonormality_error": self.orthonormality_error,
            "max_eigen_residual": self.max_eigen_residual,
            "max_explained_variance_error": self.max_ratio_error,
            "largest_eigenvalue_left_out": self.largest_left_out,
        }


def verify(statistics: FeatureStatistics, components: np.ndarray, explained_variance: np.ndarray) -> Verification:
    """Check a stored decomposition against the covariance of the statistics it came from.

    Independent of how the decomposition was computed: each test below fails for a wrong one.
    - the components are orthonormal;
    - each satisfies the eigen equation C v = lambda v, with lambda = its explained variance times
      the total variance (trace of C), within a tolerance relative to the largest eigenvalue;
    - the explained variances are sorted, lie in [0, 1] and sum to at most 1;
    - no eigenvalue left out is larger than the smallest kept one (the k components are the top k:
      the largest eigenvalue of C with the k components deflated out is at most lambda_k)."""
    covariance = statistics.covariance()
    v = np.asarray(components, dtype=np.float64)
    ratios = np.asarray(explained_variance, dtype=np.float64)
    total = float(np.trace(covariance))
    scale = max(float(np.linalg.eigvalsh(covariance)[-1]), np.finfo(float).tiny)
    eigenvalues = ratios * total
    orthonormality, problems = _orthonormality(v)
    worst, eigen_problems = _eigen_residual(v, covariance, eigenvalues, scale)
    ratio_error, ratio_problems = _ratio_error(v, covariance, ratios, total)
    left_out, top_problems = _largest_left_out(v, covariance, eigenvalues, total, scale)
    problems += eigen_problems + ratio_problems + top_problems
    return Verification(orthonormality, worst, ratio_error, left_out / scale, problems)


# Each check of `verify`: what it measured, and the problems it found.


def _orthonormality(v: np.ndarray) -> tuple[float, list[str]]:
    error = float(np.abs(v @ v.T - np.eye(len(v))).max()) if len(v) else 0.0
    if error > ORTHONORMAL_TOLERANCE:
        return error, [f"components are not orthonormal (max |V V^T - I| = {error:.2e})"]
    return error, []


def _eigen_residual(v: np.ndarray, covariance: np.ndarray, eigenvalues: np.ndarray, scale: float) -> tuple[float, list[str]]:
    residual = np.linalg.norm(v @ covariance - eigenvalues[:, None] * v, axis=1) / scale if len(v) else np.zeros(0)
    worst = float(residual.max()) if len(residual) else 0.0
    if worst > EIGEN_RESIDUAL_TOLERANCE:
        return worst, [
            f"component {int(residual.argmax()) + 1} is not an eigenvector with its reported variance "
            f"(|C v - lambda v| / lambda_max = {worst:.2e})"
        ]
    return worst, []


def _ratio_error(v: np.ndarray, covariance: np.ndarray, ratios: np.ndarray, total: float) -> tuple[float, list[str]]:
    rayleigh = np.einsum("ij,jk,ik->i", v, covariance, v) / total if len(v) else np.zeros(0)
    error = float(np.abs(rayleigh - ratios).max()) if len(v) else 0.0
    problems = []
    if error > RATIO_TOLERANCE:
        problems.append(f"explained variances differ from the covariance along the components by up to {error:.2e}")
    if (np.diff(ratios) > RATIO_TOLERANCE).any():
        problems.append("explained variances are not sorted in decreasing order")
    if len(ratios) and (ratios.min() < -RATIO_TOLERANCE or ratios.max() > 1 + RATIO_TOLERANCE):
        problems.append(f"explained variances outside [0, 1]: {ratios.min():.3g} .. {ratios.max():.3g}")
    if ratios.sum() > 1 + RATIO_TOLERANCE:
        problems.append(f"explained variances sum to {ratios.sum():.6f} > 1")
    return error, problems


def _largest_left_out(
    v: np.ndarray, covariance: np.ndarray, eigenvalues: np.ndarray, total: float, scale: float
) -> tuple[float, list[str]]:
    deflated = covariance - (v.T * eigenvalues) @ v
    left_out = float(np.linalg.eigvalsh((deflated + deflated.T) / 2)[-1])
    smallest_kept = float(eigenvalues.min()) if len(v) else np.inf
    if left_out > smallest_kept + EIGEN_RESIDUAL_TOLERANCE * scale:
        return left_out, [
            f"an eigenvalue left out ({left_out / total:.4g} of the variance) is larger than the smallest "
            f"kept one ({smallest_kept / total:.4g}): the components are not the top {len(v)}"
        ]
    return left_out, []


def components_table(result: PcaResult) -> pd.DataFrame:
    """One row per component, readable without Spark: loadings (a unit vector in feature space),
    its explained variance ratio and the cumulative ratio."""
    return pd.DataFrame(
        {
            "component": np.arange(result.k, dtype=np.int32),
            "explained_variance": result.explained_variance,
            "cumulative_explained_variance": result.cumulative,
            "loadings": list(result.components),
        }
    )


def to_spark_model(spark, components: np.ndarray, explained_variance: np.ndarray, input_col: str = "vector", output_col: str = "pca"):
    """A Spark ML `PCAModel` holding these components, as `PCA.fit` would have returned it.

    Classic Spark only: it is built in the JVM through py4j, which a Spark Connect session does not
    have (the caller, `pca_store`, says so there)."""
    from pyspark.ml.common import _py2java
    from pyspark.ml.feature import PCAModel
    from pyspark.ml.linalg import DenseMatrix, DenseVector

    k, dimensions = components.shape
    # Spark's pc is dimensions x k, column-major: the k rows of `components`, one after the other.
    pc = DenseMatrix(dimensions, k, np.ascontiguousarray(components, dtype=np.float64).ravel())
    jvm, sc = spark.sparkContext._jvm, spark.sparkContext
    java_model = jvm.org.apache.spark.ml.feature.PCAModel(
        jvm.org.apache.spark.ml.util.Identifiable.randomUID("pca"),
        _py2java(sc, pc),
        _py2java(sc, DenseVector(np.asarray(explained_variance, dtype=np.float64))),
    )
    model = PCAModel(java_model).setInputCol(input_col).setOutputCol(output_col)
    model.set(model.k, k)  # a fitted model carries its estimator's k, and transform() validates it
    return model


PROJECTED_COLUMNS = "path string, label string, pca_features array<float>"
PROJECTED_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.string()), ("pca_features", pa.list_(pa.float32()))])


def project_batches(batches: Iterable[pa.RecordBatch], components: np.ndarray) -> Iterator[pa.RecordBatch]:
    """path, label, pca_features batches: each batch's feature vectors projected on the components
    (float64 maths, float32 results). Runs in Spark's Python workers (`project`), or in the driver
    for a small table: the same code, so the same numbers."""
    components = np.asarray(components, dtype=np.float64)
    for batch in batches:
        reduced = (vectors_of(batch.column("features"), components.shape[1]) @ components.T).astype(np.float32)
        values = pa.array(reduced.ravel(), type=pa.float32())
        offsets = pa.array(np.arange(len(reduced) + 1, dtype=np.int32) * reduced.shape[1])
        yield pa.RecordBatch.from_arrays(
            [batch.column("path"), batch.column("label"), pa.ListArray.from_arrays(offsets, values)],
            names=["path", "label", "pca_features"],
        )


def project(features, components: np.ndarray):
    """path, label, pca_features (k float32): each feature vector projected on the components.

    The same numbers as the Spark ML model's `transform` (which does not centre either), computed in
    one pass with numpy in the Python workers: no shuffle, no JVM linear algebra."""
    components = np.asarray(components, dtype=np.float64)
    return features.select("path", "label", "features").mapInArrow(
        functools.partial(project_batches, components=components), PROJECTED_COLUMNS
    )
