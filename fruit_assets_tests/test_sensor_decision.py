"""Tests of `sensors.decide`, the sensor's decision without I/O: a stored cursor and what one listing saw
go in, a skip or a run request comes out. No S3, no Dagster instance: fast. The sensor around it (listing,
cursor storage, run keys honoured by Dagster) is tested end to end in test_sensor.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fruit_assets.pipeline.image_state import StateDigest
from fruit_assets.sensors import (
    NO_CURSOR,
    TAG_CHANGED_LABELS,
    TAG_DIGEST,
    TAG_IMAGES,
    TAG_SETTLING,
    ImagesCursor,
    ImagesState,
    Run,
    SensorSettings,
    Skip,
    decide,
)

T0 = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
SETTINGS = SensorSettings(settle=2.0, max_wait=600.0)


def listing(digest: str, parts: dict[str, str], *, settling: int = 0, at: datetime = T0, ignored: int = 0) -> ImagesState:
    """What a listing at `at` saw: one settled image per part (label), plus `settling` fresh ones."""
    return ImagesState(
        uri="s3://bucket/images",
        listed_at=at,
        images=len(parts) + settling,
        settled=len(parts),
        settling=settling,
        ignored=ignored,
        state=StateDigest(digest=digest, parts=parts, grouped=False),
        labels=sorted(parts),
    )


def run_for(state: ImagesState, cursor: ImagesCursor = NO_CURSOR) -> Run:
    decision = decide(cursor=cursor, state=state, settings=SETTINGS)
    assert isinstance(decision, Run), decision
    return decision


def test_no_images_skips_and_keeps_the_cursor():
    empty = ImagesState("s3://bucket/images", T0, 0, 0, 0, 2, StateDigest("e", {}, False), [])
    assert decide(cursor=NO_CURSOR, state=empty, settings=SETTINGS) == Skip(
        "no images under s3://bucket/images (2 other file(s) ignored)"
    )


def test_first_listing_requests_run_1_and_records_its_state():
    state = listing("d1", {"Apple": "a1", "Banana": "b1"})
    run = run_for(state)
    assert run.run_key == "1-d1"
    assert run.tags[TAG_IMAGES] == "2" and run.tags[TAG_DIGEST] == "d1"
    assert run.tags[TAG_CHANGED_LABELS] == "first run of this sensor: 2 label(s)"
    assert TAG_SETTLING not in run.tags
    assert run.cursor == ImagesCursor(
        digest="d1", images=2, listed_at=T0.isoformat(), generation=1, parts={"Apple": "a1", "Banana": "b1"}
    )
    assert run.summary == "requesting run 1: 2 images; first run of this sensor: 2 label(s)"


def test_the_recorded_state_skips_without_a_new_cursor():
    cursor = run_for(listing("d1", {"Apple": "a1"})).cursor
    later = listing("d1", {"Apple": "a1"}, at=T0 + timedelta(seconds=30))
    assert decide(cursor=cursor, state=later, settings=SETTINGS) == Skip("no new or changed images (1 images)")


def test_a_changed_state_requests_the_next_generation_and_names_the_labels():
    cursor = run_for(listing("d1", {"Apple": "a1", "Cherry": "c1"})).cursor
    run = run_for(listing("d2", {"Apple": "a2", "Banana": "b1"}), cursor)
    assert run.run_key == "2-d2" and run.cursor.generation == 2
    assert run.tags[TAG_CHANGED_LABELS] == "3 label(s) changed: added Banana; modified Apple; removed Cherry"
    assert run.summary.startswith("requesting run 2: 2 images (2 before); 3 label(s) changed")


def test_returning_to_an_earlier_state_gets_a_new_run_key():
    first = run_for(listing("d1", {"Apple": "a1"}))
    second = run_for(listing("d2", {"Apple": "a2"}), first.cursor)
    third = run_for(listing("d1", {"Apple": "a1"}), second.cursor)
    assert [first.run_key, second.run_key, third.run_key] == ["1-d1", "2-d2", "3-d1"]


def test_fresh_images_hold_the_run_back_and_only_the_waiting_time_is_recorded():
    cursor = run_for(listing("d1", {"Apple": "a1"})).cursor
    waiting = decide(cursor=cursor, state=listing("d1", {"Apple": "a1"}, settling=3), settings=SETTINGS)
    assert waiting == Skip(
        "3 image(s) modified in the last 2 s (upload in progress?): waiting for them to settle "
        "(waiting 0 s, at most 600 s)",
        cursor=ImagesCursor(**{**cursor.__dict__, "waiting_since": T0.timestamp()}),
    )
    assert isinstance(waiting, Skip) and waiting.cursor is not None

    # A later tick: the quiet period started at the first tick that saw fresh images.
    later = listing("d2", {"Apple": "a2"}, settling=1, at=T0 + timedelta(seconds=45))
    still = decide(cursor=waiting.cursor, state=later, settings=SETTINGS)
    assert isinstance(still, Skip) and "(waiting 45 s, at most 600 s)" in still.reason
    assert still.cursor == waiting.cursor


def test_after_the_longest_wait_the_settled_images_get_a_run():
    cursor = run_for(listing("d1", {"Apple": "a1"})).cursor
    waiting = decide(cursor=cursor, state=listing("d1", {"Apple": "a1"}, settling=1), settings=SETTINGS)
    assert isinstance(waiting, Skip) and waiting.cursor is not None
    capped_at = T0 + timedelta(seconds=600)

    run = run_for(listing("d2", {"Apple": "a1", "Banana": "b1"}, settling=2, at=capped_at), waiting.cursor)
    assert run.run_key == "2-d2"
    assert run.tags[TAG_IMAGES] == "4" and run.tags[TAG_SETTLING] == "2"
    assert run.cursor.waiting_since == T0.timestamp()  # still waiting for the two fresh ones
    assert run.summary.endswith("; 2 image(s) modified in the last 2 s left for a later run after waiting 600 s")


def test_after_the_longest_wait_nothing_settled_still_waits():
    waiting = decide(cursor=NO_CURSOR, state=listing("e", {}, settling=2), settings=SETTINGS)
    assert isinstance(waiting, Skip) and waiting.cursor is not None
    later = decide(cursor=waiting.cursor, state=listing("e", {}, settling=2, at=T0 + timedelta(hours=1)), settings=SETTINGS)
    assert isinstance(later, Skip) and "waiting for them to settle (waiting 3600 s" in later.reason


def test_an_unchanged_settled_part_with_fresh_images_records_the_wait():
    cursor = run_for(listing("d1", {"Apple": "a1"})).cursor
    settings = SensorSettings(settle=2.0, max_wait=0.0)  # waits no longer: the fresh images' turn comes later
    skip = decide(cursor=cursor, state=listing("d1", {"Apple": "a1"}, settling=1), settings=settings)
    assert skip == Skip(
        "no new or changed images (1 images); 1 image(s) modified in the last 2 s, counted once settled",
        cursor=ImagesCursor(**{**cursor.__dict__, "waiting_since": T0.timestamp()}),
    )


def test_a_settled_state_ends_the_quiet_period():
    cursor = run_for(listing("d1", {"Apple": "a1"})).cursor
    waiting = decide(cursor=cursor, state=listing("d1", {"Apple": "a1"}, settling=1), settings=SETTINGS)
    assert isinstance(waiting, Skip) and waiting.cursor is not None

    # The fresh image was deleted again: the state is the recorded one, and the wait is over.
    over = decide(cursor=waiting.cursor, state=listing("d1", {"Apple": "a1"}, at=T0 + timedelta(seconds=5)), settings=SETTINGS)
    assert over == Skip("no new or changed images (1 images)", cursor=cursor)

    settled = run_for(listing("d2", {"Apple": "a1", "Banana": "b1"}, at=T0 + timedelta(seconds=5)), waiting.cursor)
    assert settled.cursor.waiting_since is None and TAG_SETTLING not in settled.tags
