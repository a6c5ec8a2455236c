"""Small builders of asset metadata: tables and plots as the Dagster UI shows them."""

from __future__ import annotations

import numpy as np
import pandas as pd
from dagster import AssetKey, MetadataValue, TableColumn, TableRecord, TableSchema

from fruit_assets.pipeline import plots
from fruit_assets.storage.resource import Storage


def table(frame: pd.DataFrame) -> MetadataValue:
    """A small pandas frame as a metadata table (keep it small: it is stored with every event)."""
    schema = TableSchema(columns=[TableColumn(name=str(name), type=str(dtype)) for name, dtype in frame.dtypes.items()])
    records = [TableRecord({key: _plain(value) for key, value in row.items()}) for row in frame.to_dict("records")]
    return MetadataValue.table(records=records, schema=schema)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def plot(storage: Storage, asset_key: AssetKey, name: str, png: bytes) -> dict:
    """Metadata showing a PNG plot in the UI (markdown with a data: URI, which Dagster renders), plus
    the same PNG stored beside the assets at <storage>/_plots/<asset>/<name>.png."""
    saved = storage.save_plot(asset_key, name, png)
    return {name: MetadataValue.md(plots.markdown_image(png, name)), f"{name}_file": MetadataValue.path(saved.uri)}
