"""Dagster metadata values as Dagster Pipes carries them (`{"raw_value": ..., "type": ...}`), so that
a remote step's materialization shows the same tables, markdown plots and paths as a local one's."""

from __future__ import annotations

from typing import Any

import numpy as np
from dagster import MetadataValue, TableSchema


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _columns(schema: TableSchema) -> list[dict]:
    return [{"name": column.name, "type": column.type} for column in schema.columns]


def _typed(value: MetadataValue) -> dict:
    kind = type(value).__name__.removesuffix("MetadataValue").lower()
    if kind == "table":
        records = [_plain(dict(record.data)) for record in value.records]  # type: ignore[attr-defined]
        return {"type": "table", "raw_value": {"records": records, "schema": _columns(value.schema)}}  # type: ignore[attr-defined]
    if kind == "tableschema":
        return {"type": "table_schema", "raw_value": {"columns": _columns(value.schema)}}  # type: ignore[attr-defined]
    known = {"markdown": "md", "path": "path", "text": "text", "url": "url", "json": "json", "int": "int",
             "float": "float", "bool": "bool", "null": "null", "timestamp": "timestamp"}
    if kind in known:
        return {"type": known[kind], "raw_value": _plain(value.value)}
    return {"type": "text", "raw_value": str(value.value)}


def to_pipes(metadata: dict[str, Any]) -> dict[str, Any]:
    """Each value typed as Dagster would show it: normalized as an asset's metadata is (a TableSchema
    becomes a table_schema value, a number an int or float), numpy scalars first made plain."""
    from dagster._core.definitions.metadata import normalize_metadata

    plain = {key: value if isinstance(value, (MetadataValue, TableSchema)) else _plain(value) for key, value in metadata.items()}
    return {key: _typed(value) for key, value in normalize_metadata(plain).items()}
