"""Incremental runs cost what changed: image_features rewrites only the data files that hold a deleted
or replaced image, pca_model updates its statistics by the files added and removed since, and the
results equal those of a full run on the same images. Against a real S3 (SeaweedFS)."""

import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fruit_assets.ml.pca import FeatureStatistics, PcaResult, decompose
from fruit_assets.pipeline import spark_work
from fruit_assets.pipeline.spark_work import FEATURE_COLUMNS, feature_statistics_since, plan_features, provenance
from fruit_assets.resources.io_manager import load_asset
from fruit_assets.storage import delta, resolve, spark_io
from fruit_assets_dev.demo_data import generate_demo_set
from fruit_assets_dev.local_s3 import upload_tree
from fruit_assets_tests.support import TEST_BUCKET, by_image, local_resources, materialize_all, metadata_of, read_asset

PCA_CONFIG = {"ops": {"pca_model": {"config": {"k": 8}}}}


def stored_features(prefix: str) -> pd.DataFrame:
    return by_image(read_asset(f"{prefix}/assets", "image_features"))


def stored_pca(prefix: str) -> PcaResult:
    return load_asset(f"{prefix}/assets", "pca_model", PcaResult)


def assert_statistics_equal_a_full_pass(prefix: str) -> FeatureStatistics:
    """The stored PCA statistics equal those of the stored features, summed again from scratch."""
    statistics = stored_pca(prefix).statistics
    full = FeatureStatistics.of(np.stack(stored_features(prefix).features))
    assert statistics.rows == full.rows
    covariance, expected = statistics.covariance(), full.covariance()
    assert np.abs(covariance - expected).max() <= 1e-9 * np.abs(expected).max()
    return statistics


@pytest.fixture
def bucket_with_images(s3, tmp_path):
    prefix = f"s3://{TEST_BUCKET}/incremental-{uuid.uuid4().hex[:8]}"
    local = tmp_path / "images"
    generate_demo_set(local, labels=6, images_per_label=4)
    assert upload_tree(local, f"{prefix}/images") == 24
    return prefix


def replace_and_delete(s3, prefix: str, tmp_path, labels: list[str]):
    """Replace 1 image by another picture under the same key, delete 2."""
    client, key_prefix = s3.client(), prefix.split("/", 3)[3]
    extra = tmp_path / "extra"
    generate_demo_set(extra, labels=7, images_per_label=1)
    changed = f"{labels[2]}/r0_0.jpg"
    other = next(p for p in sorted(extra.iterdir()) if p.name not in labels)
    client.upload_file(str(other / "r0_0.jpg"), TEST_BUCKET, f"{key_prefix}/images/{changed}")
    deleted = [f"{labels[3]}/r0_1.jpg", f"{labels[4]}/r0_2.jpg"]
    for image in deleted:
        client.delete_object(Bucket=TEST_BUCKET, Key=f"{key_prefix}/images/{image}")
    return changed, deleted


def add_images(s3, prefix: str, tmp_path, labels: list[str]) -> list[str]:
    """3 more images of the same labels (the demo generator's next ones)."""
    client, key_prefix = s3.client(), prefix.split("/", 3)[3]
    more = tmp_path / "more"
    generate_demo_set(more, labels=6, images_per_label=6)  # the same first images, plus more
    added = [f"{labels[0]}/r0_4.jpg", f"{labels[0]}/r0_5.jpg", f"{labels[1]}/r0_4.jpg"]
    for image in added:
        client.upload_file(str(more / image), TEST_BUCKET, f"{key_prefix}/images/{image}")
    return added


