"""Bad input, configuration errors and credentials, against real parts: SeaweedFS, local Spark, Dagster."""

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
from dagster import instance_for_test, materialize

from fruit_assets.definitions import all_assets_and_checks
from fruit_assets.pipeline import spark_work
from fruit_assets.resources import FeatureModel, build_resources
from fruit_assets_dev.local_s3 import upload_tree
from fruit_assets_tests.hostile_files import write_hostile_tree
from fruit_assets_tests.support import (
    TEST_BUCKET,
    failure_text,
    local_resources,
    materialize_all,
    metadata_of,
    private_copy,
    read_asset,
)
from fruit_assets_tests.test_runtimes import keras_features
from fruit_assets_tests.weights_files import save_legacy_h5

FEATURIZE = ["raw_images", "image_features"]


def s3_reader(s3):
    import pyarrow.fs as pafs

    host = s3.endpoint_url.split("://", 1)[1]
    return pafs.S3FileSystem(endpoint_override=host, scheme="http", access_key=s3.access_key, secret_key=s3.secret_key)


@pytest.fixture(scope="module")
def hostile_bucket(s3, tmp_path_factory):
    """The hostile tree uploaded to S3, keys with spaces, unicode, %, +, # and upper-case extensions."""
    local = tmp_path_factory.mktemp("hostile")
    expected = write_hostile_tree(local)
    prefix = f"s3://{TEST_BUCKET}/hostile-{uuid.uuid4().hex[:6]}"
    upload_tree(local, f"{prefix}/images")
    return prefix, expected


def hostile_resources(prefix, storage, max_skipped_fraction):
    resources = local_resources(f"{prefix}/images", storage)
    resources["feature_model"] = FeatureModel(weights="random:0", max_skipped_fraction=max_skipped_fraction)
    return resources


@pytest.mark.parametrize("featurized_on", ["driver", "spark"])
def test_hostile_files_are_featurized_or_listed_with_their_reason(spark, hostile_bucket, tmp_path, monkeypatch, featurized_on):
    # 16 images: featurized on the driver by default; in Spark when the driver's limit is lower.
    monkeypatch.setattr(spark_work, "DRIVER_FEATURIZE_IMAGES", 64 if featurized_on == "driver" else 0)
    prefix, expected = hostile_bucket
    result = materialize_all(hostile_resources(prefix, tmp_path, 1.0), selection=FEATURIZE)
    assert result.success
    assert metadata_of(result, "image_features")["featurized_on"] == featurized_on

    raw = metadata_of(result, "raw_images")
    assert raw["rows"] == len(expected) and raw["ignored_files"] == 1  # notes.txt

    metadata = metadata_of(result, "image_features")
    good = {k for k, reason in expected.items() if reason is None}
    bad = {k: reason for k, reason in expected.items() if reason is not None}
    stored = read_asset(tmp_path, "image_features")
    relative = stored.path.str.removeprefix(f"{prefix}/images/")
    assert set(relative) == good
    assert (stored.features.map(len) == 1280).all()
    assert set(stored.label) == {"Apple Red", "Äpfel Grün", "Modes"}
    # The default runtime (ONNX Runtime) equals plain Keras on the same decoded images.
    assert metadata["runtime"] == "onnxruntime"
    stored = stored.sort_values("path", ignore_index=True)
    reference = keras_features("random:0", list(stored.path))
    assert np.abs(np.stack(stored.features) - reference).max() < 1e-4

    assert metadata["skipped"] == len(bad)
    skipped = {r.data["path"].removeprefix(f"{prefix}/images/"): r.data["error"] for r in metadata["skipped_images"].records}
    assert set(skipped) == set(bad)
    for path, fragment in bad.items():
        assert fragment in skipped[path], (path, skipped[path])
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["one_row_per_image"].passed
    assert checks["one_row_per_image"].metadata["skipped_fraction"].value == pytest.approx(len(bad) / len(expected), abs=1e-4)


