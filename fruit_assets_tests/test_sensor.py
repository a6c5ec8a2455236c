"""Tests of `fruit_images_sensor` against a real S3 server (SeaweedFS) and real local folders, with a real
Dagster instance. No mocks: objects are uploaded with boto3, ticks are evaluated with Dagster's own
`SensorDefinition.evaluate_tick`, and cursors are carried from tick to tick as the daemon would."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterResourceFunctionError,
    DagsterRun,
    DagsterRunStatus,
    DefaultSensorStatus,
    build_sensor_context,
)

from fruit_assets import sensors
from fruit_assets.resources import ImageSource
from fruit_assets.sensors import (
    JOB_NAME,
    TAG_DIGEST,
    TAG_IMAGES,
    TAG_TRIGGER,
    ImageListingError,
    ImagesCursor,
    fruit_images_sensor,
)
from fruit_assets_tests.support import TEST_BUCKET


@pytest.fixture(autouse=True)
def no_settle(monkeypatch):
    """Most tests switch the settle rule off so that an upload is seen by the very next tick; the rule
    has its own test. Sizes differ wherever a test replaces an object, so whole-second mtimes still differ."""
    monkeypatch.setenv(sensors.SETTLE_ENV, "0")


@pytest.fixture
def instance():
    instance = DagsterInstance.ephemeral()
    yield instance
    instance.dispose()


def add_run(instance: DagsterInstance, job_name: str, status: DagsterRunStatus, asset_selection=None) -> DagsterRun:
    """A run record as a launched run leaves it (no run executes): what the sensor looks at."""
    return instance.add_run(
        DagsterRun(job_name=job_name, run_id=str(uuid.uuid4()), status=status, asset_selection=asset_selection)
    )


@pytest.fixture
def images_uri(s3):
    """A fresh, empty s3:// prefix per test."""
    return f"s3://{TEST_BUCKET}/sensor-{uuid.uuid4().hex[:12]}/images"


def key_of(uri: str, relative: str) -> str:
    return f"{uri.split('/', 3)[3]}/{relative}"


def put(s3, uri: str, relative: str, body: bytes = b"\xff\xd8jpeg") -> None:
    s3.client().put_object(Bucket=TEST_BUCKET, Key=key_of(uri, relative), Body=body)


def delete(s3, uri: str, relative: str) -> None:
    s3.client().delete_object(Bucket=TEST_BUCKET, Key=key_of(uri, relative))


def tick(instance, uri: str, cursor: str | None = None, **context_kwargs):
    """One evaluation, as the daemon runs it: the SensorExecutionData (run_requests, skip_message, cursor)."""
    with build_sensor_context(
        instance=instance, cursor=cursor, resources={"images": ImageSource(uri=uri)}, **context_kwargs
    ) as context:  # closes the resources it builds (see support.output_context)
        return fruit_images_sensor.evaluate_tick(context)


def the_run(result):
    assert result.skip_message is None, result.skip_message
    [request] = result.run_requests
    return request


def test_registered_in_definitions_stopped_by_default():
    from fruit_assets.definitions import defs

    sensor = defs.get_repository_def().get_sensor_def(sensors.SENSOR_NAME)
    assert sensor.job_name == JOB_NAME
    assert sensor.default_status == DefaultSensorStatus.STOPPED
    assert sensor.minimum_interval_seconds == 30
    assert sensor.required_resource_keys == {"images"}


def test_settings(monkeypatch):
    monkeypatch.setenv(sensors.INTERVAL_ENV, "120")
    assert sensors.interval_seconds() == 120
    monkeypatch.setenv(sensors.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match="FRUIT_SENSOR_INTERVAL_SECONDS"):
        sensors.interval_seconds()
    monkeypatch.setenv(sensors.INTERVAL_ENV, "0")
    with pytest.raises(ValueError, match="at least 1"):
        sensors.interval_seconds()
    monkeypatch.setenv(sensors.SETTLE_ENV, "-1")
    with pytest.raises(ValueError, match="FRUIT_SENSOR_SETTLE_SECONDS"):
        sensors.settle_seconds()
    monkeypatch.setenv(sensors.MAX_WAIT_ENV, "1.5")
    assert sensors.max_wait_seconds() == 1.5


