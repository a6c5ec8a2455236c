"""The Delta IO manager: every asset is a Delta table at `<base_uri>/<asset name>/`.

`base_uri` is a local folder or `s3://bucket/prefix`. Each materialization is one atomic commit, so a
reader sees the last version or the new one, never a mix, and a failed or killed materialization
leaves the last version in place. Each materialization records its table version in its metadata
(`delta_version`); `DeltaTable(uri, version=N)` or polars' `read_delta(uri, version=N)` read it again
until the retention period (`retention_hours`, default 7 days) has passed since it was replaced.

What it stores, by the type of the asset's value:
- pandas DataFrame: written by this process, replacing the table's rows.
- Spark DataFrame: written by the Spark tasks in parallel (`spark_delta`), replacing the rows.
- `TableChange`: rows to add and data files to remove (or everything to replace), on top of the version
  the change was planned on (incremental featurization).
- `ml.pca.PcaResult`: the components table (component, explained variance, cumulative, loadings) as
  the table's rows; the same model as a Spark ML `PCAModel`, and the statistics it was computed from
  (row count, feature sums, Gram matrix), in folders beside them (`_spark_model/<id>/`,
  `_statistics/<id>/`) that the commit names, so every version loads its own model.
Inputs are loaded as the downstream parameter's annotation asks (Spark DataFrame, PcaResult,
PCAModel, pandas DataFrame, or the `Snapshot` of the latest version: which version, which files).

A folder written by an earlier release (plain Parquet files, no `_delta_log/`) becomes a Delta table
in place on first use: its files are committed as version 0, nothing is copied or deleted.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
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

from fruit_assets import delta_tables, storage
from fruit_assets.delta_tables import DataFile, Snapshot
from fruit_assets.spark_delta import TableChange
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


class DeltaIOManager(ConfigurableIOManager):
    """Persists assets as Delta tables under `base_uri` (a local folder or s3://bucket/prefix)."""

    base_uri: str = Field(description="Local folder or s3://bucket/prefix (FRUIT_STORAGE_URI).")
    retention_hours: int = Field(
        default=delta_tables.DEFAULT_RETENTION_HOURS,
        ge=0,
        description="FRUIT_RETENTION_HOURS: how long a replaced version stays readable (time travel) "
        "before vacuum deletes its files. Default 168 (7 days).",
    )

    def root(self) -> storage.Location:
        return storage.resolve(self.base_uri, setting="FRUIT_STORAGE_URI")

    def setup_for_execution(self, context) -> None:
        storage.check_reachable(self.root(), "FRUIT_STORAGE_URI")

    def table(self, asset_key: AssetKey) -> storage.Location:
        return self.root().child(*asset_key.path)

    def snapshot(self, asset_key: AssetKey, version: int | None = None) -> Snapshot | None:
        """The table of an asset at `version` (default: latest); None if never materialized. A folder
        of plain Parquet files from an earlier release is converted to a Delta table first."""
        location = self.table(asset_key)
        found = delta_tables.snapshot(location, version)
        if found is None and version is None and legacy_parquet_files(location):
            convert_legacy_folder(location)
            found = delta_tables.snapshot(location)
        return found

    # -- writing -----------------------------------------------------------------------------

    def handle_output(self, context: OutputContext, obj) -> None:
        if obj is None:
            return
        location = self.table(context.asset_key)
        base = self.snapshot(context.asset_key)
        started = time.perf_counter()
        version = self._write(obj, location, base, {"run_id": context.run_id})
        written = time.perf_counter() - started
        self._vacuum(location)
        stored = delta_tables.snapshot(location, version)
        before = {f.path for f in base.files} if base is not None and base.table_id == stored.table_id else set()
        added = [f for f in stored.files if f.path not in before]
        context.add_output_metadata(
            {
                "path": MetadataValue.path(location.uri),
                "dagster/uri": MetadataValue.path(location.uri),
                "dagster/row_count": stored.rows,
                "dagster/column_schema": table_schema(stored.schema),
                "delta_version": version,
                "files_added": len(added),
                "files_removed": len(before - {f.path for f in stored.files}),
                "bytes_written": sum(f.size for f in added),
                "write_seconds": round(written, 2),
            }
        )

    def _write(self, obj, location: storage.Location, base: Snapshot | None, metadata: dict) -> int:
        SparkDataFrame, _ = _spark_types()
        if isinstance(obj, pd.DataFrame):
            return _commit_arrow(location, base, pa.Table.from_pandas(obj, preserve_index=False), metadata)
        if isinstance(obj, SparkDataFrame):
            from fruit_assets import spark_delta

            files, schema = spark_delta.write_files(obj, location)
            return _commit_or_discard(location, files, schema, base, metadata, replace=True)
        if isinstance(obj, TableChange):
            return self._write_change(obj, location, base, metadata)
        if isinstance(obj, PcaResult):
            return self._write_pca(obj, location, base, metadata)
        raise TypeError(f"DeltaIOManager cannot store a {type(obj).__name__}")

    @staticmethod
    def _write_change(change: TableChange, location, base: Snapshot | None, metadata: dict) -> int:
        from fruit_assets import spark_delta

        planned_on = None if change.base is None else change.base.version
        if (None if base is None else base.version) != planned_on:
            raise delta_tables.TableConflictError(
                f"{location.uri}: another run committed to this Delta table after this run planned its change "
                f"on version {planned_on}; nothing was committed. Run again to build on the new version."
            )
        files, schema = spark_delta.write_files(change.rows, location)
        if not change.replace and not delta_tables.same_schema(schema, base.schema):
            delta_tables.discard(location, files)
            raise ValueError(f"{location.uri}: the new rows' schema {schema} differs from the table's {base.schema}")
        return _commit_or_discard(
            location, files, schema, base, metadata | change.commit_metadata, replace=change.replace, removed=change.removed
        )

    @staticmethod
    def _write_pca(result: PcaResult, location, base: Snapshot | None, metadata: dict) -> int:
        side = _side_folder_name()
        table = pa.Table.from_pandas(components_table(result), preserve_index=False)
        delta_tables.write_arrow_file(
            location.child(STATISTICS_DIR, side), pa.Table.from_pandas(statistics_table(result.statistics), preserve_index=False), "statistics.parquet"
        )
        model = to_spark_model(_active_spark(), result.components, result.explained_variance)
        _save_spark_model(model, location.child(SPARK_MODEL_DIR, side))
        sides = {"spark_model": f"{SPARK_MODEL_DIR}/{side}", "statistics": f"{STATISTICS_DIR}/{side}"}
        return _commit_arrow(location, base, table, metadata | {"provenance": result.provenance} | sides)

    def _vacuum(self, location: storage.Location) -> None:
        delta_tables.vacuum(location, self.retention_hours)
        for folder in (SPARK_MODEL_DIR, STATISTICS_DIR):
            _expire_side_folders(location.child(folder), self.retention_hours)

    # -- reading -----------------------------------------------------------------------------

    def load_input(self, context: InputContext):
        stored = self.load_stored(context.asset_key, context.dagster_type.typing_type)
        if stored is None:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has no stored data at "
                f"{self.table(context.asset_key).uri}: materialize it first"
            )
        return stored

    def load_stored(self, asset_key: AssetKey, as_type=pd.DataFrame, version: int | None = None):
        """A version (default: the latest) of an asset as `as_type` (Spark DataFrame, PcaResult,
        PCAModel, pandas DataFrame, or the `Snapshot` itself: which version, which files), or None if
        it was never materialized."""
        snapshot = self.snapshot(asset_key, version)
        if snapshot is None:
            return None
        if as_type is Snapshot:
            return snapshot
        if as_type is pa.Table:
            return delta_tables.read_arrow(snapshot.location, snapshot.version)
        SparkDataFrame, PCAModel = _spark_types()
        if as_type is SparkDataFrame:
            from fruit_assets import spark_delta

            return spark_delta.read_table(_active_spark(), snapshot)
        if as_type is PcaResult:
            return pca_result_of(snapshot)
        if as_type is PCAModel:
            return _load_spark_model(snapshot.file_location(_side_folder(snapshot, "spark_model")), PCAModel)
        return delta_tables.read_arrow(snapshot.location, snapshot.version).to_pandas()

    def stored_spark_components(self, asset_key: AssetKey, version: int | None = None) -> np.ndarray:
        """The components (k, d) held by a version of the stored Spark ML PCAModel, read without Spark."""
        snapshot = self.snapshot(asset_key, version)
        data = snapshot.file_location(_side_folder(snapshot, "spark_model")).child("data")
        files = [info.path for info in data.files(".parquet")]
        [pc] = pq.ParquetDataset(files, filesystem=data.filesystem).read(columns=["pc"]).column("pc").to_pylist()
        # Spark's DenseMatrix: numRows x numCols, column-major unless isTransposed.
        values = np.asarray(pc["values"], dtype=np.float64)
        if pc["isTransposed"]:
            return values.reshape(pc["numRows"], pc["numCols"]).T.copy()
        return values.reshape(pc["numCols"], pc["numRows"])


