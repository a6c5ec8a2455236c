"""`fruit_images_sensor`: requests a run of `fruit_features_job` when the images under FRUIT_IMAGES_URI change.

How it decides
--------------
Each tick lists the images with the same function the `raw_images` asset uses
(`catalog.list_images`: pyarrow, label folders listed in parallel, every listing paged through, works on
local folders, ignores non-images, hidden files and files outside a label folder). The state of the
images is a sha256 digest over their (path, size, mtime) rows, computed per label and then over the
labels (`image_state.state_digest`). The cursor, which Dagster keeps in its database and so survives
restarts of `dagster dev` (given a DAGSTER_HOME), holds the digest of the last state a run was requested
for, and the short digest of every label in it. A different digest means something was added, replaced
(an S3 re-upload changes LastModified) or deleted: the sensor requests one run, moves the cursor to the
new digest, and says which labels changed (log and the `fruit_assets/changed_labels` tag).

The decision is `decide`: the stored cursor, what one listing saw and the settings go in, a `Skip` or
a `Run` comes out, with no I/O (test_sensor_decision tests it alone). `fruit_images_sensor` around it
checks for a busy run, lists, logs, and turns the decision into Dagster's result.

Why nothing is missed. The sensor compares whole states, not "keys after K" or "modified after T"
(the approach of `dagster_aws.s3.sensor.get_objects`, which misses replaced objects, dagster issue
22892). A listing is not an atomic snapshot: an object written while a tick lists (in a folder already
listed, or in a label folder created after the top level was listed) is either in this listing, or it
is not, and then it is in the next listing, whose digest differs from the cursor, so that tick requests
a run. No assumption about key order or clocks is needed for that. Every tick lists everything: a tick
never compares a partial listing with the cursor.

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

Cost of a tick
--------------
LIST requests: one per 1,000 entries at the top level, then one per label folder plus one per further
1,000 images in it, 32 (`list_concurrency` of the `images` resource) in flight. A million images in 150
folders is 1,051 requests in 36 rounds of round trips: about 1.8 s at 50 ms each, where the sequential
listing this replaces took 1,000 rounds, 50 s. With more than 1,000 label folders averaging fewer than
500 images, the root is listed flat instead (one request per 1,000 objects, in sequence: see
`pipeline.listing`). No object is read. Then the digest: well under a second for a million rows. Measured and
modelled in BENCHMARKS.md ("Listing and the sensor"). Against AWS the requests are billed (LIST is about
$0.005 per 1,000): at one tick every 30 s, a million images cost about 3 million LIST requests a day
(about $15), so raise FRUIT_SENSOR_INTERVAL_SECONDS for big buckets that change rarely.

The cursor (JSON): {"digest", "images", "listed_at", "generation", "waiting_since"} as before, plus
"labels": {label: 12-hex digest} for up to 1,000 labels (about 20 bytes plus the name per label: 40 KB
for 1,000 labels of 20 characters), or "label_groups": {group: 12-hex digest} above that (labels
hashed into 1,024 groups: about 25 KB for any number of labels, see `image_state`). A cursor written
before the per-label digests (no "labels") is read; its digest was computed another way, so the first
tick after the upgrade requests one run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
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

from fruit_assets.pipeline import image_state
from fruit_assets.pipeline.listing import ImageListingError
from fruit_assets.resources import ImageSource
from fruit_assets.settings import Setting, seconds
from fruit_assets.storage import Location, missing_container

__all__ = ["Decision", "ImageListingError", "ImagesCursor", "Run", "SensorSettings", "Skip", "decide", "fruit_images_sensor"]

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
TAG_CHANGED_LABELS = "fruit_assets/changed_labels"  # a summary: which labels changed since the last run

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


INTERVAL = Setting(INTERVAL_ENV, DEFAULT_INTERVAL_SECONDS, seconds(1, whole=True))
SETTLE = Setting(SETTLE_ENV, DEFAULT_SETTLE_SECONDS, seconds(0))
MAX_WAIT = Setting(MAX_WAIT_ENV, DEFAULT_MAX_WAIT_SECONDS, seconds(0))


def interval_seconds() -> int:
    """FRUIT_SENSOR_INTERVAL_SECONDS (default 30): read once, when the code location loads."""
    return int(INTERVAL.resolve(f"{SENSOR_NAME}'s minimum interval"))


def settle_seconds() -> float:
    """FRUIT_SENSOR_SETTLE_SECONDS (default 2; 0 switches the quiet period off): read on every tick."""
    return float(SETTLE.resolve(f"{SENSOR_NAME}'s quiet period"))


def max_wait_seconds() -> float:
    """FRUIT_SENSOR_MAX_WAIT_SECONDS (default 600): the longest a quiet period holds a run back."""
    return float(MAX_WAIT.resolve(f"{SENSOR_NAME}'s longest wait"))


@dataclass(frozen=True)
class ImagesCursor:
    """The sensor cursor: the state the last run was requested for."""

    digest: str  # "" before the first run
    images: int  # images in that digest
    listed_at: str  # ISO time at which that listing started
    generation: int  # runs requested so far; part of the run key
    waiting_since: float | None = None  # epoch s: first tick of the current quiet period, if any
    # Short digests per label (or per group of labels when `grouped`); None in cursors written before
    # they existed, and before the first run.
    parts: dict[str, str] | None = None
    grouped: bool = False

    def to_json(self) -> str:
        data = asdict(self)
        parts, grouped = data.pop("parts"), data.pop("grouped")
        if parts is not None:
            data["label_groups" if grouped else "labels"] = parts
        return json.dumps(data, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | None) -> ImagesCursor | None:
        """None for no cursor; ValueError for one this sensor did not write."""
        if not text:
            return None
        try:
            data = json.loads(text)
            waiting_since = data.get("waiting_since")
            grouped = "label_groups" in data
            parts = data.get("label_groups" if grouped else "labels")
            return cls(
                digest=str(data["digest"]),
                images=int(data["images"]),
                listed_at=str(data["listed_at"]),
                generation=int(data.get("generation", 0)),
                waiting_since=None if waiting_since is None else float(waiting_since),
                parts=None if parts is None else {str(key): str(value) for key, value in parts.items()},
                grouped=grouped,
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
    state: image_state.StateDigest  # of the settled images
    labels: list[str]  # labels of the settled images, to name what changed

    @property
    def digest(self) -> str:
        return self.state.digest


def _check_container(location: Location) -> None:
    """Raise ImageListingError if the bucket or folder of an empty listing does not exist."""
    try:
        missing = missing_container(location)
    except OSError as exc:
        raise ImageListingError(
            f"could not list the images under {SETTING}={location.uri}: {type(exc).__name__}: {exc}"
        ) from exc
    if missing:
        raise ImageListingError(f"{SETTING}={location.uri}: {missing}")


def list_state(images: ImageSource, settle: float) -> ImagesState:
    """List the images and summarise them; raises ImageListingError naming FRUIT_IMAGES_URI."""
    location = images.location()  # StorageConfigError names FRUIT_IMAGES_URI already
    # Taken before the listing starts: a write the listing misses happens after this instant.
    listed_at = datetime.now(UTC)
    listing = images.list_images()
    if not listing.images.num_rows and not listing.ignored:
        _check_container(location)
    table = listing.images
    if settle > 0:
        cutoff = pa.scalar(int((listed_at.timestamp() - settle) * 1e9), pa.timestamp("ns", tz="UTC"))
        settled = table.filter(pc.less_equal(table["modified_at"], cutoff))
    else:
        settled = table
    return ImagesState(
        uri=location.uri,
        listed_at=listed_at,
        images=table.num_rows,
        settled=settled.num_rows,
        settling=table.num_rows - settled.num_rows,
        ignored=listing.ignored,
        state=image_state.state_digest(settled),
        labels=pc.unique(settled["label"]).to_pylist(),
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
    cursor = _read_cursor(context)
    run = busy_run(context)
    if run is not None:
        return SkipReason(
            f"run {run.run_id} ({run.job_name}, {run.status.value}) is in progress; changes are picked up "
            "by the first tick after it ends (cursor not advanced)"
        )
    settings = SensorSettings(settle=settle_seconds(), max_wait=max_wait_seconds())
    started = time.monotonic()
    state = list_state(images, settings.settle)
    context.log.info(
        f"listed {state.images} images under {state.uri} in {time.monotonic() - started:.1f} s "
        f"({state.settling} modified in the last {settings.settle:g} s, {state.ignored} other files ignored)"
    )
    decision = decide(cursor=cursor, state=state, settings=settings)
    if isinstance(decision, Skip):
        if decision.cursor is None:  # the stored cursor stays
            return SkipReason(decision.reason)
        return SensorResult(skip_reason=SkipReason(decision.reason), cursor=decision.cursor.to_json())
    context.log.info(decision.summary)
    return SensorResult(
        run_requests=[RunRequest(run_key=decision.run_key, tags=decision.tags)], cursor=decision.cursor.to_json()
    )


def _read_cursor(context: SensorEvaluationContext) -> ImagesCursor:
    try:
        return ImagesCursor.from_json(context.cursor) or NO_CURSOR
    except ValueError as exc:
        # Set by hand in the UI, say: start afresh. Worst case one run for a state already materialized.
        context.log.warning(f"{exc}; treating it as no cursor")
        return NO_CURSOR


# -- the decision: no I/O, no Dagster ----------------------------------------------------------------


@dataclass(frozen=True)
class SensorSettings:
    settle: float  # seconds an image must be unmodified before its state is recorded (0: off)
    max_wait: float  # seconds a quiet period may hold a run back


@dataclass(frozen=True)
class Skip:
    """No run this tick."""

    reason: str
    cursor: ImagesCursor | None = None  # the cursor to store; None keeps the stored one


@dataclass(frozen=True)
class Run:
    """Request a run for the state listed."""

    run_key: str
    tags: dict[str, str]
    cursor: ImagesCursor  # the cursor to store
    summary: str  # for the tick's log


Decision = Skip | Run


def decide(*, cursor: ImagesCursor, state: ImagesState, settings: SensorSettings) -> Decision:
    """What a tick does, given the stored cursor and what its listing saw. The tick's "now" is
    `state.listed_at`, the instant the listing started (the quiet period is measured from it)."""
    if state.images == 0:
        return Skip(f"no images under {state.uri} ({state.ignored} other file(s) ignored)")
    # The quiet period. Only `waiting_since` changes here: the digest and generation stay as they were.
    now = state.listed_at.timestamp()
    waited = now - (cursor.waiting_since or now)
    waiting = replace(cursor, waiting_since=(cursor.waiting_since or now) if state.settling else None)
    settling = f"{state.settling} image(s) modified in the last {settings.settle:g} s"
    if state.settling and (waited < settings.max_wait or state.settled == 0):
        return Skip(
            f"{settling} (upload in progress?): waiting for them to settle "
            f"(waiting {waited:.0f} s, at most {settings.max_wait:g} s)",
            cursor=waiting,
        )
    if state.digest == cursor.digest:
        note = f"; {settling}, counted once settled" if state.settling else ""
        return Skip(
            f"no new or changed images ({state.settled} images){note}",
            cursor=waiting if waiting != cursor else None,
        )
    note = f"; {settling} left for a later run after waiting {settings.max_wait:g} s" if state.settling else ""
    return _run(cursor, state, waiting.waiting_since, note)


def changed_labels(cursor: ImagesCursor, state: ImagesState) -> str:
    """Which labels changed since the cursor's run, in words."""
    if not cursor.generation:
        return f"first run of this sensor: {len(state.labels)} label(s)"
    changes = image_state.compare(cursor.parts, cursor.grouped, state.state)
    if changes is None:
        return "labels not compared (the cursor has no per-label digests: written by an earlier version)"
    return image_state.describe(changes, state.labels)


def _run(cursor: ImagesCursor, state: ImagesState, waiting_since: float | None, note: str) -> Run:
    generation = cursor.generation + 1
    new_cursor = ImagesCursor(
        digest=state.digest,
        images=state.settled,
        listed_at=state.listed_at.isoformat(),
        generation=generation,
        waiting_since=waiting_since,
        parts=state.state.parts,
        grouped=state.state.grouped,
    )
    previous = f" ({cursor.images} before)" if cursor.generation else ""
    changes = changed_labels(cursor, state)
    tags = {
        TAG_TRIGGER: "sensor",
        TAG_IMAGES: str(state.images),
        TAG_DIGEST: state.digest,
        TAG_IMAGES_URI: state.uri,
        TAG_PIPELINE: "fruit_features",
        TAG_CHANGED_LABELS: changes,
        **({TAG_SETTLING: str(state.settling)} if state.settling else {}),
    }
    return Run(
        run_key=f"{generation}-{state.digest}",
        tags=tags,
        cursor=new_cursor,
        summary=f"requesting run {generation}: {state.settled} images{previous}; {changes}{note}",
    )