def test_upload_requests_exactly_one_run_then_skips(s3, instance, images_uri):
    put(s3, images_uri, "Apple/a1.jpg")
    put(s3, images_uri, "Apple/a2.JPEG")
    put(s3, images_uri, "Banana/b1.png")

    first = tick(instance, images_uri)
    request = the_run(first)
    cursor = ImagesCursor.from_json(first.cursor)
    assert request.job_name in (None, JOB_NAME)  # the sensor's one job
    assert request.run_key == f"1-{cursor.digest}"
    assert request.tags[TAG_IMAGES] == "3"
    assert request.tags[TAG_TRIGGER] == "sensor"
    assert request.tags[TAG_DIGEST] == cursor.digest
    assert request.tags["dagster/sensor_name"] == sensors.SENSOR_NAME
    assert (cursor.images, cursor.generation) == (3, 1)

    second = tick(instance, images_uri, first.cursor)
    assert second.run_requests == []
    assert second.skip_message == "no new or changed images (3 images)"
    assert second.cursor == first.cursor

    # A tick evaluated again from the same cursor (the daemon died before storing the new one) asks
    # for the same run key, which Dagster runs at most once.
    assert the_run(tick(instance, images_uri)).run_key == request.run_key


def test_replaced_object_requests_a_run(s3, instance, images_uri):
    put(s3, images_uri, "Apple/a1.jpg", b"version one")
    put(s3, images_uri, "Apple/a2.jpg")
    first = tick(instance, images_uri)
    put(s3, images_uri, "Apple/a1.jpg", b"version two, other bytes")

    second = tick(instance, images_uri, first.cursor)
    request = the_run(second)
    assert request.tags[TAG_IMAGES] == "2"
    assert request.run_key.startswith("2-")
    assert request.run_key != the_run(first).run_key
    assert tick(instance, images_uri, second.cursor).skip_message == "no new or changed images (2 images)"


def test_deleted_object_requests_a_run(s3, instance, images_uri):
    put(s3, images_uri, "Apple/a1.jpg")
    put(s3, images_uri, "Cherry/c1.jpg")
    first = tick(instance, images_uri)
    delete(s3, images_uri, "Cherry/c1.jpg")

    second = tick(instance, images_uri, first.cursor)
    assert the_run(second).tags[TAG_IMAGES] == "1"

    # Deleting the last image: nothing to materialize (raw_images refuses an empty catalog), cursor kept.
    delete(s3, images_uri, "Apple/a1.jpg")
    third = tick(instance, images_uri, second.cursor)
    assert third.run_requests == [] and third.skip_message.startswith("no images under s3://")
    assert third.cursor == second.cursor


def test_returning_to_an_earlier_state_still_runs(s3, instance, images_uri):
    put(s3, images_uri, "Apple/a1.jpg")
    first = tick(instance, images_uri)
    put(s3, images_uri, "Apple/a2.jpg")
    second = tick(instance, images_uri, first.cursor)
    delete(s3, images_uri, "Apple/a2.jpg")  # back to the state of the first run

    third = tick(instance, images_uri, second.cursor)
    keys = [the_run(result).run_key for result in (first, second, third)]
    assert ImagesCursor.from_json(third.cursor).digest == ImagesCursor.from_json(first.cursor).digest
    assert len(set(keys)) == 3  # a bare digest would repeat the first key, and Dagster would drop the run


def test_non_image_keys_are_ignored(s3, instance, images_uri):
    client = s3.client()
    put(s3, images_uri, "Apple/notes.txt", b"not an image")
    put(s3, images_uri, "Apple/.DS_Store", b"hidden")
    put(s3, images_uri, ".ipynb_checkpoints/Apple/a.jpg", b"hidden folder")
    put(s3, images_uri, "root.jpg", b"outside a label folder")
    client.put_object(Bucket=TEST_BUCKET, Key=key_of(images_uri, "Banana/"), Body=b"")  # folder marker

    result = tick(instance, images_uri)
    assert result.run_requests == []
    assert result.skip_message.startswith(f"no images under {images_uri}")
    assert result.cursor is None

    put(s3, images_uri, "Apple/a1.jpg")
    assert the_run(tick(instance, images_uri)).tags[TAG_IMAGES] == "1"


def test_pages_through_more_than_1000_keys(s3, instance, images_uri):
    client = s3.client(max_pool_connections=32)
    keys = [key_of(images_uri, f"Label{i % 7}/img_{i:05d}.jpg") for i in range(1500)]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=TEST_BUCKET, Key=key, Body=b"x"), keys))

    first = tick(instance, images_uri)
    assert the_run(first).tags[TAG_IMAGES] == "1500"
    assert tick(instance, images_uri, first.cursor).skip_message == "no new or changed images (1500 images)"

    put(s3, images_uri, "Label0/zz_last.jpg")  # sorts after every other key: on the last page
    assert the_run(tick(instance, images_uri, first.cursor)).tags[TAG_IMAGES] == "1501"


