"""The catalog of image files under a root in the Fruits-360 layout: `<root>/<Label>/<file>`.

Listing is metadata only (no image is read), so it runs on the driver through pyarrow, for a local
folder or an S3 prefix alike. No Dagster, no Spark.
"""

from __future__ import annotations

import posixpath

import pandas as pd
import pyarrow.fs as pafs

from fruit_assets.ml.images import is_image_path
from fruit_assets.storage import Location

CATALOG_COLUMNS = ["path", "label", "size_bytes", "modified_at"]


def list_images(root: Location) -> tuple[pd.DataFrame, list[str]]:
    """(catalog, ignored): one row per image file below `root`, sorted by path, with the folder that
    holds it as its label; and the URIs of files that are not images or sit outside a label folder."""
    rows, ignored = [], []
    selector = pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
    for info in root.filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = posixpath.relpath(info.path, root.path)
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts):
            continue  # hidden files and folders (.DS_Store, .ipynb_checkpoints) are never data
        if len(parts) < 2 or not is_image_path(info.path):
            ignored.append(root.uri_of(info.path))
            continue
        rows.append(
            {
                "path": root.uri_of(info.path),
                "label": parts[-2],
                "size_bytes": info.size,
                "modified_at": info.mtime,
            }
        )
    catalog = pd.DataFrame(rows, columns=CATALOG_COLUMNS)
    catalog["size_bytes"] = catalog["size_bytes"].astype("int64")
    catalog["modified_at"] = pd.to_datetime(catalog["modified_at"], utc=True)
    return catalog.sort_values("path", ignore_index=True), sorted(ignored)
