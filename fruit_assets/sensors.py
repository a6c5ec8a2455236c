"""`fruit_images_sensor`: requests a run of `fruit_features_job` when the images under FRUIT_IMAGES_URI change.

How it decides
--------------
Each tick lists the images with the same function the `raw_images` asset uses
(`catalog.list_images`: pyarrow, pages through S3 listings of any size, works on local folders, ignores
non-images, hidden files and files outside a label folder). The state of the images is a sha256 digest
over the sorted (path, size, mtime) rows. The cursor, which Dagster keeps in its database and so survives
restarts of `dagster dev` (given a DAGSTER_HOME), holds the digest of the last state a run was requested
for. A different digest means something was added, replaced (an S3 re-upload changes LastModified) or
deleted: the sensor requests one run and moves the cursor to the new digest.

Why nothing is missed. The sensor compares whole states, not "keys after K" or "modified after T"
(the approach of `dagster_aws.s3.sensor.get_objects`, which misses replaced objects, dagster issue
22892). A listing is not an atomic snapshot: an object written while a tick lists is either in this
listing, or it is not, and then it is in the next listing, whose digest differs from the cursor, so that
tick requests a run. No assumption about key order or clocks is needed for that.

The one way a change could still go unseen is a listing that looks exactly the same before and after it:
S3 (and some filesystems) keep mtimes in whole seconds, so an object replaced by one of the same size in
the same second keeps its (path, size, mtime). Hence a quiet period: a tick that sees an image modified
less than FRUIT_SENSOR_SETTLE_SECONDS (default 2) before it started listing waits for a later tick instead
of recording that state. A recorded image was then modified at least `settle` seconds before the listing
started, and any later write lands in a later second (given settle >= 1 s plus the clock offset between
this host and the storage, and uploads that take less than settle - 1 s from start to finish).
The quiet period also turns a bulk upload into one run once it has finished instead of a run per tick.
So that a constant stream of uploads cannot hold runs back for ever, after FRUIT_SENSOR_MAX_WAIT_SECONDS
(default 600) of waiting a tick requests a run for the images that have settled (the digest then leaves
out the fresh ones; a later tick counts them once they have settled, with one more run).

Never two runs for the same upload:
- two ticks that see the same state with the same cursor compute the same run key, and Dagster creates
  at most one run per run key and sensor (this covers a daemon that died after submitting the run but
  before storing the cursor); a tick whose cursor already holds the state returns a SkipReason;
- the run key is `<generation>-<digest>`, where the generation counts the runs requested so far, so
  returning to an earlier state (add an image, then delete it again) still gets a run: a bare digest would
  collide with the earlier run's key and Dagster would silently drop the request;
- while a run that writes these assets is queued, starting, running or cancelling (a run of
  `fruit_features_job`, or any run whose asset selection includes an asset of this code location, such as
  *Materialize all* in the UI), the tick skips WITHOUT moving the cursor: the first tick after that run
  ends sees the changes made in the meantime. The check and the run launch are not atomic; for strict
  mutual exclusion set a run-queue tag concurrency limit on `fruit_assets/pipeline` (see the README).

The run request says what the tick saw in tags (`fruit_assets/images`, `fruit_assets/images_digest`, ...);
the run lists the images again itself and works out which ones are new. Deleting every image does not
request a run (`raw_images` refuses an empty catalog); the tick says so and keeps the cursor.

A listing that fails (storage down, bad credentials, missing bucket or folder) raises: Dagster records a
failed tick and keeps the cursor, so nothing is skipped, and the message names FRUIT_IMAGES_URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

import pandas as pd
import pyarrow.fs as pafs
from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from fruit_assets.catalog import list_images
from fruit_assets.resources import ImageSource
from fruit_assets.storage import Location

SENSOR_NAME = "fruit_images_sensor"
JOB_NAME = "fruit_features_job"
SETTING = "FRUIT_IMAGES_URI"

INTERVAL_ENV = "FRUIT_SENSOR_INTERVAL_SECONDS"
DEFAULT_INTERVAL_SECONDS = 30
SETTLE_ENV = "FRUIT_SENSOR_SETTLE_SECONDS"
DEFAULT_SETTLE_SECONDS = 2.0
MAX_WAIT_ENV = "FRUIT_SENSOR_MAX_WAIT_SECONDS"
DEFAULT_MAX_WAIT_SECONDS = 600.0

TAG_TRIGGER = "fruit_assets/trigger"
TAG_IMAGES = "fruit_assets/images"  # images listed, settling ones included
TAG_SETTLING = "fruit_assets/images_settling"  # of those, modified too recently to be in the digest
TAG_DIGEST = "fruit_assets/images_digest"
TAG_IMAGES_URI = "fruit_assets/images_uri"
TAG_PIPELINE = "fruit_assets/pipeline"  # constant value: a handle for run-queue tag concurrency limits

# A run in one of these states may still write the assets. NOT_STARTED and QUEUED count: the run exists
# and will start. A run stuck in one of them (its process killed) blocks the sensor until it is marked
# finished in the UI; the skip message names it.
BUSY_STATUSES = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
    DagsterRunStatus.SUSPENDED,
]


class ImageListingError(RuntimeError):
    """The images under FRUIT_IMAGES_URI could not be listed."""


def _positive_number(name: str, default: float, *, minimum: float, kind=float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def interval_seconds() -> int:
    """FRUIT_SENSOR_INTERVAL_SECONDS (default 30): read once, when the code location loads."""
    return _positive_number(INTERVAL_ENV, DEFAULT_INTERVAL_SECONDS, minimum=1, kind=int)


def settle_seconds() -> float:
    """FRUIT_SENSOR_SETTLE_SECONDS (default 2; 0 switches the quiet period off): read on every tick."""
    return _positive_number(SETTLE_ENV, DEFAULT_SETTLE_SECONDS, minimum=0)


def max_wait_seconds() -> float:
    """FRUIT_SENSOR_MAX_WAIT_SECONDS (default 600): the longest a quiet period holds a run back."""
    return _positive_number(MAX_WAIT_ENV, DEFAULT_MAX_WAIT_SECONDS, minimum=0)


def images_digest(catalog: pd.DataFrame) -> str:
    """sha256 over the (path, size_bytes, modified_at in ns) rows of a catalog, in path order.

    Each row is JSON-encoded on its own line, so no two different catalogs give the same byte stream
    (keys may contain tabs or newlines)."""
    digest = hashlib.sha256()
    rows = catalog.sort_values("path")
    mtimes = rows["modified_at"].astype("int64") if len(rows) else []
    for path, size, mtime in zip(rows["path"], rows["size_bytes"], mtimes):
        digest.update(json.dumps([str(path), int(size), int(mtime)]).encode("utf-8") + b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class ImagesCursor:
    """The sensor cursor: the state the last run was requested for."""

    digest: str  # "" before the first run
    images: int  # images in that digest
    listed_at: str  # ISO time at which that listing started
    generation: int  # runs requested so far; part of the run key
    waiting_since: float | None = None  # epoch s: first tick of the current quiet period, if any

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "ImagesCursor | None":
        """None for no cursor; ValueError for one this sensor did not write."""
        if not text:
            return None
        try:
            data = json.loads(text)
            waiting_since = data.get("waiting_since")
            return cls(
                digest=str(data["digest"]),
                images=int(data["images"]),
                listed_at=str(data["listed_at"]),
                generation=int(data.get("generation", 0)),
                waiting_since=None if waiting_since is None else float(waiting_since),
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a {SENSOR_NAME} cursor: {text[:200]!r}") from exc


NO_CURSOR = ImagesCursor(digest="", images=0, listed_at="", generation=0)


@dataclass(frozen=True)
class ImagesState:
    """What one listing saw."""

    uri: str
    listed_at: datetime
    images: int  # all images listed
    settled: int  # images in the digest
    settling: int  # images modified within the quiet period, left out of the digest
    ignored: int  # files that are not images in a label folder
    digest: str  # over the settled images


def _container_missing(location: Location) -> str | None:
    """What is missing when the root cannot exist: the S3 bucket or the local folder; None if present.
    (pyarrow lists a missing bucket or prefix as empty; an empty prefix is normal, a missing bucket is not.)"""
    if location.is_local:
        info = location.filesystem.get_file_info(location.path)
        return None if info.type == pafs.FileType.Directory else f"folder {location.path} does not exist"
    bucket = location.path.split("/", 1)[0]
    if location.filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
        return f"bucket {bucket!r} does not exist or is not visible with the current AWS credentials"
    return None


def list_state(images: ImageSource, settle: float) -> ImagesState:
    """List the images and summarise them; raises ImageListingError naming FRUIT_IMAGES_URI."""
    location = images.location()  # StorageConfigError names FRUIT_IMAGES_URI already
    # Taken before the listing starts: a write the listing misses happens after this instant.
    listed_at = datetime.now(timezone.utc)
    try:
        catalog, ignored = list_images(location)
        missing = None if len(catalog) or ignored else _container_missing(location)
    except Exception as exc:  # OSError from pyarrow: network, auth, throttling, ...
        raise ImageListingError(
            f"could not list the images under {SETTING}={location.uri}: {type(exc).__name__}: {exc}"
        ) from exc
    if missing:
        raise ImageListingError(f"{SETTING}={location.uri}: {missing}")
    if settle > 0 and len(catalog):
        fresh = catalog["modified_at"] > pd.Timestamp(listed_at.timestamp() - settle, unit="s", tz="UTC")
    else:
        fresh = pd.Series(False, index=catalog.index)
    settled = catalog[~fresh]
    return ImagesState(
        uri=location.uri,
        listed_at=listed_at,
        images=len(catalog),
        settled=len(settled),
        settling=int(fresh.sum()),
        ignored=len(ignored),
        digest=images_digest(settled),
    )


def busy_run(context: SensorEvaluationContext):
    """A queued or running run that may write the assets, or None."""
    asset_keys = set()
    if context.repository_def is not None:
        asset_keys = set(context.repository_def.asset_graph.materializable_asset_keys)
    for run in context.instance.get_runs(filters=RunsFilter(statuses=BUSY_STATUSES), limit=200):
        if run.job_name == JOB_NAME or (run.asset_selection and asset_keys & set(run.asset_selection)):
            return run
    return None


@sensor(
    name=SENSOR_NAME,
    job_name=JOB_NAME,
    minimum_interval_seconds=interval_seconds(),
    default_status=DefaultSensorStatus.STOPPED,
    description=(
        "Requests a run of fruit_features_job when images under FRUIT_IMAGES_URI are added, replaced or "
        "deleted. Waits while such a run is in progress. Stopped by default: switch it on in the UI or "
        "with `dagster sensor start fruit_images_sensor`."
    ),
)
def fruit_images_sensor(context: SensorEvaluationContext, images: ImageSource):
    try:
        cursor = ImagesCursor.from_json(context.cursor) or NO_CURSOR
    except ValueError as exc:
        # Set by hand in the UI, say: start afresh. Worst case one run for a state already materialized.
        context.log.warning(f"{exc}; treating it as no cursor")
        cursor = NO_CURSOR

    run = busy_run(context)
    if run is not None:
        return SkipReason(
            f"run {run.run_id} ({run.job_name}, {run.status.value}) is in progress; changes are picked up "
            "by the first tick after it ends (cursor not advanced)"
        )

    settle, max_wait = settle_seconds(), max_wait_seconds()
    started = time.monotonic()
    state = list_state(images, settle)
    context.log.info(
        f"listed {state.images} images under {state.uri} in {time.monotonic() - started:.1f} s "
        f"({state.settling} modified in the last {settle:g} s, {state.ignored} other files ignored)"
    )
    if state.images == 0:
        return SkipReason(f"no images under {state.uri} ({state.ignored} other file(s) ignored)")

    # The quiet period. Only `waiting_since` changes here: the digest and generation stay as they were.
    now = state.listed_at.timestamp()
    waiting_since = (cursor.waiting_since or now) if state.settling else None
    waiting = replace(cursor, waiting_since=waiting_since)
    settling = f"{state.settling} image(s) modified in the last {settle:g} s"
    if state.settling and (now - waiting_since < max_wait or state.settled == 0):
        return SensorResult(
            skip_reason=SkipReason(
                f"{settling} (upload in progress?): waiting for them to settle "
                f"(waiting {now - waiting_since:.0f} s, at most {max_wait:g} s)"
            ),
            cursor=waiting.to_json(),
        )
    if state.digest == cursor.digest:
        note = f"; {settling}, counted once settled" if state.settling else ""
        return SensorResult(
            skip_reason=SkipReason(f"no new or changed images ({state.settled} images){note}"),
            cursor=waiting.to_json() if waiting != cursor else None,  # None: cursor unchanged
        )

    generation = cursor.generation + 1
    new_cursor = ImagesCursor(
        digest=state.digest,
        images=state.settled,
        listed_at=state.listed_at.isoformat(),
        generation=generation,
        waiting_since=waiting_since,
    )
    previous = f"{cursor.images} before" if cursor.generation else "first run of this sensor"
    note = f"; {settling} left for a later run after waiting {max_wait:g} s" if state.settling else ""
    context.log.info(f"requesting run {generation}: {state.settled} images ({previous}){note}")
    return SensorResult(
        run_requests=[
            RunRequest(
                run_key=f"{generation}-{state.digest}",
                tags={
                    TAG_TRIGGER: "sensor",
                    TAG_IMAGES: str(state.images),
                    TAG_DIGEST: state.digest,
                    TAG_IMAGES_URI: state.uri,
                    TAG_PIPELINE: "fruit_features",
                    **({TAG_SETTLING: str(state.settling)} if state.settling else {}),
                },
            )
        ],
        cursor=new_cursor.to_json(),
    )