def test_cursor_survives_a_restart(s3, images_uri, tmp_path):
    put(s3, images_uri, "Apple/a1.jpg")
    with DagsterInstance.local_temp(tempdir=str(tmp_path)) as instance:
        stored = tick(instance, images_uri).cursor

    put(s3, images_uri, "Apple/a2.jpg")  # while "dagster dev" is down

    with DagsterInstance.local_temp(tempdir=str(tmp_path)) as instance:  # a new process, the same DAGSTER_HOME
        after = tick(instance, images_uri, stored)
        request = the_run(after)
        assert request.tags[TAG_IMAGES] == "2"
        assert request.run_key.startswith("2-")
        assert tick(instance, images_uri, after.cursor).skip_message == "no new or changed images (2 images)"


@pytest.mark.parametrize(
    "job_name, status, asset_selection",
    [
        (JOB_NAME, DagsterRunStatus.STARTED, None),
        (JOB_NAME, DagsterRunStatus.NOT_STARTED, None),  # created, being submitted or queued
        (JOB_NAME, DagsterRunStatus.CANCELING, None),
        ("__ASSET_JOB", DagsterRunStatus.STARTED, {AssetKey("raw_images")}),  # "Materialize" in the UI
    ],
)
def test_run_in_progress_skips_without_advancing_the_cursor(s3, instance, images_uri, job_name, status, asset_selection):
    from fruit_assets.definitions import defs

    put(s3, images_uri, "Apple/a1.jpg")
    first = tick(instance, images_uri, definitions=defs)
    put(s3, images_uri, "Apple/a2.jpg")  # arrives while the run is going
    run = add_run(instance, job_name=job_name, status=status, asset_selection=asset_selection)

    busy = tick(instance, images_uri, first.cursor, definitions=defs)
    assert busy.run_requests == []
    assert run.run_id in busy.skip_message and "cursor not advanced" in busy.skip_message
    assert busy.cursor == first.cursor

    instance.report_run_canceled(run)  # the run ends: the next tick sees what arrived meanwhile
    after = tick(instance, images_uri, busy.cursor, definitions=defs)
    assert the_run(after).tags[TAG_IMAGES] == "2"


def test_unrelated_or_finished_runs_do_not_block(s3, instance, images_uri):
    from fruit_assets.definitions import defs

    put(s3, images_uri, "Apple/a1.jpg")
    add_run(instance, job_name="some_other_job", status=DagsterRunStatus.STARTED)
    add_run(instance, job_name=JOB_NAME, status=DagsterRunStatus.SUCCESS)
    add_run(instance, job_name=JOB_NAME, status=DagsterRunStatus.FAILURE)
    the_run(tick(instance, images_uri, definitions=defs))


def test_quiet_period_waits_for_uploads_to_settle(s3, instance, images_uri, monkeypatch):
    monkeypatch.delenv(sensors.SETTLE_ENV)  # the default, 2 s
    put(s3, images_uri, "Apple/a1.jpg", b"old")
    put(s3, images_uri, "Banana/b1.jpg")
    just_put = tick(instance, images_uri)
    assert just_put.run_requests == []
    assert just_put.skip_message.startswith("2 image(s) modified in the last 2 s (upload in progress?)")
    assert ImagesCursor.from_json(just_put.cursor).generation == 0  # only the quiet period is recorded

    time.sleep(2.1)
    first = tick(instance, images_uri, just_put.cursor)
    assert the_run(first).tags[TAG_IMAGES] == "2"
    assert ImagesCursor.from_json(first.cursor).waiting_since is None

    # a1 replaced by as many bytes, maybe within the second of the listing that follows: S3 mtimes have
    # whole seconds, so its row could look unchanged later. The tick waits rather than record this state.
    put(s3, images_uri, "Apple/a1.jpg", b"new")
    put(s3, images_uri, "Apple/a2.jpg")
    waiting = tick(instance, images_uri, first.cursor)
    assert waiting.run_requests == [] and "waiting for them to settle" in waiting.skip_message
    waiting_cursor = ImagesCursor.from_json(waiting.cursor)
    assert waiting_cursor.digest == ImagesCursor.from_json(first.cursor).digest
    assert waiting_cursor.waiting_since is not None

    # Uploads that never pause would hold runs back for ever: after the longest wait, a run for the
    # images that have settled (b1), and the fresh ones are counted on a later tick.
    monkeypatch.setenv(sensors.MAX_WAIT_ENV, "0")
    capped = tick(instance, images_uri, waiting.cursor)
    assert the_run(capped).tags[TAG_IMAGES] == "3"
    assert the_run(capped).tags[sensors.TAG_SETTLING] == "2"
    monkeypatch.delenv(sensors.MAX_WAIT_ENV)

    time.sleep(2.1)
    for cursor in (waiting.cursor, capped.cursor):
        settled = tick(instance, images_uri, cursor)
        assert the_run(settled).tags[TAG_IMAGES] == "3"
        assert sensors.TAG_SETTLING not in the_run(settled).tags
        assert ImagesCursor.from_json(settled.cursor).waiting_since is None


