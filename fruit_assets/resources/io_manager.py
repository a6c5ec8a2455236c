"""The IO manager: every asset is a Delta table at `<FRUIT_STORAGE_URI>/<asset name>/`.

Each materialization is one atomic commit, on top of the version the step read: a reader sees the
last version or the new one, never a mix, and a failed or killed materialization leaves the last
version in place. The metadata names the version (`delta_version`) and what the commit wrote.

A handler per stored type does the work (`storage.handlers`, `ml.pca_store`):

| value | stored as | loaded as |
| --- | --- | --- |
| pandas DataFrame, Arrow table | the table's rows, written by this process | the same |
| Spark DataFrame | the table's rows, written by the Spark tasks | Spark DataFrame |
| `TableChange` | rows added and data files removed, in one commit | - |
| `PcaResult` | components as rows; statistics and Spark ML model beside | `PcaResult`, `PCAModel` |
| - | - | `Snapshot` (which version, which files) |

The type to load comes from the downstream parameter's annotation.
"""

import time

import pyarrow as pa
from dagster import AssetKey, ConfigurableIOManager, InputContext, MetadataValue, OutputContext, TableColumn, TableSchema

from fruit_assets.ml.pca_store import PcaHandler
from fruit_assets.settings import resolved
from fruit_assets.storage import delta
from fruit_assets.storage.delta import Snapshot
from fruit_assets.storage.handlers import Handler, SnapshotHandler, SparkHandler, TableHandler
from fruit_assets.storage.resource import Storage

# The first handler whose `stores()` (or `loads()`) holds a type, or a base class of it, handles it.
HANDLERS: tuple[Handler, ...] = (TableHandler(), SparkHandler(), PcaHandler(), SnapshotHandler())


def _storing(value_type: type) -> Handler:
    for handler in HANDLERS:
        if issubclass(value_type, handler.stores()):
            return handler
    raise TypeError(f"DeltaIOManager cannot store a {value_type.__name__}")


def _loading(as_type: type) -> Handler:
    for handler in HANDLERS:
        if issubclass(as_type, handler.loads()):
            return handler
    raise TypeError(f"DeltaIOManager cannot load a {as_type.__name__}")


class DeltaIOManager(ConfigurableIOManager):
    """Stores every asset as a Delta table in `storage`, one commit per materialization."""

    storage: Storage

    def handle_output(self, context: OutputContext, obj) -> None:
        if obj is None:
            return
        context.add_output_metadata(store_asset(self.storage, context.asset_key, obj, context.run_id))

    def load_input(self, context: InputContext):
        value = load_asset(self.storage, context.asset_key, context.dagster_type.typing_type)
        if value is None:
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()} has no stored data at "
                f"{self.storage.table(context.asset_key).uri}: materialize it first"
            )
        return value


def store_asset(storage: Storage, asset_key: AssetKey, obj, run_id: str) -> dict:
    """Commit `obj` as the asset's next version (one commit on the version it read), vacuum, and return
    the commit's metadata. The IO manager's work, also done by a Databricks Pipes task (databricks_pipes),
    which writes its own outputs."""
    handler = _storing(type(obj))
    table = storage.table(asset_key)
    base = storage.snapshot(asset_key)
    started = time.perf_counter()
    report = delta.CommitAttempts()
    version = handler.store(obj, table, base, {"run_id": run_id}, report)
    written = time.perf_counter() - started
    storage.vacuum(table)
    handler.expire(table, resolved(storage.retention_hours))
    stored = delta.snapshot(table, version)
    assert stored is not None, f"{table.uri}: version {version} was just committed"
    return commit_metadata(stored, base, written) | retry_metadata(report)


def arrow_table_schema(schema: pa.Schema) -> TableSchema:
    """A stored table's schema, for `dagster/column_schema`."""
    return TableSchema(columns=[TableColumn(name=field.name, type=str(field.type)) for field in schema])


def commit_metadata(stored: Snapshot, base: Snapshot | None, seconds: float) -> dict:
    """What a materialization wrote: its version, rows, schema, and the files and bytes it added."""
    before = {f.path for f in base.files} if base is not None and base.table_id == stored.table_id else set()
    added = [f for f in stored.files if f.path not in before]
    return {
        "path": MetadataValue.path(stored.location.uri),
        "dagster/uri": MetadataValue.path(stored.location.uri),
        "dagster/row_count": stored.rows,
        "dagster/column_schema": arrow_table_schema(stored.schema),
        "delta_version": stored.version,
        "files_added": len(added),
        "files_removed": len(before - {f.path for f in stored.files}),
        "bytes_written": sum(f.size for f in added),
        "write_seconds": round(seconds, 2),
    }


def retry_metadata(attempts: delta.CommitAttempts) -> dict:
    """What transient S3 faults cost the commit: `commit_attempts` (commit requests made, 1 without
    faults) and `commit_answers_lost` (failed requests that the log showed had been made).

    These are the retries this code makes and sees. The S3 clients' own retries of single requests
    (pyarrow's AWS SDK, delta-rs' object_store) are not counted: neither library reports them."""
    if not attempts.attempts:  # no commit made
        return {}
    return {"commit_attempts": attempts.attempts, "commit_answers_lost": attempts.resolved_from_log}


def load_asset(storage: Storage | str, asset: AssetKey | str, as_type: type = object, version: int | None = None):
    """A version (default: the latest) of an asset as `as_type` (pandas DataFrame by default; Arrow
    table, Spark DataFrame, PcaResult, PCAModel, Snapshot), or None if it was never materialized.

        load_asset("data/assets", "pca_model", PCAModel, version=3)
    """
    import pandas as pd

    storage = Storage(base_uri=storage) if isinstance(storage, str) else storage
    snapshot = storage.snapshot(AssetKey.from_coercible(asset), version)
    if snapshot is None:
        return None
    if not isinstance(as_type, type) or as_type is object:  # unannotated (Any): pandas
        as_type = pd.DataFrame
    return _loading(as_type).load(snapshot, as_type)
