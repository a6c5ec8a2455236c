"""Digests of a catalog's state, whole and per label, for `fruit_images_sensor`. No Dagster.

The state of the images is their (path, size_bytes, modified_at) rows: an added, replaced (an S3
re-upload changes LastModified) or deleted image changes it. `state_digest` hashes the rows of each
label, in path order, with sha256, and the whole state as the sha256 of those per-label digests with
their labels. Equal whole digests mean equal states; the per-label digests say which labels changed.

The per-label digests go into the sensor's cursor, which Dagster stores in its database and copies
into every tick that changes it, so their number is bounded: up to MAX_NAMED_LABELS labels each keep a
digest under its own name (about 20 bytes plus the name: 1,000 labels of 20 characters make a cursor
of 40 KB); with more labels, labels are hashed into LABEL_GROUPS groups and each group keeps one
digest (25 KB whatever the number of labels). A change is then located to a group, and the message names the labels
the group holds now. The short digests in the cursor (48 bits) only locate changes; whether anything
changed is decided by the whole digest (256 bits).

All the hashing goes over Arrow buffers in bulk: a million rows take well under a second.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_NAMED_LABELS = 1000
LABEL_GROUPS = 1024
SHORT_DIGEST_HEX = 12
_FORMAT = b"fruit_assets image state v2\n"  # changes if the hashed byte layout ever changes


@dataclass(frozen=True)
class StateDigest:
    """The digest of a set of images, whole and in parts (labels or groups of labels)."""

    digest: str  # sha256 hex of the whole state
    parts: dict[str, str]  # label, or group number when `grouped`, -> short digest of its rows
    grouped: bool


@dataclass(frozen=True)
class Changes:
    """Which parts differ between two digests: parts are labels, or groups of labels when `grouped`."""

    added: list[str]
    removed: list[str]
    modified: list[str]
    grouped: bool

    @property
    def count(self) -> int:
        return len(self.added) + len(self.removed) + len(self.modified)


def label_group(label: str) -> str:
    """The group of a label when labels are grouped: stable across processes and versions."""
    number = int.from_bytes(hashlib.sha256(label.encode("utf-8")).digest()[:4], "big") % LABEL_GROUPS
    return f"{number:04d}"


def state_digest(images: pa.Table) -> StateDigest:
    """The digest of `images` (a catalog table: path, label, size_bytes, modified_at; any row order)."""
    unique = pc.unique(images["label"]).to_pylist()
    grouped = len(unique) > MAX_NAMED_LABELS
    keys = pa.array([label_group(label) if grouped else label for label in unique], pa.string())
    rows = pa.table(
        {
            "part": pc.take(keys, pc.index_in(images["label"], value_set=pa.array(unique, pa.string()))),
            "path": images["path"].cast(pa.large_string()),
            "size": images["size_bytes"],
            "mtime": images["modified_at"].cast(pa.int64()),
        }
    )
    rows = rows.sort_by([("part", "ascending"), ("path", "ascending")]).combine_chunks()
    columns = _Columns.of(rows)
    whole = hashlib.sha256(_FORMAT)
    parts = {}
    for part, start, end in _runs(rows["part"]):
        digest = columns.digest(start, end)
        parts[part] = digest.hexdigest()[:SHORT_DIGEST_HEX]
        encoded = part.encode("utf-8")
        whole.update(struct.pack("<q", len(encoded)) + encoded + digest.digest())
    return StateDigest(digest=whole.hexdigest(), parts=parts, grouped=grouped)


def _runs(column: pa.ChunkedArray) -> list[tuple[str, int, int]]:
    """(value, start, end) of each run of equal values in a sorted column."""
    if len(column) == 0:
        return []
    encoded = pc.run_end_encode(column.combine_chunks())
    ends = encoded.run_ends.to_pylist()
    starts = [0, *ends[:-1]]
    return list(zip(encoded.values.to_pylist(), starts, ends, strict=True))


@dataclass(frozen=True)
class _Columns:
    """Zero-copy numpy views of a sorted rows table, to hash slices of it."""

    offsets: np.ndarray  # of the paths in `data`, int64
    data: memoryview  # the UTF-8 bytes of all paths, back to back
    sizes: np.ndarray
    mtimes: np.ndarray

    @classmethod
    def of(cls, rows: pa.Table) -> _Columns:
        paths = rows["path"].chunk(0) if rows.num_rows else pa.array([], pa.large_string())
        offsets = np.frombuffer(paths.buffers()[1], dtype="<i8")[paths.offset : paths.offset + len(paths) + 1]
        data = paths.buffers()[2]
        return cls(
            offsets=offsets,
            data=memoryview(data) if data is not None else memoryview(b""),
            sizes=rows["size"].to_numpy().astype("<i8"),
            mtimes=rows["mtime"].to_numpy().astype("<i8"),
        )

    def digest(self, start: int, end: int):
        """sha256 over rows [start, end): their count, the byte length of each path, the path bytes,
        the sizes and the mtimes, each as one block. The lengths make the byte stream unambiguous."""
        digest = hashlib.sha256(struct.pack("<q", end - start))
        digest.update(np.diff(self.offsets[start : end + 1]).tobytes())
        digest.update(self.data[self.offsets[start] : self.offsets[end]])
        digest.update(self.sizes[start:end].tobytes())
        digest.update(self.mtimes[start:end].tobytes())
        return digest


def compare(old_parts: dict[str, str] | None, old_grouped: bool, new: StateDigest) -> Changes | None:
    """What changed since `old_parts`; None when they cannot be compared (none recorded, or recorded
    per label where they are now per group, or the other way round)."""
    if old_parts is None or old_grouped != new.grouped:
        return None
    return Changes(
        added=sorted(new.parts.keys() - old_parts.keys()),
        removed=sorted(old_parts.keys() - new.parts.keys()),
        modified=sorted(key for key in new.parts.keys() & old_parts.keys() if new.parts[key] != old_parts[key]),
        grouped=new.grouped,
    )


def describe(changes: Changes, labels_now: list[str], limit: int = 10) -> str:
    """A short, human summary of `changes` (`labels_now`: the labels listed now, to name what groups
    hold)."""
    if not changes.grouped:
        pieces = [
            f"{what} {_first(names, limit)}"
            for what, names in (("added", changes.added), ("modified", changes.modified), ("removed", changes.removed))
            if names
        ]
        return f"{changes.count} label(s) changed: " + "; ".join(pieces)
    touched = set(changes.added) | set(changes.modified) | set(changes.removed)
    holding = sorted(label for label in labels_now if label_group(label) in touched)
    return (
        f"{changes.count} of {LABEL_GROUPS} label groups changed (labels are grouped above {MAX_NAMED_LABELS}); "
        f"labels now in those groups: {_first(holding, limit) if holding else 'none (labels removed)'}"
    )


def _first(names: list[str], limit: int) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown} (+{len(names) - limit} more)" if len(names) > limit else shown