def test_an_incremental_run_costs_what_changed_and_equals_a_full_run(s3, spark, bucket_with_images, tmp_path, monkeypatch):
    # Up to 3 images are featurized on the driver, more in Spark: the full runs go through Spark, the
    # updates through the driver, and their vectors must be the same.
    monkeypatch.setattr(spark_work, "DRIVER_FEATURIZE_IMAGES", 3)
    prefix = bucket_with_images
    resources = local_resources(f"{prefix}/images", f"{prefix}/assets")
    table = resolve(f"{prefix}/assets/image_features")

    first = materialize_all(resources, run_config=PCA_CONFIG)
    features, pca = metadata_of(first, "image_features"), metadata_of(first, "pca_model")
    assert (features["rows"], features["featurized"], features["reused"], features["removed"]) == (24, 24, 0, 0)
    assert features["featurized_on"] == "spark"
    assert pca["statistics_mode"] == "full"
    assert_statistics_equal_a_full_pass(prefix)
    before = stored_features(prefix)
    labels = sorted({i.split("/")[0] for i in before.index})

    # Added images: one new data file, nothing rewritten; the statistics add its 3 rows.
    files_before = {f.path for f in delta.snapshot(table).files}
    added = add_images(s3, prefix, tmp_path, labels)
    second = materialize_all(resources, run_config=PCA_CONFIG)
    features, pca = metadata_of(second, "image_features"), metadata_of(second, "pca_model")
    assert (features["rows"], features["featurized"], features["reused"], features["removed"]) == (27, 3, 24, 0)
    assert features["featurized_on"] == "driver"
    assert (features["files_added"], features["files_removed"]) == (1, 0)
    assert {f.path for f in delta.snapshot(table).files} > files_before
    assert (pca["statistics_mode"], pca["feature_rows_read"]) == ("incremental", 3), pca["statistics_reason"]
    assert_statistics_equal_a_full_pass(prefix)

    # A replaced and 2 deleted images: their old rows go, and only the files that held them are rewritten.
    changed, deleted = replace_and_delete(s3, prefix, tmp_path, labels)
    third = materialize_all(resources, run_config=PCA_CONFIG)
    features, pca = metadata_of(third, "image_features"), metadata_of(third, "pca_model")
    assert (features["rows"], features["featurized"], features["reused"], features["removed"], features["dropped"]) == (25, 1, 24, 3, 2)
    assert features["featurized_on"] == "driver"  # and the kept rows of the rewritten files, read by Spark
    assert features["files_removed"] >= 1
    assert_statistics_equal_a_full_pass(prefix)
    after = stored_features(prefix)
    assert len(after) == 25 and after.index.is_unique
    assert set(after.index) == (set(before.index) | set(added)) - set(deleted)
    untouched = sorted(set(before.index) - set(deleted) - {changed})
    np.testing.assert_array_equal(np.stack(after.loc[untouched].features), np.stack(before.loc[untouched].features))
    assert np.abs(after.loc[changed].features - before.loc[changed].features).max() > 1e-3

    # A full run on the same images, into fresh storage: the same features exactly (ONNX Runtime's
    # result for an image does not depend on its batch, nor on running in the driver or a worker),
    # and the same PCA within float rounding.
    fresh = f"{prefix}/fresh"
    full_run = materialize_all(local_resources(f"{prefix}/images", f"{fresh}/assets"), run_config=PCA_CONFIG)
    assert metadata_of(full_run, "image_features")["featurized_on"] == "spark"
    full = stored_features(fresh)
    assert list(full.index) == list(after.index)
    np.testing.assert_array_equal(np.stack(full.features), np.stack(after.features))
    incremental_pca, full_pca = stored_pca(prefix), stored_pca(fresh)
    np.testing.assert_allclose(incremental_pca.explained_variance, full_pca.explained_variance, atol=1e-6)
    np.testing.assert_allclose(incremental_pca.components, full_pca.components, atol=1e-4)
    reduced, reduced_full = (
        by_image(read_asset(f"{prefix}/assets", "reduced_features")),
        by_image(read_asset(f"{fresh}/assets", "reduced_features")),
    )
    np.testing.assert_allclose(np.stack(reduced.pca_features), np.stack(reduced_full.pca_features), rtol=1e-4, atol=1e-4)

    # Nothing changed: nothing featurized, no file rewritten, the statistics updated by nothing.
    fourth = materialize_all(resources, run_config=PCA_CONFIG)
    features, pca = metadata_of(fourth, "image_features"), metadata_of(fourth, "pca_model")
    assert (features["featurized"], features["reused"], features["removed"], features["files_removed"], features["bytes_written"]) == (
        0,
        25,
        0,
        0,
        0,
    )
    assert (pca["statistics_mode"], pca["feature_rows_read"]) == ("incremental", 0)

    # Other weights: every image is featurized again, and the statistics are summed from scratch.
    other = materialize_all(local_resources(f"{prefix}/images", f"{prefix}/assets", weights="random:1"), run_config=PCA_CONFIG)
    features, pca = metadata_of(other, "image_features"), metadata_of(other, "pca_model")
    assert (features["featurized"], features["reused"]) == (25, 0)
    assert pca["statistics_mode"] == "full"
    assert_statistics_equal_a_full_pass(prefix)


