"""The catalog of image files under a root in the Fruits-360 layout: `<root>/<Label>/<file>`.

Listing is metadata only (no image is read), so it runs on the driver through pyarrow, for a local
folder or an S3 prefix alike. The `raw_images` asset and `fruit_images_sensor` both list with
`list_images`. No Dagster, no Spark.

How it scales. S3 returns at most 1,000 keys per LIST request, and each request is a round trip
(tens of milliseconds against AWS): a million images listed as one sequence of pages is 1,000 round
trips, one after the other. So the listing goes in two steps:
1. the top level of the root, with S3's `/` delimiter: the label folders, and the stray files beside
   them (one request per 1,000 entries);
2. every label folder on its own, recursively, `concurrency` folders at a time in a thread pool; each
   of those listings pages through all of its keys.
pyarrow's S3 client does the requests and parses the XML in C++ without holding the GIL, which is why
it is used rather than boto3: on 60,000 objects with the same thread pool, boto3 took four times as long
(botocore parses responses in Python). pyarrow makes the requests on its own IO thread pool, which is
enlarged to `concurrency` threads: its default 8 would cap the requests in flight at 8. The rows go
straight into Arrow arrays, and the rules below are applied to a folder's whole columns by Arrow compute
functions, in the listing thread (Arrow releases the GIL), not row by row.

The cost is one LIST request per label folder plus one per further 1,000 keys in it. Up to
`max_folder_listings` folders (default 1,000) that is at most that many requests more than a flat
listing. With more folders, one request per folder could multiply the requests (and the bill) when
the folders are small: 100,000 folders of 10 images would take 100,000 requests where a flat listing
takes 1,000. So a sample of `concurrency` folders, spread over the sorted list, is listed first; if
they hold at least MIN_MEAN_FOLDER_KEYS (500) keys on average, listing folder by folder costs at most
about twice the requests of a flat listing and goes on (the sample is part of it); otherwise the root
is listed as one flat, sequential listing, `ceil(objects / 1000)` requests (the sample's requests
are then wasted: one round of `concurrency` requests). A single folder is always listed
sequentially, so the time of a listing is at least `pages of the largest folder x round trip`, and a
flat listing is `ceil(objects / 1000)` round trips.

Rules (the same as before any of this): files ending in .jpg, .jpeg or .png in any case are images;
the label is the name of the folder holding the file; files and folders whose name starts with `.`
are skipped; other files, and files directly under the root, are ignored and counted. Keys are taken
literally: `#`, `?`, `%`, `+` and spaces are ordinary characters. Failures of the storage (the AWS SDK
inside pyarrow retries transient ones with backoff, see `storage.py`) raise `ImageListingError`, which
names the setting the root came from.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from fruit_assets import storage
from fruit_assets.ml.images import IMAGE_EXTENSIONS
from fruit_assets.storage import Location

CATALOG_COLUMNS = ["path", "label", "size_bytes", "modified_at"]
CATALOG_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("label", pa.string()),
        ("size_bytes", pa.int64()),
        ("modified_at", pa.timestamp("ns", tz="UTC")),
    ]
)
# What one listing request returns, before the rules are applied. `fs_path` is the filesystem's path
# (bucket/key on S3, an absolute path locally).
_RAW_SCHEMA = pa.schema([("fs_path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64())])

# Folders listed at the same time. Listing is bound by round trips, not by this machine: 32 requests
# in flight keep a million images in 150 folders to 36 rounds of requests. pyarrow's S3 client has as
# many connections as its IO thread pool had threads when it was made (storage.S3_IO_THREADS).
DEFAULT_CONCURRENCY = storage.S3_IO_THREADS
# Above this many label folders, a sample decides between folder by folder and flat (module docstring).
DEFAULT_MAX_FOLDER_LISTINGS = 1000
MIN_MEAN_FOLDER_KEYS = 500
IGNORED_EXAMPLES = 10  # ignored files named in the listing (all of them are counted)

_IMAGE_PATTERN = "(" + "|".join(re.escape(extension) for extension in IMAGE_EXTENSIONS) + ")$"
_HIDDEN_PATTERN = r"(^|/)\."  # a path component starting with "."
_LABEL_PATTERN = r"(?P<label>[^/]*)/[^/]*$"  # the component before the file name


class ImageListingError(RuntimeError):
    """The images under a root could not be listed; the message names the setting of the root."""


@dataclass(frozen=True)
class ImageListing:
    """What one listing found under `uri`."""

    uri: str
    images: pa.Table  # CATALOG_SCHEMA, one row per image, sorted by path
    ignored: int  # files that are not images in a label folder (hidden files not counted)
    ignored_examples: tuple[str, ...]  # the first IGNORED_EXAMPLES of them, by path
    folders: int  # label folders at the top level of the root (hidden ones not counted)
    flat: bool  # listed as one flat listing rather than folder by folder

    def catalog(self) -> pd.DataFrame:
        """The images as a pandas DataFrame (CATALOG_COLUMNS; modified_at is datetime64[ns, UTC])."""
        return self.images.to_pandas()

    @property
    def labels(self) -> int:
        return pc.count_distinct(self.images["label"]).as_py()


def list_images(
    root: Location,
    concurrency: int = DEFAULT_CONCURRENCY,
    max_folder_listings: int = DEFAULT_MAX_FOLDER_LISTINGS,
    setting: str = "FRUIT_IMAGES_URI",
) -> ImageListing:
    """Every image below `root` (a missing root lists as empty). Raises ImageListingError."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    # Each of our threads waits on a request that pyarrow runs on its IO pool: the pool must be as big.
    storage.ensure_io_threads(concurrency)
    try:
        parts, folders, flat = _list_parts(root, concurrency, max_folder_listings)
    except (OSError, pa.ArrowException) as error:  # network, credentials, throttling after the retries
        raise ImageListingError(
            f"could not list the images under {setting}={root.uri}: {type(error).__name__}: {error}"
        ) from error
    images = pa.concat_tables([part.images for part in parts]).sort_by("path").combine_chunks()
    ignored = pa.chunked_array([part.ignored for part in parts], pa.string())
    examples = ignored.sort().slice(0, IGNORED_EXAMPLES).to_pylist()
    return ImageListing(
        uri=root.uri, images=images, ignored=len(ignored), ignored_examples=tuple(examples),
        folders=folders, flat=flat,
    )