def test_too_many_bad_images_fail_the_run_and_keep_the_last_good_version(spark, hostile_bucket, tmp_path):
    prefix, expected = hostile_bucket
    assert materialize_all(hostile_resources(prefix, tmp_path, 1.0), selection=FEATURIZE).success
    before = read_asset(tmp_path, "image_features")

    result = materialize_all(hostile_resources(prefix, tmp_path, 0.1), selection=FEATURIZE, raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "4 of 16 images (25.0%) could not be featurized, over max_skipped_fraction=0.1" in text
    assert "Broken/" in text
    pd.testing.assert_frame_equal(read_asset(tmp_path, "image_features"), before)


@pytest.mark.parametrize("where", ["empty folder", "empty prefix"])
def test_no_images_is_a_clear_message(spark, s3, tmp_path, where):
    images = tmp_path / "nothing" if where == "empty folder" else f"s3://{TEST_BUCKET}/empty-{uuid.uuid4().hex[:6]}"
    if where == "empty folder":
        (images / "Label").mkdir(parents=True)
    result = materialize_all(local_resources(images, tmp_path / "store"), selection=FEATURIZE, raise_on_error=False)
    assert not result.success
    assert "no images found under" in failure_text(result) and "FRUIT_IMAGES_URI" in failure_text(result)


def test_a_missing_bucket_is_refused_before_any_work(spark, tmp_path):
    result = materialize_all(local_resources("s3://no-such-bucket-here/images", tmp_path), selection=FEATURIZE, raise_on_error=False)
    assert not result.success
    assert "FRUIT_IMAGES_URI=s3://no-such-bucket-here/images: bucket 'no-such-bucket-here' does not exist" in failure_text(result)
    assert not any(e.event_type_value == "STEP_START" and e.step_key == "image_features" for e in result.all_events)


def test_wrong_credentials_are_refused_without_showing_them(spark, s3, tmp_path, monkeypatch):
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    result = materialize_all(local_resources(tmp_path, f"s3://{TEST_BUCKET}/x"), selection=["raw_images"], raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "FRUIT_STORAGE_URI=s3://fruit-test/x: cannot access bucket 'fruit-test'" in text
    assert "AWS credentials" in text
    assert wrong not in text and s3.secret_key not in text


def test_a_weights_file_of_another_architecture_is_refused_before_featurizing(spark, demo_images, tmp_path):
    import keras

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "not_mobilenet.h5"
    save_legacy_h5(tiny, path)
    result = materialize_all(local_resources(demo_images, tmp_path / "store", weights=str(path)), selection=FEATURIZE, raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "FRUIT_MODEL_WEIGHTS" in text and str(path) in text
    assert not (tmp_path / "store" / "image_features").exists()


@pytest.mark.parametrize("weights", ["", "random:x", "/no/such/weights.h5"])
def test_unusable_weights_settings_fail_at_step_start(spark, demo_images, tmp_path, weights):
    result = materialize_all(local_resources(demo_images, tmp_path, weights=weights), selection=FEATURIZE, raise_on_error=False)
    assert not result.success and "FRUIT_MODEL_WEIGHTS" in failure_text(result)


def test_k_beyond_the_feature_dimension_is_refused_before_fitting(spark, local_run_storage, demo_images, tmp_path):
    storage = private_copy(local_run_storage, tmp_path)
    before = read_asset(storage, "pca_model")
    result = materialize_all(
        local_resources(demo_images, storage),
        selection=["pca_model"],
        run_config={"ops": {"pca_model": {"config": {"k": 2000}}}},
        raise_on_error=False,
    )
    assert not result.success
    assert "k=2000 is out of range" in failure_text(result) and "feature dimensions=1280 of model spec mobilenet_v2" in failure_text(result)
    pd.testing.assert_frame_equal(read_asset(storage, "pca_model"), before)


@pytest.mark.parametrize("uri", ["s3://", "ftp://example.com/images", "s3://bucket/../escape"])
def test_malformed_uris_are_refused_naming_the_setting(spark, tmp_path, uri):
    result = materialize_all(local_resources(uri, tmp_path), selection=["raw_images"], raise_on_error=False)
    assert not result.success and "FRUIT_IMAGES_URI" in failure_text(result)


def test_an_unknown_deployment_is_refused(monkeypatch):
    monkeypatch.setenv("FRUIT_DEPLOYMENT", "production-ish")
    with pytest.raises(ValueError, match="FRUIT_DEPLOYMENT='production-ish' is not a known deployment"):
        build_resources()


def test_credentials_never_reach_logs_metadata_or_parquet(spark, s3, demo_images, tmp_path):
    prefix = f"s3://{TEST_BUCKET}/secrets-{uuid.uuid4().hex[:6]}"
    upload_tree(demo_images, f"{prefix}/images")
    secret, key_id = s3.secret_key, s3.access_key
    assert len(secret) >= 16
    home = tmp_path / "dagster_home"
    home.mkdir()
    with instance_for_test(temp_dir=str(home)) as instance:
        result = materialize(all_assets_and_checks, resources=local_resources(f"{prefix}/images", f"{prefix}/assets"), instance=instance)
        assert result.success
        records = instance.get_records_for_run(result.run_id).records
        event_log = "\n".join(str(record.event_log_entry) for record in records)
    assert "image_features" in event_log  # the log really holds the run
    # Every object the run stored: data files, Delta logs, the PCA's side folders, plots.
    stored = b""
    reader = s3_reader(s3)
    objects = reader.get_file_info(pafs.FileSelector(f"{prefix.removeprefix('s3://')}/assets", recursive=True))
    assert any("_delta_log" in info.path for info in objects)
    for info in objects:
        if info.type == pafs.FileType.File:
            with reader.open_input_file(info.path) as f:
                stored += f.read()
    on_disk = b"".join(p.read_bytes() for p in Path(home).rglob("*") if p.is_file())
    for needle in (secret, f"secret_key={secret}"):
        assert needle not in event_log
        assert needle.encode() not in stored
        assert needle.encode() not in on_disk  # run storage, event log DB, compute logs
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret  # the run really used these credentials
    assert key_id  # access key ids are identifiers, not secrets; only the secret is checked