def _table_of_many_files(spark, tmp_path, rows: int = 40, rows_per_file: int = 5):
    """An image_features table of `rows` rows in files of `rows_per_file`."""
    location = resolve(str(tmp_path / "image_features"))
    frame = pd.DataFrame(
        {
            "path": [f"/img/L{i % 4}/{i:03d}.jpg" for i in range(rows)],
            "label": [f"L{i % 4}" for i in range(rows)],
            "features": [np.full(1280, i, dtype=np.float32) for i in range(rows)],
            "size_bytes": np.arange(rows, dtype=np.int64) + 100,
            "modified_at": pd.Timestamp("2026-01-01", tz="UTC"),
            "weights_fingerprint": "fp",
        }
    )[FEATURE_COLUMNS]
    files, schema = spark_io.write_files(spark.createDataFrame(frame).coalesce(1), location, rows_per_file=rows_per_file)
    delta.commit(location, files, schema, None, metadata={"weights_fingerprint": "fp"})
    return location, frame


@pytest.mark.parametrize("update_in", ["driver", "spark"])
def test_only_the_files_holding_a_removed_image_are_rewritten(spark, tmp_path, monkeypatch, update_in):
    # A small update's statistics are summed on the driver; a large one's in Spark: both are checked.
    monkeypatch.setattr(spark_work, "DRIVER_UPDATE_ROWS", 50_000 if update_in == "driver" else 0)
    location, frame = _table_of_many_files(spark, tmp_path)  # 40 rows, 8 files of 5
    stored = delta.snapshot(location)
    assert len(stored.files) == 8
    catalog = frame[["path", "label", "size_bytes", "modified_at"]].drop(index=[7])  # deleted
    catalog.loc[12, "size_bytes"] += 1  # replaced: same path, another file
    new = pd.DataFrame(
        {
            "path": ["/img/L0/new1.jpg", "/img/L1/new2.jpg"],
            "label": ["L0", "L1"],
            "size_bytes": [1, 2],
            "modified_at": pd.Timestamp("2026-02-01", tz="UTC"),
        }
    )
    catalog = pd.concat([catalog, new], ignore_index=True)
    plan = plan_features(spark, pa.Table.from_pandas(catalog, preserve_index=False), stored, "fp")
    assert (plan.removed, plan.dropped, plan.reused, plan.kept_rows) == (2, 1, 38, 8)
    assert sorted(plan.todo.column("path").to_pylist()) == sorted([frame.path[12], *new.path])
    assert len(plan.removed_files) == 2  # the file of row 7 and the file of row 12, nothing else
    kept = plan.kept.toPandas()
    assert len(kept) == 8 and not {frame.path[7], frame.path[12]} & set(kept.path)

    # "Featurize" the 3 images (vectors 100, 101, 102), commit the change as image_features does, and
    # follow it with the statistics: they read the 2 removed and the new files, and equal a full pass.
    todo = plan.todo.to_pandas().sort_values("path", ignore_index=True)
    todo["features"] = [np.full(1280, 100 + i, dtype=np.float32) for i in range(len(todo))]
    todo["weights_fingerprint"] = "fp"
    kept = plan.kept.select(*FEATURE_COLUMNS)
    rows = kept.unionByName(spark.createDataFrame(todo[FEATURE_COLUMNS], schema=kept.schema))
    files, schema = spark_io.write_files(rows, location)
    delta.commit(location, files, schema, stored, removed=plan.removed_files, metadata={"weights_fingerprint": "fp"})
    now = delta.snapshot(location)
    update = feature_statistics_since(spark, now, FeatureStatistics.of(np.stack(frame.features)), provenance(stored))
    assert update.mode == "incremental", update.reason
    assert update.rows_read == 10 + 11
    expected = FeatureStatistics.of(np.stack(read_asset(tmp_path, "image_features").features))
    assert update.statistics.rows == expected.rows == 41
    np.testing.assert_allclose(
        update.statistics.covariance(), expected.covariance(), rtol=0, atol=1e-9 * np.abs(expected.covariance()).max()
    )


