"""The Parquet IO manager: every asset is a Parquet dataset at `<base_uri>/<asset name>/`.

`base_uri` is a local folder or `s3://bucket/prefix`; both go through pyarrow (see `storage`). Outputs
are written to a staging folder and published only once complete, so a failed materialization leaves
the last good one in place. The datasets need nothing but a Parquet reader: pandas, pyarrow, DuckDB.

What it stores, by the type of the asset's value:
- pandas DataFrame: one Parquet file.
- Spark DataFrame: one file per Spark partition, written by the executors (`spark_parquet`).
- `ml.pca.PcaResult`: the components table (component, explained variance, cumulative, loadings) as
  Parquet for pandas users, the Spark ML model itself in `_spark_model/` for `PCAModel.load`, and the
  statistics it was computed from (row count, feature sums, Gram matrix) in `_statistics/`.
Inputs are loaded as the downstream asset's parameter annotation asks (Spark DataFrame, PcaResult,
PCAModel or pandas DataFrame).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from dagster import (
    AssetKey,
    ConfigurableIOManager,
    InputContext,
    MetadataValue,
    OutputContext,
    TableColumn,
    TableSchema,
)
from pydantic import Field

from fruit_assets import storage
from fruit_assets.ml.pca import FeatureStatistics, PcaResult, components_table, to_spark_model

SPARK_MODEL_DIR = "_spark_model"
STATISTICS_DIR = "_statistics"


def _spark_types():
    # Imported lazily: pure-pandas steps (raw_images) should not pay for pyspark.
    from pyspark.ml.feature import PCAModel
    from pyspark.sql import DataFrame as SparkDataFrame

    return SparkDataFrame, PCAModel


def _active_spark():
    from pyspark.sql import SparkSession

    return SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()


def table_schema(schema: pa.Schema) -> TableSchema:
    return TableSchema(columns=[TableColumn(name=field.name, type=str(field.type)) for field in schema])


def dataset_stats(location: storage.Location) -> tuple[int, pa.Schema]:
    """Row count and schema of a published dataset, from the Parquet footers only."""
    files = location.files(".parquet")
    rows, schema = 0, None
    for info in files:
        metadata = pq.read_metadata(info.path, filesystem=location.filesystem)
        rows += metadata.num_rows
        schema = schema or metadata.schema.to_arrow_schema()
    return rows, schema


class ParquetIOManager(ConfigurableIOManager):
    """Persists assets as Parquet datasets under `base_uri` (a local folder or s3://bucket/prefix)."""

    base_uri: str = Field(description="Local folder or s3://bucket/prefix (FRUIT_STORAGE_URI).")

    def root(self) -> storage.Location:
        return storage.resolve(self.base_uri, setting="FRUIT_STORAGE_URI")

    def setup_for_execution(self, context) -> None:
        storage.check_reachable(self.root(), "FRUIT_STORAGE_URI")

    def location(self, context: OutputContext | InputContext) -> storage.Location:
        return self.root().child(*context.asset_key.path)

    def handle_output(self, context: OutputContext, obj) -> None:
        if obj is None:
            return
        root = self.root()
        target = self.location(context)
        name = "-".join(context.asset_key.path)
        staging = storage.new_staging(root, name)
        try:
            self._write(obj, staging)
            storage.publish(staging, target)
        except BaseException:
            storage.discard(staging)
            raise
        rows, schema = dataset_stats(target)
        context.add_output_metadata(
            {
                "path": MetadataValue.path(target.uri),
                "dagster/uri": MetadataValue.path(target.uri),
                "dagster/row_count": rows,
                "dagster/column_schema": table_schema(schema),
            }
        )

    def _write(self, obj, staging: storage.Location) -> None:
        SparkDataFrame, PCAModel = _spark_types()
        if isinstance(obj, pd.DataFrame):
            self._write_pandas(obj, staging)
        elif isinstance(obj, SparkDataFrame):
            from fruit_assets import spark_parquet

            spark_parquet.register(obj.sparkSession)
            obj.write.format(spark_parquet.FORMAT).mode("append").save(staging.uri)
        elif isinstance(obj, PcaResult):
            self._write_pandas(components_table(obj), staging)
            self._write_pandas(statistics_table(obj.statistics), staging.child(STATISTICS_DIR))
            model = to_spark_model(_active_spark(), obj.components, obj.explained_variance)
            self._write_spark_model(model, staging.child(SPARK_MODEL_DIR))
        else:
            raise TypeError(f"ParquetIOManager cannot store a {type(obj).__name__}")

    @staticmethod
    def _write_pandas(frame: pd.DataFrame, staging: storage.Location) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        staging.filesystem.create_dir(staging.path, recursive=True)
        # Spark's timestamps are microseconds; nanoseconds would not round-trip through Spark.
        pq.write_table(
            table,
            staging.child("part-00000.parquet").path,
            filesystem=staging.filesystem,
            coerce_timestamps="us",
            allow_truncated_timestamps=True,
        )

    @staticmethod
    def _write_spark_model(model, destination: storage.Location) -> None:
        if destination.is_local:
            model.write().overwrite().save(destination.path)
            return
        # Spark cannot write to S3 here: save to scratch space, then upload the folder with pyarrow.
        with _spark_scratch() as (spark_path, local_path):
            model.write().save(spark_path)
            pafs.copy_files(local_path, destination.path, destination_filesystem=destination.filesystem)

    def load_input(self, context: InputContext):
        stored = self.load_stored(context.asset_key, context.dagster_type.typing_type)
        if stored is None:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has no stored data at "
                f"{self.root().child(*context.asset_key.path).uri}: materialize it first"
            )
        return stored

    def load_stored(self, asset_key: AssetKey, as_type=pd.DataFrame):
        """The stored version of an asset as `as_type` (Spark DataFrame, PCAModel or pandas
        DataFrame), or None if it was never materialized. Assets use it to build on their own last
        version (incremental featurization)."""
        location = self.root().child(*asset_key.path)
        if not location.files():
            return None
        SparkDataFrame, PCAModel = _spark_types()
        if as_type is SparkDataFrame:
            from fruit_assets import spark_parquet

            spark = _active_spark()
            spark_parquet.register(spark)
            return spark.read.format(spark_parquet.FORMAT).load(location.uri)
        if as_type is PCAModel:
            return self._load_spark_model(location.child(SPARK_MODEL_DIR), PCAModel)
        if as_type is PcaResult:
            return pca_result_of(_read_pandas(location), _read_pandas(location.child(STATISTICS_DIR)))
        return _read_pandas(location)

    def stored_spark_components(self, asset_key: AssetKey) -> np.ndarray:
        """The components (k, d) held by the stored Spark ML PCAModel, read without Spark."""
        location = self.root().child(*asset_key.path, SPARK_MODEL_DIR, "data")
        files = [info.path for info in location.files(".parquet")]
        [pc] = pq.ParquetDataset(files, filesystem=location.filesystem).read(columns=["pc"]).column("pc").to_pylist()
        # Spark's DenseMatrix: numRows x numCols, column-major unless isTransposed.
        values = np.asarray(pc["values"], dtype=np.float64)
        if pc["isTransposed"]:
            return values.reshape(pc["numRows"], pc["numCols"]).T.copy()
        return values.reshape(pc["numCols"], pc["numRows"])

    @staticmethod
    def _load_spark_model(source: storage.Location, model_class):
        if source.is_local:
            return model_class.load(source.path)
        # Spark ML reads models through Hadoop filesystems only: fetch a copy into scratch space first.
        # The model is small (k x 1280 doubles), and load() reads it eagerly, so the copy can go after.
        with _spark_scratch() as (spark_path, local_path):
            pafs.copy_files(source.path, local_path, source_filesystem=source.filesystem)
            return model_class.load(spark_path)


