"""Spark reads and writes the Delta tables (`storage.delta`) through pyarrow, locally and on S3.

The pip pyspark has no S3A connector and none can be downloaded here, so Spark cannot open `s3://`
itself, and has no Delta reader either. pyarrow fills both gaps:
- Writing: each Spark task streams its Arrow batches into Parquet files of its own, straight into the
  table's folder (nothing is collected to the driver but the files' names, sizes and row counts).
  The driver then commits them in one Delta transaction (`delta.commit`).
- Reading: a Spark 4 Python data source whose partitions are the data files of one version of the
  table, as listed in its Delta log, never a folder listing (which would also see removed files and
  files of uncommitted writes).

    register(spark)
    spark.read.format(FORMAT).option("path", table_uri).option("version", 3).load()
    files = write_files(df, table_location)   # then delta.commit(...)

No Dagster here.
"""

from __future__ import annotations

import inspect
import json
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import StringType, StructField, StructType

from fruit_assets.storage import Location, delta, resolve
from fruit_assets.storage.delta import DataFile, Snapshot, nullable

FORMAT = "fruit_delta"
ROWS_PER_FILE = 4096  # ~21 MB of 1280-float vectors: a rewrite of one file stays cheap
_registered: weakref.WeakSet[SparkSession] = weakref.WeakSet()


@dataclass(frozen=True)
class TableChange:
    """A write planned on `base`, the version it read: add `rows` and remove the data files `removed`
    (or, with `replace`, everything `base` holds), in one commit. `commit_metadata` goes into the
    commit, for later readers of this version."""

    rows: DataFrame | pa.Table  # an Arrow table: rows computed on the driver, written by it
    base: Snapshot | None
    removed: list[str] = field(default_factory=list)
    replace: bool = False
    commit_metadata: dict = field(default_factory=dict)


def register(spark: SparkSession) -> None:
    """Register the data source with this session, once (registering again only logs a warning)."""
    if spark not in _registered:
        spark.dataSource.register(DeltaDataSource)
        _registered.add(spark)


# Spark insists that batches returned by a Python data source match the declared schema exactly
# (DATA_SOURCE_RETURN_SCHEMA_MISMATCH), and declared schemas are nullable: the reader casts every batch
# to the `nullable` schema.


def spark_to_arrow_schema(schema) -> pa.Schema:
    """pyspark's `to_arrow_schema` with timestamps in UTC, on every supported pyspark: 4.3 takes
    `timezone="UTC"`, while 4.0.0 (Databricks 17.3 LTS) and 4.1.0 (18 LTS) have no such argument and
    give UTC timestamps by default (`timestamp_utc=True`). Found by running the steps on the emulated
    runtimes (issue 22): every Spark step failed at its first write with "unexpected keyword argument"."""
    if "timezone" in inspect.signature(to_arrow_schema).parameters:
        return to_arrow_schema(schema, timezone="UTC")
    return to_arrow_schema(schema)


def arrow_schema(frame: DataFrame) -> pa.Schema:
    """The Arrow schema of a Spark DataFrame's rows, as stored in a table."""
    return nullable(spark_to_arrow_schema(frame.schema))


def read_table(
    spark: SparkSession,
    snapshot: Snapshot,
    files: list[str] | None = None,
    columns: list[str] | None = None,
    file_column: str | None = None,
) -> DataFrame:
    """A version of a table as a Spark DataFrame: all its files, or only `files` of them; all its
    columns, or only `columns` (only those are read from the files). With `file_column`, each row
    also says which data file holds it."""
    register(spark)
    reader = spark.read.format(FORMAT).option("path", snapshot.location.uri).option("version", str(snapshot.version))
    if files is not None:
        reader = reader.option("files", json.dumps(sorted(files)))
    if columns is not None:
        reader = reader.option("columns", json.dumps(columns))
    if file_column:
        reader = reader.option("file_column", file_column)
    return reader.load()


class DeltaDataSource(DataSource):
    @classmethod
    def name(cls) -> str:
        return FORMAT

    def _snapshot(self) -> Snapshot:
        location = resolve(self.options["path"], setting=f"{FORMAT} path")
        found = delta.snapshot(location, int(self.options["version"]) if "version" in self.options else None)
        if found is None:
            raise FileNotFoundError(f"no Delta table at {location.uri}")
        return found

    def schema(self) -> StructType:
        stored = nullable(self._snapshot().schema)
        if "columns" in self.options:
            stored = pa.schema([stored.field(name) for name in json.loads(self.options["columns"])])
        schema = from_arrow_schema(stored)
        if "file_column" in self.options:
            schema = schema.add(StructField(self.options["file_column"], StringType(), True))
        return schema

    def reader(self, schema: StructType) -> DataSourceReader:
        snapshot = self._snapshot()
        files = json.loads(self.options["files"]) if "files" in self.options else [f.path for f in snapshot.files]
        known = {f.path for f in snapshot.files}
        unknown = sorted(set(files) - known)
        if unknown:
            raise FileNotFoundError(f"{snapshot.location.uri} version {snapshot.version} has no data file {unknown[0]}")
        return _Reader(snapshot.location.uri, files, schema, self.options.get("file_column"))