def _commit_arrow(location, base: Snapshot | None, table: pa.Table, metadata: dict) -> int:
    file = delta_tables.write_arrow_file(location, table)
    schema = pq.read_schema(posixpath.join(location.path, file.path), filesystem=location.filesystem)
    from fruit_assets.spark_delta import nullable

    return _commit_or_discard(location, [file], nullable(schema), base, metadata, replace=True)


def _commit_or_discard(location, files: list[DataFile], schema: pa.Schema, base, metadata: dict, replace=False, removed=None) -> int:
    try:
        return delta_tables.commit(location, files, schema, base, removed=removed, replace=replace, metadata=metadata)
    except BaseException:
        delta_tables.discard(location, files)
        raise


# -- legacy Parquet folders ------------------------------------------------------------------------


def legacy_parquet_files(location: storage.Location) -> list[pafs.FileInfo]:
    """The data files of a folder written by the release before Delta: top-level *.parquet files."""
    selector = pafs.FileSelector(location.path, allow_not_found=True)
    infos = location.filesystem.get_file_info(selector)
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))),
        key=lambda i: i.path,
    )


def convert_legacy_folder(location: storage.Location) -> int:
    """Commit a legacy folder's Parquet files, in place, as version 0 of a Delta table (what
    `deltalake.convert_to_deltalake` does; it cannot skip pca_model's `_spark_model/` folder)."""
    infos = legacy_parquet_files(location)
    files, schema = [], None
    for info in infos:
        metadata = pq.read_metadata(info.path, filesystem=location.filesystem)
        schema = schema or metadata.schema.to_arrow_schema()
        files.append(DataFile(info.base_name, info.size, metadata.num_rows))
    from fruit_assets.spark_delta import nullable

    return delta_tables.commit(location, files, nullable(schema), None, metadata={"converted_from": "parquet folder"})