@pytest.mark.parametrize(
    "break_it, reason",
    [
        (lambda p, stored: {}, "no earlier statistics"),
        (lambda p, stored: p | {"features_table_id": "another"}, "another image_features table"),
        (lambda p, stored: p | {"weights_fingerprint": "other"}, "other weights"),
        (lambda p, stored: p | {"features_version": 99}, "can no longer be read"),
    ],
)
def test_statistics_fall_back_to_a_full_pass_when_an_update_cannot_be_proven(spark, tmp_path, break_it, reason):
    location, frame = _table_of_many_files(spark, tmp_path)
    stored = delta.snapshot(location)
    update = feature_statistics_since(spark, stored, FeatureStatistics.of(np.stack(frame.features)), break_it(provenance(stored), stored))
    assert update.mode == "full" and reason in update.reason
    assert update.rows_read == 40 and update.statistics.rows == 40


def test_the_driver_and_spark_project_a_table_alike(spark, tmp_path, monkeypatch):
    # reduced_features projects a small table on the driver and a large one in Spark: both must give
    # the table's vectors times the components, row for row.
    location = resolve(str(tmp_path / "image_features"))
    vectors = np.random.default_rng(7).normal(size=(30, 1280)).astype(np.float32)
    frame = pd.DataFrame({"path": [f"/img/{i:02d}.jpg" for i in range(30)], "label": [f"L{i % 3}" for i in range(30)],
                          "features": list(vectors)})
    files, schema = spark_io.write_files(spark.createDataFrame(frame).repartition(3), location, rows_per_file=4)
    delta.commit(location, files, schema, None, metadata={})
    features = delta.snapshot(location)
    pca = decompose(FeatureStatistics.of(vectors.astype(np.float64)), k=5, variance_target=0.95, max_k=5)
    expected = vectors.astype(np.float64) @ pca.components.T

    projected = {}
    for where, limit in [("driver", 30), ("spark", 29)]:
        monkeypatch.setattr(spark_work, "DRIVER_PROJECTION_ROWS", limit)
        projection = spark_work.project_features(spark, features, pca, sample_size=10)
        rows = projection.rows.to_pandas() if where == "driver" else projection.rows.toPandas()
        projection.release()
        assert (projection.where, projection.count, projection.min_k, projection.max_k) == (where, 30, 5, 5)
        assert len(projection.sample) == 10 and all(len(xy) == 2 for xy in projection.sample.xy)
        projected[where] = rows.sort_values("path", ignore_index=True)
        got = np.stack(projected[where].pca_features)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert projected["driver"].label.tolist() == projected["spark"].label.tolist() == frame.label.tolist()
    np.testing.assert_array_equal(np.stack(projected["driver"].pca_features), np.stack(projected["spark"].pca_features))