class _Reader(DataSourceReader):
    def __init__(self, uri: str, files: list[str], schema: StructType, file_column: str | None):
        self.uri, self.files, self.schema, self.file_column = uri, files, schema, file_column

    def partitions(self):
        return [InputPartition(name) for name in self.files]

    def read(self, partition):
        if partition.value is None:  # Spark's one partition of a source that listed none
            return
        location = resolve(self.uri).child(partition.value)
        target = nullable(spark_to_arrow_schema(self.schema))
        data_columns = [name for name in target.names if name != self.file_column]
        data_schema = pa.schema([target.field(name) for name in data_columns])
        with location.filesystem.open_input_file(location.path) as source:
            for batch in pq.ParquetFile(source).iter_batches(batch_size=1024, columns=data_columns):
                batch = batch.cast(data_schema)
                if self.file_column:
                    names = pa.array([partition.value] * batch.num_rows, type=pa.string())
                    batch = pa.RecordBatch.from_arrays([*batch.columns, names], schema=target)
                yield batch


_WRITTEN_SCHEMA = "path string, size long, rows long"


class WriteAbandoned(RuntimeError):
    """A task of a parallel write found the write's token gone (`delta.open_write`): the job had failed."""


def _file_writer(uri: str, schema: pa.Schema, rows_per_file: int, prefix: str):
    """The per-partition step of `write_files` (runs in Spark's Python workers)."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        location = resolve(uri)
        written: list[DataFile] = []
        for chunk in _chunks(batches, rows_per_file):
            table = pa.Table.from_batches(chunk).cast(schema)
            if not delta.write_is_open(location, prefix):  # the job failed: write nothing more
                raise WriteAbandoned(f"{uri}: write {prefix} was abandoned (another task failed); no file written")
            written.append(delta.write_arrow_file(location, table, delta.new_file_name(prefix)))
            if not delta.write_is_open(location, prefix):  # it failed while this file was written: the driver's
                delta.discard(location, written)  # clean-up may have missed it
                raise WriteAbandoned(f"{uri}: write {prefix} was abandoned (another task failed); its files are removed")
        if written:
            yield pa.RecordBatch.from_pydict(
                {"path": [f.path for f in written], "size": [f.size for f in written], "rows": [f.rows for f in written]}
            )

    return write


def _chunks(batches: Iterator[pa.RecordBatch], rows_per_file: int) -> Iterator[list[pa.RecordBatch]]:
    """The batches regrouped into lists of at most `rows_per_file` rows (empty batches dropped)."""
    chunk, rows = [], 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows_per_file - rows, batch.num_rows)
            chunk.append(batch.slice(0, take))
            rows, batch = rows + take, batch.slice(take)
            if rows == rows_per_file:
                yield chunk
                chunk, rows = [], 0
    if chunk:
        yield chunk


def write_files(frame: DataFrame, location: Location, rows_per_file: int = ROWS_PER_FILE) -> tuple[list[DataFile], pa.Schema]:
    """Write the rows of `frame` as Parquet data files into the table folder, in parallel (each task
    its own files, at most `rows_per_file` rows each). Returns the files and their schema, for the
    commit. Nothing is committed here."""
    schema = arrow_schema(frame)
    prefix = f"part-{uuid.uuid4().hex[:12]}"  # this write's files, to clean up if it fails
    delta.open_write(location, prefix)
    try:
        rows = frame.mapInArrow(_file_writer(location.uri, schema, rows_per_file, prefix), _WRITTEN_SCHEMA).collect()
    except BaseException:
        delta.close_write(location, prefix)  # first: a task still writing then removes its own file
        delta.discard_prefix(location, prefix)
        raise
    delta.close_write(location, prefix)
    return [DataFile(row.path, row.size, row.rows) for row in rows], schema


def commit_frame(
    frame: DataFrame, location: Location, base: Snapshot | None, metadata: dict, *, report: delta.CommitAttempts | None = None
) -> int:
    """Replace the table's rows by `frame`'s, written by the Spark tasks, in one commit."""
    files, schema = write_files(frame, location)
    return delta.commit_or_discard(location, files, schema, base, metadata, mode=delta.Mode.OVERWRITE, report=report)


def commit_change(
    change: TableChange, location: Location, base: Snapshot | None, metadata: dict, *, report: delta.CommitAttempts | None = None
) -> int:
    """Write `change.rows` and commit them with the removal of `change.removed`, if the table is still
    at the version the change was planned on."""
    planned_on = None if change.base is None else change.base.version
    if (None if base is None else base.version) != planned_on:
        raise delta.TableConflictError(
            f"{location.uri}: another run committed to this Delta table after this run planned its change "
            f"on version {planned_on}; nothing was committed. Run again to build on the new version."
        )
    rows = change.rows
    if isinstance(rows, DataFrame):
        files, schema = write_files(rows, location)
    else:  # an Arrow table, computed on the driver: written here, in one file
        files = [delta.write_arrow_file(location, rows)] if rows.num_rows else []
        schema = nullable(rows.schema)
    if not change.replace and base is not None and not delta.same_schema(schema, base.schema):
        delta.discard(location, files)
        raise ValueError(f"{location.uri}: the new rows' schema {schema} differs from the table's {base.schema}")
    mode = delta.Mode.OVERWRITE if change.replace else delta.Mode.APPEND
    return delta.commit_or_discard(
        location, files, schema, base, metadata | change.commit_metadata, mode=mode, removed=change.removed, report=report
    )
