"""The digests the sensor keeps of a catalog, whole and per label, and its cursor format. Pure: no storage."""

import json

import pyarrow as pa
import pytest

from fruit_assets.pipeline import image_state
from fruit_assets.pipeline.listing import CATALOG_SCHEMA
from fruit_assets.sensors import ImagesCursor


def catalog(rows: list[tuple[str, str, int, int]]) -> pa.Table:
    """A catalog table from (path, label, size, mtime in ns) rows."""
    paths, labels, sizes, mtimes = zip(*rows, strict=True) if rows else ([], [], [], [])
    return pa.table(
        [pa.array(paths), pa.array(labels), pa.array(sizes, pa.int64()),
         pa.array(mtimes, pa.int64()).cast(pa.timestamp("ns", tz="UTC"))],
        schema=CATALOG_SCHEMA,
    )


BASE = [
    ("s3://b/i/Apple/a1.jpg", "Apple", 10, 1_000),
    ("s3://b/i/Apple/a2.jpg", "Apple", 11, 2_000),
    ("s3://b/i/Banana/b1.jpg", "Banana", 12, 3_000),
    ("s3://b/i/Cherry/c1.jpg", "Cherry", 13, 4_000),
]


def test_digest_ignores_row_order_and_sees_every_field():
    reference = image_state.state_digest(catalog(BASE))
    assert image_state.state_digest(catalog(BASE[::-1])) == reference
    assert set(reference.parts) == {"Apple", "Banana", "Cherry"} and not reference.grouped
    for index, field in [(0, 0), (1, 2), (2, 3)]:  # path, size, mtime of one row
        rows = [list(row) for row in BASE]
        rows[index][field] = rows[index][field] + ("x" if field == 0 else 1)
        assert image_state.state_digest(catalog([tuple(row) for row in rows])).digest != reference.digest


def test_paths_cannot_run_into_each_other():
    # The same path bytes split differently between rows must not give the same digest.
    one = catalog([("s3://b/i/A/ab.jpg", "A", 1, 1), ("s3://b/i/A/c.jpg", "A", 1, 1)])
    two = catalog([("s3://b/i/A/a", "A", 1, 1), ("b.jpgs3://b/i/A/c.jpg", "A", 1, 1)])
    assert image_state.state_digest(one).digest != image_state.state_digest(two).digest


def test_compare_names_added_modified_and_removed_labels():
    old = image_state.state_digest(catalog(BASE))
    rows = [BASE[0], (BASE[1][0], "Apple", 99, 2_000), ("s3://b/i/Date/d1.jpg", "Date", 1, 5), BASE[2]]
    new = image_state.state_digest(catalog(rows))  # Apple modified, Cherry removed, Date added
    changes = image_state.compare(old.parts, old.grouped, new)
    assert (changes.added, changes.modified, changes.removed) == (["Date"], ["Apple"], ["Cherry"])
    assert image_state.describe(changes, ["Apple", "Banana", "Date"]) == (
        "3 label(s) changed: added Date; modified Apple; removed Cherry"
    )
    assert image_state.compare(None, False, new) is None  # a cursor of the earlier version


def many_labels(count: int, modified: str | None = None) -> pa.Table:
    rows = [(f"s3://b/i/L{i:05d}/x.jpg", f"L{i:05d}", 1 + (f"L{i:05d}" == modified), 7) for i in range(count)]
    return catalog(rows)


def test_above_1000_labels_the_parts_are_a_bounded_number_of_groups():
    old = image_state.state_digest(many_labels(5000))
    assert old.grouped and len(old.parts) <= image_state.LABEL_GROUPS
    new = image_state.state_digest(many_labels(5000, modified="L01234"))
    changes = image_state.compare(old.parts, old.grouped, new)
    assert changes.modified == [image_state.label_group("L01234")] and changes.count == 1
    text = image_state.describe(changes, [f"L{i:05d}" for i in range(5000)])
    assert "1 of 1024 label groups changed" in text and "L01234" in text

    cursor = ImagesCursor(digest=new.digest, images=5000, listed_at="t", generation=3,
                          parts=new.parts, grouped=new.grouped)
    text = cursor.to_json()
    assert len(text) < 40_000 and "label_groups" in json.loads(text)
    assert ImagesCursor.from_json(text) == cursor
    # Crossing the limit changes the kind of parts: not comparable, and the whole digest says "changed".
    named = image_state.state_digest(many_labels(1000))
    assert not named.grouped and image_state.compare(named.parts, named.grouped, old) is None


def test_cursor_round_trip_and_the_earlier_format():
    state = image_state.state_digest(catalog(BASE))
    cursor = ImagesCursor(digest=state.digest, images=4, listed_at="t", generation=1, parts=state.parts)
    data = json.loads(cursor.to_json())
    assert data["labels"] == state.parts and "label_groups" not in data
    assert ImagesCursor.from_json(cursor.to_json()) == cursor
    earlier = '{"digest": "abc", "images": 2, "listed_at": "t", "generation": 4, "waiting_since": null}'
    assert ImagesCursor.from_json(earlier) == ImagesCursor(digest="abc", images=2, listed_at="t", generation=4)
    with pytest.raises(ValueError, match="not a fruit_images_sensor cursor"):
        ImagesCursor.from_json('{"digest": "abc", "images": 2, "listed_at": "t", "labels": [1]}')

