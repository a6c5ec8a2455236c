"""How each kind of value is stored as a Delta table, and loaded back: the IO manager's handlers.

A handler says which types it `stores` and `loads`, stores a value as one commit on top of the
version it read (`base`), telling `report` how the commit went, and loads a version (`Snapshot`) as
a requested type. The IO manager (`fruit_assets.resources.io_manager`) picks the handler by type;
`fruit_assets.ml.pca_store` adds the PCA's.

No Dagster here.
"""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from fruit_assets.storage import Location, delta
from fruit_assets.storage.delta import Snapshot


def _spark_dataframe_class():
    # Imported lazily: a pandas-only process (the sensor, a reader) need not load pyspark.
    from pyspark.sql import DataFrame

    return DataFrame


class Handler:
    """What the IO manager asks of a handler; by default, nothing stored or loaded, nothing to expire."""

    def stores(self) -> tuple[type, ...]:
        """The types of value it stores (their subclasses too). A method: some types import lazily."""
        return ()

    def loads(self) -> tuple[type, ...]:
        """The types it loads a version as (their subclasses too)."""
        return ()

    def store(self, value, table: Location, base: Snapshot | None, commit: dict, report: delta.CommitAttempts) -> int:
        """Store `value` as one commit on top of `base`, with `commit` in its commitInfo; the new version."""
        raise NotImplementedError(f"{type(self).__name__} stores nothing")

    def load(self, snapshot: Snapshot, as_type: type):
        raise NotImplementedError(f"{type(self).__name__} loads nothing")

    def expire(self, table: Location, retention_hours: int) -> None:
        """Delete what it keeps beside the table's rows once no readable version names it."""


class TableHandler(Handler):
    """pandas DataFrames and Arrow tables, written by this process: they replace the table's rows."""

    def stores(self) -> tuple[type, ...]:
        return (pd.DataFrame, pa.Table)

    def loads(self) -> tuple[type, ...]:
        return (pd.DataFrame, pa.Table)

    def store(self, value, table: Location, base: Snapshot | None, commit: dict, report: delta.CommitAttempts) -> int:
        rows = value if isinstance(value, pa.Table) else pa.Table.from_pandas(value, preserve_index=False)
        return delta.commit_arrow(table, rows, base, commit, report=report)

    def load(self, snapshot: Snapshot, as_type: type):
        rows = delta.read_arrow(snapshot.location, snapshot.version)
        return rows if as_type is pa.Table else rows.to_pandas()


class SparkHandler(Handler):
    """Spark DataFrames (replacing the rows) and `TableChange`s (incremental), written by the Spark
    tasks in parallel; loaded as a Spark DataFrame of one version's files."""

    def stores(self) -> tuple[type, ...]:
        from fruit_assets.storage.spark_io import TableChange

        return (_spark_dataframe_class(), TableChange)

    def loads(self) -> tuple[type, ...]:
        return (_spark_dataframe_class(),)

    def store(self, value, table: Location, base: Snapshot | None, commit: dict, report: delta.CommitAttempts) -> int:
        from fruit_assets.storage import spark_io

        if isinstance(value, spark_io.TableChange):
            return spark_io.commit_change(value, table, base, commit, report=report)
        return spark_io.commit_frame(value, table, base, commit, report=report)

    def load(self, snapshot: Snapshot, as_type: type):
        from pyspark.sql import SparkSession

        from fruit_assets.storage import spark_io

        spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
        return spark_io.read_table(spark, snapshot)


class SnapshotHandler(Handler):
    """Loads the `Snapshot` itself (which version, which files, which schema): for steps that read
    only part of a table, or want to know which version they read."""

    def loads(self) -> tuple[type, ...]:
        return (Snapshot,)

    def load(self, snapshot: Snapshot, as_type: type):
        return snapshot
