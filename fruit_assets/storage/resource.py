"""The `storage` resource: where the assets live, and the one object the IO manager, the assets
(for their own earlier versions) and the plots reach storage through."""

from __future__ import annotations

from typing import ClassVar

from dagster import AssetKey, ConfigurableResource
from pydantic import Field

from fruit_assets.settings import FromEnvironment, Setting, default_storage_uri, resolved, whole
from fruit_assets.storage import Location, check_reachable, delta, resolve
from fruit_assets.storage.delta import Snapshot

PLOTS_DIR = "_plots"  # `_` names are ignored by Delta and Parquet readers


class Storage(FromEnvironment, ConfigurableResource):
    """Every asset is a Delta table at `<base_uri>/<asset name>/`; plots go to `<base_uri>/_plots/`.
    Fields left unset come from FRUIT_STORAGE_URI and FRUIT_RETENTION_HOURS (`fruit_assets.settings`)."""

    SETTINGS: ClassVar[dict[str, Setting]] = {
        "base_uri": Setting("FRUIT_STORAGE_URI", default_storage_uri),
        "retention_hours": Setting("FRUIT_RETENTION_HOURS", delta.DEFAULT_RETENTION_HOURS, whole(0)),
    }
    RESOURCE_KEY: ClassVar[str] = "storage"

    base_uri: str | None = Field(
        default=None,
        description="A local folder or s3://bucket/prefix. Null: FRUIT_STORAGE_URI, else data/assets in the checkout.",
    )
    retention_hours: int | None = Field(
        default=None,
        ge=0,
        description="How long a replaced version stays readable (time travel) before vacuum deletes its files. "
        "Keep it longer than the longest run. Null: FRUIT_RETENTION_HOURS, else 168 (7 days).",
    )

    def setup_for_execution(self, context) -> None:
        self.log_settings(context)
        check_reachable(self.root(), "FRUIT_STORAGE_URI")  # a missing bucket fails the step at once

    def root(self) -> Location:
        return resolve(resolved(self.base_uri), setting="FRUIT_STORAGE_URI")

    def table(self, asset_key: AssetKey) -> Location:
        return self.root().child(*asset_key.path)

    def snapshot(self, asset_key: AssetKey, version: int | None = None) -> Snapshot | None:
        """A version of an asset's table (default: the latest), or None if it was never
        materialized. A folder from the release before Delta is converted in place first."""
        return delta.open_snapshot(self.table(asset_key), version)

    def vacuum(self, table: Location) -> None:
        delta.vacuum(table, resolved(self.retention_hours))

    def save_plot(self, asset_key: AssetKey, name: str, png: bytes) -> Location:
        """Write a PNG to `<base_uri>/_plots/<asset name>/<name>.png`: beside the asset folders, not in
        one (an asset folder is a Delta table, whose vacuum deletes files its log does not name)."""
        target = self.root().child(PLOTS_DIR, *asset_key.path, f"{name}.png")
        if target.is_local:
            target.filesystem.create_dir(self.root().child(PLOTS_DIR, *asset_key.path).path, recursive=True)
        with target.filesystem.open_output_stream(target.path) as stream:
            stream.write(png)
        return target