# -- the PCA's side folders ----------------------------------------------------------------------


def _side_folder_name() -> str:
    # Sortable by creation time, so that retention can tell which folders were superseded when.
    return f"{int(time.time() * 1000):015d}-{uuid.uuid4().hex[:8]}"


def _side_folder(snapshot: Snapshot, kind: str) -> str:
    folder = snapshot.commit.get(kind)
    if not folder:
        raise FileNotFoundError(
            f"{snapshot.location.uri} version {snapshot.version} has no {kind.replace('_', ' ')}: it was "
            "stored by an earlier release. Materialize pca_model again."
        )
    return folder


def _expire_side_folders(parent: storage.Location, retention_hours: int) -> None:
    """Delete the side folders superseded more than `retention_hours` ago: a folder's version stays
    readable until the version after it is that old (which is when vacuum removes its data too)."""
    selector = pafs.FileSelector(parent.path, allow_not_found=True)
    folders = sorted(i.base_name for i in parent.filesystem.get_file_info(selector) if i.type == pafs.FileType.Directory)
    cutoff_ms = (time.time() - retention_hours * 3600) * 1000
    for older, newer in zip(folders, folders[1:]):
        if int(newer.split("-")[0]) < cutoff_ms:
            parent.filesystem.delete_dir(parent.child(older).path)


def statistics_table(statistics: FeatureStatistics) -> pd.DataFrame:
    """The PCA's sufficient statistics as one row: rows, sums (d), gram (d*d, row-major)."""
    return pd.DataFrame({"rows": [statistics.rows], "sums": [statistics.sums], "gram": [statistics.gram.ravel()]})


def pca_result_of(snapshot: Snapshot) -> PcaResult:
    statistics_folder = snapshot.file_location(_side_folder(snapshot, "statistics"))
    [row] = pq.read_table(statistics_folder.child("statistics.parquet").path, filesystem=statistics_folder.filesystem).to_pylist()
    dimensions = len(row["sums"])
    stats = FeatureStatistics(
        int(row["rows"]), np.asarray(row["sums"], dtype=np.float64), np.asarray(row["gram"], dtype=np.float64).reshape(dimensions, dimensions)
    )
    components = delta_tables.read_arrow(snapshot.location, snapshot.version).to_pandas().sort_values("component")
    explained = components.explained_variance.to_numpy(dtype=np.float64)
    return PcaResult(
        components=np.stack(components.loadings).astype(np.float64) if len(components) else np.zeros((0, dimensions)),
        eigenvalues=explained * np.trace(stats.covariance()),
        explained_variance=explained,
        statistics=stats,
        provenance=snapshot.commit.get("provenance", {}),
    )


# -- Spark ML models on any filesystem -------------------------------------------------------------


def _save_spark_model(model, destination: storage.Location) -> None:
    if destination.is_local:
        model.write().overwrite().save(destination.path)
        return
    # Spark cannot write to S3 here: save to scratch space, then upload the folder with pyarrow.
    with _spark_scratch() as (spark_path, local_path):
        model.write().save(spark_path)
        pafs.copy_files(local_path, destination.path, destination_filesystem=destination.filesystem)


def _load_spark_model(source: storage.Location, model_class):
    if source.is_local:
        return model_class.load(source.path)
    # Spark ML reads models through Hadoop filesystems only: fetch a copy into scratch space first.
    # The model is small (k x 1280 doubles), and load() reads it eagerly, so the copy can go after.
    with _spark_scratch() as (spark_path, local_path):
        pafs.copy_files(source.path, local_path, source_filesystem=source.filesystem)
        return model_class.load(spark_path)


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
