"""Listing at scale, against a real S3 server (SeaweedFS) and real local folders: more than 1,000 keys in
one label and more than 1,000 labels, both listing strategies, the requests they make (counted by a
loopback proxy), retries of dropped requests, and the sensor on top: modified and deleted keys, and a
label created while a tick lists."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from math import ceil
from pathlib import Path

import pytest
from dagster import DagsterInstance, build_sensor_context

from benchmarks import listing_model
from benchmarks.s3_proxy import CountingProxy
from fruit_assets import sensors, storage
from fruit_assets.pipeline.listing import ImageListingError, list_images
from fruit_assets.resources import ImageSource
from fruit_assets.sensors import TAG_CHANGED_LABELS, TAG_IMAGES, fruit_images_sensor
from fruit_assets_tests.support import TEST_BUCKET

BIG = "Big Label"  # more than 1,000 keys: two pages
BIG_IMAGES = 1100
SMALL_LABELS = 1001  # one image each: with the others, more than 1,000 label folders
ODD = "Odd #?%+ name"


def big_tree() -> dict[str, bytes]:
    """{relative key: body}. Bodies differ in size so that a replacement is visible in the listing."""
    files = {f"{BIG}/r0_{i:05d}.jpg": b"x" * (1 + i % 7) for i in range(BIG_IMAGES)}
    files |= {f"L{i:04d}/r0_0.jpg": b"y" * (1 + i % 5) for i in range(SMALL_LABELS)}
    files |= {
        f"{ODD}/a b+c%20#?.JPG": b"odd",
        f"{BIG}/notes.txt": b"ignored",
        f"{BIG}/.DS_Store": b"hidden",
        ".hidden/A/x.jpg": b"hidden folder: never listed",
        "stray.jpg": b"outside a label folder: ignored",
    }
    return files


IMAGES = BIG_IMAGES + SMALL_LABELS + 1
FOLDERS = 1 + SMALL_LABELS + 1  # BIG, the small ones, ODD; .hidden is not counted


def upload(s3, prefix_uri: str, files: dict[str, bytes]) -> None:
    client = s3.client(max_pool_connections=32)
    base = prefix_uri.split("/", 3)[3]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=TEST_BUCKET, Key=f"{base}/{item[0]}", Body=item[1]),
                      files.items()))


def write_local(root: Path, files: dict[str, bytes]) -> None:
    for relative, body in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


def new_prefix() -> str:
    return f"s3://{TEST_BUCKET}/listing-{uuid.uuid4().hex[:12]}/images"


@pytest.fixture(scope="module")
def s3_tree(s3):
    uri = new_prefix()
    upload(s3, uri, big_tree())
    return uri


@pytest.fixture(scope="module")
def local_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("listing") / "images"
    write_local(root, big_tree())
    return str(root)


def expected_rows(uri: str) -> list[tuple[str, str, int]]:
    rows = [(f"{uri}/{key}", key.split("/")[-2], len(body)) for key, body in big_tree().items()
            if key.lower().endswith((".jpg", ".jpeg", ".png")) and "/" in key and not key.startswith(".")]
    return sorted(rows)


@pytest.mark.parametrize("where", [pytest.param("s3", marks=pytest.mark.s3), "local"])
@pytest.mark.parametrize("max_folder_listings", [5000, 1000], ids=["folder by folder", "flat"])
def test_lists_every_image_of_more_than_1000_labels_and_keys(request, where, max_folder_listings):
    uri = request.getfixturevalue(f"{where}_tree")
    listing = list_images(storage.resolve(uri), max_folder_listings=max_folder_listings)
    assert listing.flat == (max_folder_listings < FOLDERS)
    assert listing.folders == FOLDERS and listing.labels == FOLDERS
    got = sorted(zip(*(listing.images[name].to_pylist() for name in ("path", "label", "size_bytes")), strict=True))
    assert got == expected_rows(uri)
    assert listing.ignored == 2
    assert listing.ignored_examples == (f"{uri}/{BIG}/notes.txt", f"{uri}/stray.jpg")


def s3_pages(keys: int) -> int:
    return max(1, ceil(keys / 1000))


@pytest.fixture
def proxy(s3, monkeypatch):
    """A request-counting proxy in front of the test S3 server; the AWS settings point at it."""
    with CountingProxy(s3.port) as proxy:
        # storage caches one filesystem per endpoint: this endpoint gets its own, through the proxy
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        yield proxy


TOP_ENTRIES = FOLDERS + 1 + 1  # the folders, .hidden/ and stray.jpg
PER_FOLDER_REQUESTS = s3_pages(TOP_ENTRIES) + s3_pages(BIG_IMAGES + 2) + SMALL_LABELS + 1  # .hidden: never listed


def test_requests_made_by_each_strategy(s3_tree, proxy):
    list_images(storage.resolve(s3_tree), max_folder_listings=5000)
    assert proxy.reset() == {"LIST": PER_FOLDER_REQUESTS}

    # Above the limit, 32 folders spread over the list are listed first: BIG (2 pages) and 31 small
    # ones. Too small on average, so the root is listed flat.
    listing = list_images(storage.resolve(s3_tree), max_folder_listings=1000)
    assert listing.flat
    flat_requests = s3_pages(TOP_ENTRIES) + (2 + 31) + s3_pages(len(big_tree()))
    assert proxy.reset() == {"LIST": flat_requests}

    # The cost model of the benchmark (and of the docs) counts the same.
    sizes = [BIG_IMAGES + 2] + [1] * SMALL_LABELS + [1]  # keys per folder, in name order
    for limit, requests in ((5000, PER_FOLDER_REQUESTS), (1000, flat_requests)):
        plan, flat = listing_model.catalog_listing(sizes, 32, limit, top_entries=TOP_ENTRIES)
        assert (plan.requests, flat) == (requests, limit == 1000)


def test_big_folders_in_the_sample_keep_the_listing_folder_by_folder(s3_tree, proxy):
    # One thread: the sample is the first folder, BIG, with more than 500 keys; it is not listed twice.
    listing = list_images(storage.resolve(s3_tree), concurrency=1, max_folder_listings=1000)
    assert not listing.flat and listing.folders == FOLDERS
    assert sorted(zip(*(listing.images[name].to_pylist() for name in ("path", "label", "size_bytes")), strict=True)) == (
        expected_rows(s3_tree)
    )
    assert proxy.reset() == {"LIST": PER_FOLDER_REQUESTS}


def test_folders_are_listed_concurrency_requests_at_a_time(s3, proxy):
    # pyarrow runs S3 requests on its own IO thread pool, 8 threads by default: without enlarging it,
    # 16 listing threads had 8 requests in flight. The proxy holds each request for a second, so the
    # requests sent at once pile up there.
    uri = new_prefix()
    upload(s3, uri, {f"F{i:02d}/x.jpg": b"x" for i in range(20)})
    proxy.delay_seconds = 1.0
    listing = list_images(storage.resolve(uri), concurrency=16)
    assert listing.images.num_rows == 20
    assert proxy.peak_in_flight > 8


def small_tree() -> dict[str, bytes]:
    return {f"{label}/r0_{i}.jpg": b"z" * (i + 1) for label in ("Apple", "Banana", "Cherry") for i in range(3)}


def test_dropped_requests_are_retried(s3, proxy):
    uri = new_prefix()
    upload(s3, uri, small_tree())
    reference = list_images(storage.resolve(uri)).images
    proxy.reset()
    dropped = []

    def drop_two_folder_listings(kind: str, target: str) -> bool:
        if kind == "LIST" and "delimiter" not in target and len(dropped) < 2:
            dropped.append(target)
            return False
        return True

    proxy.on_request = drop_two_folder_listings
    assert list_images(storage.resolve(uri)).images.equals(reference)
    assert len(dropped) == 2 and proxy.counts["LIST"] == 1 + 3 + 2


def test_a_lasting_failure_names_the_setting_and_no_secret(s3, proxy, monkeypatch):
    uri = new_prefix()
    upload(s3, uri, small_tree())
    dropped = []

    def drop_banana(kind, target):  # one folder never answers
        if "Banana" in target:
            dropped.append(target)
            return False
        return True

    proxy.on_request = drop_banana
    # One attempt, not five: the AWS SDK waits up to 2**n s before its n-th retry, 5-12 s in all here.
    # (Retries of dropped requests: the test above.)
    monkeypatch.setenv("FRUIT_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(ImageListingError) as failure:
        list_images(storage.resolve(uri))
    message = str(failure.value)
    assert message.startswith(f"could not list the images under FRUIT_IMAGES_URI={uri}: ")
    assert s3.secret_key not in message  # (the access key, "fruit", is also part of the bucket name)
    # The setting's one attempt, sent again at most once more by libcurl itself when it went out on a pooled
    # connection that turned out dead ("retrying a fresh connect"): 2 requests in a whole-suite run, where
    # earlier tests left connections in the pool, 1 when alone. Five attempts sent 6-7, two sent 3-4.
    assert 1 <= len(dropped) <= 2, dropped


@pytest.fixture
def instance(monkeypatch):
    monkeypatch.setenv(sensors.SETTLE_ENV, "0")  # every upload is seen by the very next tick
    instance = DagsterInstance.ephemeral()
    yield instance
    instance.dispose()


def tick(instance, uri: str, cursor: str | None = None, max_folder_listings: int = 5000):
    images = ImageSource(uri=uri, max_folder_listings=max_folder_listings)
    with build_sensor_context(instance=instance, cursor=cursor, resources={"images": images}) as context:
        return fruit_images_sensor.evaluate_tick(context)


def the_run(result):
    assert result.skip_message is None, result.skip_message
    [request] = result.run_requests
    return request


def test_sensor_sees_a_modified_and_a_deleted_key_among_1000_labels(s3, instance):
    uri = new_prefix()
    upload(s3, uri, big_tree())
    first = tick(instance, uri)
    assert the_run(first).tags[TAG_IMAGES] == str(IMAGES)
    assert "label_groups" in json.loads(first.cursor) and len(first.cursor) < 40_000

    client, base = s3.client(), uri.split("/", 3)[3]
    client.put_object(Bucket=TEST_BUCKET, Key=f"{base}/{BIG}/r0_01050.jpg", Body=b"replaced, longer")  # page 2
    client.delete_object(Bucket=TEST_BUCKET, Key=f"{base}/L0500/r0_0.jpg")  # the label goes with it

    second = tick(instance, uri, first.cursor, max_folder_listings=1000)  # the flat listing, this time
    request = the_run(second)
    assert request.tags[TAG_IMAGES] == str(IMAGES - 1)
    changed = request.tags[TAG_CHANGED_LABELS]
    assert changed.startswith("2 of 1024 label groups changed") and BIG in changed
    # Both strategies digest the same state alike: listed folder by folder again, nothing changed.
    assert tick(instance, uri, second.cursor).skip_message == f"no new or changed images ({IMAGES - 1} images)"


def test_sensor_names_changed_labels(s3, instance):
    uri = new_prefix()
    upload(s3, uri, small_tree())
    first = tick(instance, uri)
    assert the_run(first).tags[TAG_CHANGED_LABELS] == "first run of this sensor: 3 label(s)"
    client, base = s3.client(), uri.split("/", 3)[3]
    client.put_object(Bucket=TEST_BUCKET, Key=f"{base}/Apple/r0_0.jpg", Body=b"other size")
    for i in range(3):
        client.delete_object(Bucket=TEST_BUCKET, Key=f"{base}/Cherry/r0_{i}.jpg")
    changed = the_run(tick(instance, uri, first.cursor)).tags[TAG_CHANGED_LABELS]
    assert changed == "2 label(s) changed: modified Apple; removed Cherry"


def test_a_label_created_during_a_tick_runs_on_the_next_tick(s3, instance, proxy):
    uri = new_prefix()
    upload(s3, uri, small_tree())
    created = threading.Event()

    def create_label_after_the_top_level(kind: str, target: str) -> bool:
        # The first folder listing: the top level has been listed, without the new label.
        if kind == "LIST" and "delimiter" not in target and not created.is_set():
            upload(s3, uri, {"Date/d1.jpg": b"new"})
            created.set()
        return True

    proxy.on_request = create_label_after_the_top_level
    during = tick(instance, uri)
    assert created.is_set()
    assert the_run(during).tags[TAG_IMAGES] == "9"  # Date was not seen by this tick...
    after = the_run(tick(instance, uri, during.cursor))
    assert after.tags[TAG_IMAGES] == "10"  # ...and the next one requests a run for it
    assert after.tags[TAG_CHANGED_LABELS] == "1 label(s) changed: added Date"