def _read_pandas(location: storage.Location) -> pd.DataFrame:
    files = [info.path for info in location.files(".parquet")]
    return pq.ParquetDataset(files, filesystem=location.filesystem).read().to_pandas()


def statistics_table(statistics: FeatureStatistics) -> pd.DataFrame:
    """The PCA's sufficient statistics as one row: rows, sums (d), gram (d*d, row-major)."""
    return pd.DataFrame(
        {"rows": [statistics.rows], "sums": [statistics.sums], "gram": [statistics.gram.ravel()]}
    )


def pca_result_of(components: pd.DataFrame, statistics: pd.DataFrame) -> PcaResult:
    [row] = statistics.itertuples()
    dimensions = len(row.sums)
    stats = FeatureStatistics(
        int(row.rows), np.asarray(row.sums, dtype=np.float64), np.asarray(row.gram, dtype=np.float64).reshape(dimensions, dimensions)
    )
    components = components.sort_values("component")
    explained = components.explained_variance.to_numpy(dtype=np.float64)
    return PcaResult(
        components=np.stack(components.loadings).astype(np.float64) if len(components) else np.zeros((0, dimensions)),
        eigenvalues=explained * np.trace(stats.covariance()),
        explained_variance=explained,
        statistics=stats,
    )


@contextmanager
def _spark_scratch():
    """A temporary folder that Spark (driver and executors) and this Python process both see, as
    (path for Spark, path for Python). Locally a temp dir; on a Databricks cluster a DBFS folder, since
    a multi-node cluster's executors cannot see the driver's local disk."""
    if os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        name = f"tmp/fruit_assets/{uuid.uuid4().hex}"
        try:
            yield f"dbfs:/{name}", f"/dbfs/{name}"
        finally:
            shutil.rmtree(f"/dbfs/{name}", ignore_errors=True)
        return
    with tempfile.TemporaryDirectory() as scratch:
        path = posixpath.join(scratch, "model")
        yield path, path
