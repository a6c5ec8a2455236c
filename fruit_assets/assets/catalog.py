"""raw_images: the catalog of the image files."""

import time

import pandas as pd
from dagster import AssetExecutionContext, MetadataValue, Output, asset

from fruit_assets.assets.metadata import plot, table
from fruit_assets.pipeline import plots
from fruit_assets.pipeline.listing import sample_images
from fruit_assets.resources import ImageSource
from fruit_assets.storage.resource import Storage

GROUP = "fruit_features"
CONTACT_SHEET_LABELS = 24  # the sheet is embedded in every materialization event: keep it small
SAMPLE_READERS = 16
LABEL_TABLE_ROWS = 500  # so is the images-per-label table: with 100,000 labels it would weigh megabytes


@asset(group_name=GROUP, kinds={"python", "delta"})
def raw_images(context: AssetExecutionContext, images: ImageSource, storage: Storage) -> Output[pd.DataFrame]:
    """Catalog of the image files under FRUIT_IMAGES_URI (<root>/<Label>/<file>, .jpg/.jpeg/.png)."""
    root = images.location()
    started = time.perf_counter()
    listing = images.list_images()
    seconds = time.perf_counter() - started
    if not listing.images.num_rows:
        raise ValueError(
            f"no images found under {root.uri} (FRUIT_IMAGES_URI): expected <root>/<Label>/<file>.jpg; "
            f"{listing.ignored} other file(s) ignored"
        )
    how = "as one flat listing" if listing.flat else f"{listing.folders} folders, {images.list_concurrency} at a time"
    context.log.info(f"listed {listing.images.num_rows} images under {root.uri} in {seconds:.1f} s ({how})")
    if listing.ignored:
        examples = list(listing.ignored_examples[:3])
        context.log.warning(f"ignored {listing.ignored} file(s) that are not images in a label folder, e.g. {examples}")
    catalog = listing.catalog()
    counts = catalog.groupby("label").size().rename("images").reset_index()
    sheet = plots.contact_sheet(sample_images(catalog, CONTACT_SHEET_LABELS, 3, SAMPLE_READERS))
    return Output(catalog, metadata={
        **plot(storage, context.asset_key, "sample_images", sheet),
        "images_uri": MetadataValue.path(root.uri),
        "rows": len(catalog),
        "labels": len(counts),
        "images_per_label": table(counts.head(LABEL_TABLE_ROWS)),
        "ignored_files": listing.ignored,
        "listing_seconds": round(seconds, 2),
    })
