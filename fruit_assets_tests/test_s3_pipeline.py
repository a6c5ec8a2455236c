"""The pipeline with its data in a real S3 server (SeaweedFS): images from a bucket, assets into it,
incremental featurization, and writes that never lose the last good version."""

import uuid

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from dagster import AssetKey

from fruit_assets.resources.io_manager import load_asset
from fruit_assets_dev.local_s3 import upload_tree
from fruit_assets_tests.support import (
    TEST_BUCKET,
    by_image,
    io_manager,
    local_resources,
    materialize_all,
    metadata_of,
    output_context,
    read_asset,
)

ASSETS = ("raw_images", "image_features", "pca_model", "reduced_features")


def new_prefix() -> str:
    return f"s3://{TEST_BUCKET}/{uuid.uuid4().hex[:8]}"


def s3_filesystem(s3) -> pafs.S3FileSystem:
    """An independent reader: plain pyarrow with explicit settings, not the project's own code."""
    host = s3.endpoint_url.split("://", 1)[1]
    return pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=s3.access_key,
                             secret_key=s3.secret_key, region=s3.region)


def read_s3(s3, uri: str) -> pd.DataFrame:
    """A table's latest version as a user reads it: deltalake with explicit settings."""
    from deltalake import DeltaTable

    options = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key,
               "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": s3.region, "AWS_ALLOW_HTTP": "true"}
    return DeltaTable(uri, storage_options=options).to_pandas()


def test_graph_from_a_bucket_into_the_bucket_equals_the_local_run(s3, spark, demo_images, local_run_storage):
    local_storage = local_run_storage
    prefix = new_prefix()
    assert upload_tree(demo_images, f"{prefix}/images") == 72

    result = materialize_all(local_resources(f"{prefix}/images", f"{prefix}/assets"))
    assert result.success
    assert metadata_of(result, "image_features")["path"] == f"{prefix}/assets/image_features"

    objects = [o["Key"] for o in s3.client().list_objects_v2(Bucket=TEST_BUCKET, Prefix=prefix.split("/")[-1])["Contents"]]
    assert any(key.endswith(".parquet") and "/assets/image_features/" in key for key in objects)

    for name in ASSETS:
        remote = read_s3(s3, f"{prefix}/assets/{name}")
        local = read_asset(local_storage, name)
        assert len(remote) == len(local), name
        if name == "pca_model":
            remote, local = remote.sort_values("component"), local.sort_values("component")
            np.testing.assert_allclose(remote.explained_variance, local.explained_variance, rtol=1e-6, atol=1e-9)
            continue
        remote, local = by_image(remote), by_image(local)
        assert list(remote.index) == list(local.index)
        assert list(remote.label) == list(local.label)
        assert remote.path.str.startswith(f"{prefix}/images/").all()
        if name == "raw_images":
            assert list(remote.size_bytes) == list(local.size_bytes)
        else:
            column = "features" if name == "image_features" else "pca_features"
            # Components may flip sign between fits: compare features exactly, projections up to sign.
            a, b = np.stack(remote[column]), np.stack(local[column])
            if column == "pca_features":
                a, b = np.abs(a), np.abs(b)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_a_failed_write_to_s3_keeps_the_last_good_version(s3, spark):
    from pyspark.sql import functions as F
    from pyspark.sql.functions import udf

    prefix = new_prefix()
    manager = io_manager(prefix)
    good = spark.range(50).repartition(3).select(F.col("id"), (F.col("id") * 2).alias("twice"))
    manager.handle_output(output_context(asset_key=AssetKey("table")), good)

    @udf("long")
    def fail_on_seven(value):
        if value == 7:
            raise RuntimeError("injected failure mid-write")
        return value

    failing = spark.range(100).repartition(4).select(fail_on_seven(F.col("id")).alias("id"), F.lit(0).alias("twice"))
    with pytest.raises(Exception, match="injected failure mid-write"):
        manager.handle_output(output_context(asset_key=AssetKey("table")), failing)

    stored = read_s3(s3, f"{prefix}/table").sort_values("id", ignore_index=True)
    assert list(stored.id) == list(range(50)) and list(stored.twice) == [2 * i for i in range(50)]
    assert len(load_asset(prefix, "table")) == 50
    # The failed write's files were deleted: the folder holds the log and the committed version's files.
    from deltalake import DeltaTable

    table = prefix.removeprefix("s3://") + "/table"
    files = {
        info.path.removeprefix(table + "/")
        for info in s3_filesystem(s3).get_file_info(pafs.FileSelector(table))
        if info.type == pafs.FileType.File
    }
    options = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_REGION": s3.region, "AWS_ALLOW_HTTP": "true"}
    committed = {uri.removeprefix(f"{prefix}/table/") for uri in DeltaTable(f"{prefix}/table", storage_options=options).file_uris()}
    assert files == committed and len(committed) == 3
