"""How a `PcaResult` is stored: the IO manager's handler for `pca_model`.

A version of the pca_model table holds one row per component (component, explained variance,
cumulative, loadings), readable by any Delta reader. Two folders beside the rows belong to the same
version, and its commit names them (`Snapshot.commit`), so every version loads its own:
- `_statistics/<id>/statistics.parquet`: the row count, feature sums and Gram matrix the PCA was
  computed from, and where those came from (`provenance`), for the next run's incremental update;
- `_spark_model/<id>/`: the same model as a Spark ML `PCAModel`, for `PCAModel.load`. Not on Spark
  Connect (serverless, standard access mode), where a `PCAModel` cannot be built from given components
  (that needs the JVM): such a version's commit says so (`spark_model_note`) instead of naming a folder.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fruit_assets.ml.pca import FeatureStatistics, PcaResult, components_table, to_spark_model
from fruit_assets.spark_connect import is_connect
from fruit_assets.storage import Location, delta
from fruit_assets.storage.delta import Snapshot
from fruit_assets.storage.handlers import Handler

SPARK_MODEL_DIR = "_spark_model"
STATISTICS_DIR = "_statistics"
NO_SPARK_MODEL_ON_CONNECT = (
    "no Spark ML PCAModel: this version was written on Spark Connect (serverless or standard access mode), "
    "where one cannot be built from the components; the components table holds the same model "
    "(materialize pca_model on a classic cluster or locally for a PCAModel)"
)


def _active_spark():
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()


def _pca_model_class():
    from pyspark.ml.feature import PCAModel

    return PCAModel


class PcaHandler(Handler):
    """Stores `PcaResult`s; loads them as `PcaResult` (no Spark needed) or Spark ML `PCAModel`."""

    def stores(self) -> tuple[type, ...]:
        return (PcaResult,)

    def loads(self) -> tuple[type, ...]:
        return (PcaResult, _pca_model_class())

    def store(
        self, result: PcaResult, table: Location, base: Snapshot | None, commit: dict, report: delta.CommitAttempts
    ) -> int:
        from fruit_assets.storage import spark_io

        side = delta.new_side_folder_name()
        statistics = pa.Table.from_pandas(statistics_table(result.statistics), preserve_index=False)
        delta.write_arrow_file(table.child(STATISTICS_DIR, side), statistics, "statistics.parquet")
        spark = _active_spark()
        names = {"statistics": f"{STATISTICS_DIR}/{side}", "provenance": result.provenance}
        if is_connect(spark):
            names |= {"spark_model": None, "spark_model_note": NO_SPARK_MODEL_ON_CONNECT}
        else:
            model = to_spark_model(spark, result.components, result.explained_variance)
            spark_io.save_spark_model(spark, model, table.child(SPARK_MODEL_DIR, side))
            names["spark_model"] = f"{SPARK_MODEL_DIR}/{side}"
        rows = pa.Table.from_pandas(components_table(result), preserve_index=False)
        return delta.commit_arrow(table, rows, base, commit | names, report=report)

    def load(self, snapshot: Snapshot, as_type: type):
        if as_type is PcaResult:
            return pca_result_of(snapshot)
        from fruit_assets.storage import spark_io

        return spark_io.load_spark_model(_active_spark(), snapshot.file_location(side_folder(snapshot, "spark_model")), as_type)

    def expire(self, table: Location, retention_hours: int) -> None:
        for folder in (SPARK_MODEL_DIR, STATISTICS_DIR):
            delta.expire_side_folders(table.child(folder), retention_hours)


def side_folder(snapshot: Snapshot, kind: str) -> str:
    """The folder of `kind` ("spark_model", "statistics") that the version's commit names."""
    folder = snapshot.commit.get(kind)
    if not folder and snapshot.commit.get(f"{kind}_note"):
        raise FileNotFoundError(f"{snapshot.location.uri} version {snapshot.version}: {snapshot.commit[f'{kind}_note']}")
    if not folder:
        raise FileNotFoundError(
            f"{snapshot.location.uri} version {snapshot.version} has no {kind.replace('_', ' ')}: it was "
            "stored by an earlier release. Materialize pca_model again."
        )
    return folder


def statistics_table(statistics: FeatureStatistics) -> pd.DataFrame:
    """The PCA's sufficient statistics as one row: rows, sums (d), gram (d*d, row-major)."""
    return pd.DataFrame({"rows": [statistics.rows], "sums": [statistics.sums], "gram": [statistics.gram.ravel()]})


def pca_result_of(snapshot: Snapshot) -> PcaResult:
    """A stored version as a `PcaResult`: its components table and statistics, read with pyarrow."""
    statistics_folder = snapshot.file_location(side_folder(snapshot, "statistics"))
    path = statistics_folder.child("statistics.parquet").path
    [row] = pq.read_table(path, filesystem=statistics_folder.filesystem).to_pylist()
    dimensions = len(row["sums"])
    gram = np.asarray(row["gram"], dtype=np.float64).reshape(dimensions, dimensions)
    statistics = FeatureStatistics(int(row["rows"]), np.asarray(row["sums"], dtype=np.float64), gram)
    components = delta.read_arrow(snapshot.location, snapshot.version).to_pandas().sort_values("component")
    explained = components.explained_variance.to_numpy(dtype=np.float64)
    return PcaResult(
        components=np.stack(components.loadings).astype(np.float64) if len(components) else np.zeros((0, dimensions)),
        eigenvalues=explained * np.trace(statistics.covariance()),
        explained_variance=explained,
        statistics=statistics,
        provenance=snapshot.commit.get("provenance", {}),
    )


def has_spark_model(snapshot: Snapshot) -> bool:
    """Whether the version has a Spark ML model (every version but those written on Spark Connect)."""
    return bool(snapshot.commit.get("spark_model")) or not snapshot.commit.get("spark_model_note")


def stored_spark_components(snapshot: Snapshot) -> np.ndarray:
    """The components (k, d) held by a version's Spark ML PCAModel, read without Spark."""
    data = snapshot.file_location(side_folder(snapshot, "spark_model")).child("data")
    files = [info.path for info in data.files(".parquet")]
    [pc] = pq.ParquetDataset(files, filesystem=data.filesystem).read(columns=["pc"]).column("pc").to_pylist()
    # Spark's DenseMatrix: numRows x numCols, column-major unless isTransposed.
    values = np.asarray(pc["values"], dtype=np.float64)
    if pc["isTransposed"]:
        return values.reshape(pc["numRows"], pc["numCols"]).T.copy()
    return values.reshape(pc["numCols"], pc["numRows"])