def test_local_folder(instance, tmp_path):
    root = tmp_path / "images"
    (root / "Apple").mkdir(parents=True)
    (root / "Apple" / "a1.jpg").write_bytes(b"one")
    (root / "Banana").mkdir()
    (root / "Banana" / "b1.png").write_bytes(b"two")

    first = tick(instance, str(root))
    assert the_run(first).tags[TAG_IMAGES] == "2"
    assert the_run(first).tags[sensors.TAG_IMAGES_URI] == str(root)
    assert tick(instance, str(root), first.cursor).skip_message == "no new or changed images (2 images)"

    (root / "Apple" / "notes.txt").write_text("ignored")
    assert tick(instance, str(root), first.cursor).run_requests == []

    (root / "Apple" / "a1.jpg").write_bytes(b"one")  # same bytes, rewritten: a new mtime
    os.utime(root / "Apple" / "a1.jpg", ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert the_run(tick(instance, str(root), first.cursor)).run_key.startswith("2-")


def test_missing_local_folder_fails_the_tick(instance, tmp_path):
    with pytest.raises(ImageListingError, match=r"FRUIT_IMAGES_URI=.*does not exist"):
        tick(instance, str(tmp_path / "nowhere"))


# A tick fails either in the sensor's listing (ImageListingError) or, when the ImageSource resource
# already refuses the bucket at start (storage.check_reachable), as a resource error caused by it.
TICK_ERRORS = (ImageListingError, DagsterResourceFunctionError)


def error_chain(error: BaseException) -> str:
    """The messages of an exception and of everything that caused it."""
    texts = []
    while error is not None:
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def test_missing_bucket_fails_the_tick(s3, instance):
    with pytest.raises(TICK_ERRORS) as failure:
        tick(instance, "s3://no-such-bucket-42/images")
    assert "FRUIT_IMAGES_URI=s3://no-such-bucket-42/images: bucket" in error_chain(failure.value)


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_the_tick(s3, instance, images_uri, monkeypatch):
    put(s3, images_uri, "Apple/a1.jpg")
    cursor = tick(instance, images_uri).cursor
    put(s3, images_uri, "Apple/a2.jpg")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_unused_port()}")  # nothing listens there
    monkeypatch.setenv("FRUIT_S3_MAX_ATTEMPTS", "2")  # fail after 1 s of backoff, not 5-12 s
    with pytest.raises(TICK_ERRORS) as failure:  # a failed tick: the daemon keeps the stored cursor
        tick(instance, images_uri, cursor)
    message = error_chain(failure.value)
    assert f"FRUIT_IMAGES_URI={images_uri}" in message
    assert s3.secret_key not in message


def test_bad_credentials_fail_the_tick_without_leaking_them(s3, instance, images_uri, monkeypatch):
    put(s3, images_uri, "Apple/a1.jpg")
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    # storage caches one filesystem per endpoint string: a trailing slash makes a fresh one with these keys
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url + "/")
    with pytest.raises(TICK_ERRORS) as failure:
        tick(instance, images_uri)
    message = error_chain(failure.value)
    assert f"FRUIT_IMAGES_URI={images_uri}" in message
    assert wrong not in message and s3.secret_key not in message


def test_foreign_cursor_is_replaced(s3, instance, images_uri):
    put(s3, images_uri, "Apple/a1.jpg")
    result = tick(instance, images_uri, "set by hand in the UI")
    assert the_run(result).run_key.startswith("1-")
    assert json.loads(result.cursor)["images"] == 1
