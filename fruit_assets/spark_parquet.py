"""Spark reads and writes Parquet datasets on any pyarrow filesystem (local or S3).

The pip pyspark has no S3A connector and none can be downloaded here, so Spark cannot open `s3://`
itself. Spark 4's Python Data Source API lets us plug pyarrow in instead: each task streams its Arrow
record batches straight into its own Parquet file (executors write their own partitions: nothing is
collected to the driver), and each read task reads one file. The same code serves local folders, so
there is one tested path, not two.

Usage (the format is registered on first use by `register`):

    register(spark)
    spark.read.format(FORMAT).load("s3://bucket/prefix/image_features")
    df.write.format(FORMAT).mode("append").save(staging_uri)   # a fresh staging folder: see storage
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import SparkSession
from pyspark.sql.datasource import (
    DataSource,
    DataSourceArrowWriter,
    DataSourceReader,
    InputPartition,
    WriterCommitMessage,
)
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import StructType

from fruit_assets.storage import resolve

FORMAT = "fruit_parquet"


def register(spark: SparkSession) -> None:
    spark.dataSource.register(ParquetDataSource)


def _nullable(schema: pa.Schema) -> pa.Schema:
    # Parquet written from Spark marks fields non-null; Spark insists that batches returned by a Python
    # data source match the declared schema exactly (DATA_SOURCE_RETURN_SCHEMA_MISMATCH), and declared
    # schemas are nullable. Declare and return everything nullable.
    return pa.schema([field.with_nullable(True) for field in schema], metadata=None)


@dataclass
class _WrittenFile(WriterCommitMessage):
    name: str | None


class ParquetDataSource(DataSource):
    @classmethod
    def name(cls) -> str:
        return FORMAT

    def _location(self):
        return resolve(self.options["path"], setting=f"{FORMAT} path")

    def schema(self) -> StructType:
        location = self._location()
        files = location.files(".parquet")
        if not files:
            raise FileNotFoundError(f"no Parquet files under {location.uri}")
        arrow_schema = pq.read_schema(files[0].path, filesystem=location.filesystem)
        return from_arrow_schema(_nullable(arrow_schema))

    def reader(self, schema: StructType) -> DataSourceReader:
        return _Reader(self.options["path"], schema)

    def writer(self, schema: StructType, overwrite: bool) -> DataSourceArrowWriter:
        return _Writer(self.options["path"], schema)


class _Reader(DataSourceReader):
    def __init__(self, uri: str, schema: StructType):
        self.uri = uri
        self.schema = schema

    def partitions(self):
        location = resolve(self.uri)
        return [InputPartition(info.path) for info in location.files(".parquet")]

    def read(self, partition):
        location = resolve(self.uri)
        target = _nullable(to_arrow_schema(self.schema, timezone="UTC"))
        with location.filesystem.open_input_file(partition.value) as source:
            parquet = pq.ParquetFile(source)
            for batch in parquet.iter_batches(batch_size=1024, columns=target.names):
                yield batch.cast(target)


class _Writer(DataSourceArrowWriter):
    """Each task writes one uniquely named file into the (staging) folder; the driver's commit removes
    files left by failed or speculative attempts, so the folder holds every row exactly once."""

    def __init__(self, uri: str, schema: StructType):
        self.uri = uri
        self.schema = schema

    def write(self, iterator):
        from pyspark import TaskContext

        context = TaskContext.get()
        partition = context.partitionId() if context is not None else 0
        name = f"part-{partition:05d}-{uuid.uuid4().hex[:12]}.parquet"
        location = resolve(self.uri).child(name)
        first = next(iterator, None)
        if first is None:
            return _WrittenFile(None)
        with location.filesystem.open_output_stream(location.path) as sink:
            with pq.ParquetWriter(sink, first.schema) as writer:
                writer.write_batch(first)
                for batch in iterator:
                    writer.write_batch(batch)
        return _WrittenFile(name)

    def commit(self, messages):
        location = resolve(self.uri)
        written = {message.name for message in messages if message is not None and message.name}
        for info in location.files():
            if info.base_name not in written:
                location.filesystem.delete_file(info.path)
        if not written:
            # Keep the schema even for an empty result: readers need at least one file to know it.
            empty = _nullable(to_arrow_schema(self.schema, timezone="UTC")).empty_table()
            pq.write_table(empty, location.child("part-00000-empty.parquet").path,
                           filesystem=location.filesystem)

    def abort(self, messages):
        location = resolve(self.uri)
        for info in location.files():
            location.filesystem.delete_file(info.path)