@dataclass(frozen=True)
class _Part:
    """What one listing request sequence found, the rules applied: images, and ignored files' URIs."""

    images: pa.Table
    ignored: pa.Array

    @property
    def files(self) -> int:
        return self.images.num_rows + len(self.ignored)


def _list_parts(root: Location, concurrency: int, max_folder_listings: int) -> tuple[list[_Part], int, bool]:
    """(what the listings found, label folders at the top level of the root, whether it was listed flat)."""
    folders, top_files = _top_level(root)
    done: list[_Part] = []
    if len(folders) > max_folder_listings:
        sample = folders[:: max(1, len(folders) // concurrency)][:concurrency]
        done = _list_folders(root, sample, concurrency)
        if sum(part.files for part in done) < MIN_MEAN_FOLDER_KEYS * len(sample):
            return [_list_part(root, root.path)], len(folders), True
        folders = sorted(set(folders) - set(sample))
    rest = _list_folders(root, folders, concurrency)
    return [_apply_rules(root, top_files), *done, *rest], len(folders) + len(done), False


def _top_level(root: Location) -> tuple[list[str], pa.Table]:
    """The label folders directly under the root (hidden ones skipped: never listed), and the files
    beside them (ignored by the rules, but counted)."""
    selector = pafs.FileSelector(root.path, recursive=False, allow_not_found=True)
    infos = root.filesystem.get_file_info(selector)
    folders = [
        info.path for info in infos if info.type == pafs.FileType.Directory and not info.base_name.startswith(".")
    ]
    return sorted(folders), _raw_table([info for info in infos if info.is_file])


def _list_part(root: Location, path: str) -> _Part:
    """Every file below `path`, all pages of it, the rules applied (here, in the listing thread: Arrow
    compute releases the GIL, and only one folder's intermediate columns exist at a time per thread).
    A folder deleted since it was seen lists as empty."""
    infos = root.filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return _apply_rules(root, _raw_table([info for info in infos if info.is_file]))


def _raw_table(files: list[pafs.FileInfo]) -> pa.Table:
    return pa.table(
        [
            pa.array([info.path for info in files], pa.string()),
            pa.array([info.size for info in files], pa.int64()),
            pa.array([info.mtime_ns for info in files], pa.int64()),
        ],
        schema=_RAW_SCHEMA,
    )


def _list_folders(root: Location, folders: list[str], concurrency: int) -> list[_Part]:
    """`_list_part` of every folder, `concurrency` at a time; the first failure stops the others."""
    if not folders:
        return []
    with ThreadPoolExecutor(min(concurrency, len(folders)), thread_name_prefix="list-images") as pool:
        futures = [pool.submit(_list_part, root, folder) for folder in folders]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _apply_rules(root: Location, raw: pa.Table) -> _Part:
    """The images (CATALOG_SCHEMA) and the URIs of the ignored files among `raw`, column by column."""
    base = root.path.rstrip("/") + "/"
    relative = pc.utf8_slice_codeunits(raw["fs_path"], len(base))  # every listed path starts with base
    hidden = pc.match_substring_regex(relative, _HIDDEN_PATTERN)
    in_folder = pc.match_substring(relative, "/")
    image = pc.match_substring_regex(relative, _IMAGE_PATTERN, ignore_case=True)
    keep = pc.and_(pc.invert(hidden), pc.and_(in_folder, image))
    ignore = pc.and_(pc.invert(hidden), pc.invert(pc.and_(in_folder, image)))

    uri_base = root.uri.rstrip("/") + "/"
    kept = relative.filter(keep)
    images = pa.table(
        [
            pc.binary_join_element_wise(uri_base, kept, ""),
            pc.struct_field(pc.extract_regex(kept, _LABEL_PATTERN), [0]),
            raw["size"].filter(keep),
            raw["mtime_ns"].filter(keep).cast(pa.timestamp("ns", tz="UTC")),
        ],
        schema=CATALOG_SCHEMA,
    )
    ignored = pc.binary_join_element_wise(uri_base, relative.filter(ignore), "")
    return _Part(images=images, ignored=ignored.combine_chunks())


def sample_images(catalog: pd.DataFrame, labels: int, per_label: int, readers: int) -> list[tuple[str, bytes]]:
    """(label, file bytes) of the first `per_label` images of the first `labels` labels, read
    `readers` at a time (one after the other, 72 images took 7 s at 50 ms per request)."""
    from concurrent.futures import ThreadPoolExecutor

    from fruit_assets.storage import read_bytes

    first_labels = sorted(catalog.label.unique())[:labels]
    samples = catalog[catalog.label.isin(first_labels)].groupby("label").head(per_label)
    with ThreadPoolExecutor(readers) as pool:
        return list(zip(samples.label, pool.map(read_bytes, samples.path), strict=True))
