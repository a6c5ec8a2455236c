"""Where data lives: URIs and pyarrow filesystems, for local folders and S3 alike.

Everything that touches storage goes through `pyarrow.fs`: Spark on these machines has no S3A
connector, so pyarrow is the one client that serves the driver, the Spark Python workers (through the
data source in `storage.spark_io`) and plain pandas users. The assets themselves are Delta tables
(`storage.delta`); this module knows only where things are and how to reach them.

This module does not import Dagster or Spark.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from fruit_assets.storage.transient import s3_max_attempts

DEFAULT_REGION = "eu-central-1"  # Frankfurt: the product's default, chosen for GDPR
# pyarrow makes every S3 request on its IO thread pool (8 threads by default), and sizes the S3
# client's connection pool from that pool when the filesystem is created (at least 25 connections).
# With 8 threads, 32 threads listing folders had 8 requests in flight, never more (measured through
# a counting proxy). So the pool has at least this many threads before any S3 filesystem is made.
S3_IO_THREADS = 32


def ensure_io_threads(count: int) -> None:
    """At least `count` threads in pyarrow's (process-wide) IO thread pool; never lowers it."""
    if pa.io_thread_count() < count:
        pa.set_io_thread_count(count)


class StorageConfigError(ValueError):
    """A storage URI setting is malformed or unsupported."""


@dataclass(frozen=True)
class Location:
    """A folder (or file) on a pyarrow filesystem, with the URI it was made from.

    `uri` is what users see and what is sent to Spark workers (filesystems are not picklable across
    processes reliably; workers rebuild them from the URI with their own credentials)."""

    uri: str
    filesystem: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def child(self, *parts: str) -> Location:
        for part in parts:
            _check_safe_name(part)
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts)
        return Location(uri=uri, filesystem=self.filesystem, path=path)

    @property
    def bucket(self) -> str | None:
        """The S3 bucket, or None for a local location."""
        return None if self.is_local else self.path.split("/", 1)[0]

    @property
    def key(self) -> str:
        """The S3 key (prefix) within the bucket; the path for a local location."""
        return self.path if self.is_local else self.path.partition("/")[2]

    def exists(self) -> bool:
        return self.filesystem.get_file_info(self.path).type != pafs.FileType.NotFound

    def files(self, suffix: str = "") -> list[pafs.FileInfo]:
        """Files directly in or below this folder, skipping `_`/`.` names, sorted by path."""
        if not self.exists():
            return []
        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        found = []
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            relative = posixpath.relpath(info.path, self.path)
            if any(part.startswith(("_", ".")) for part in relative.split("/")):
                continue
            if info.path.endswith(suffix):
                found.append(info)
        return sorted(found, key=lambda info: info.path)

    def uri_of(self, path: str) -> str:
        """The URI of `path` (a path on this location's filesystem, at or below it)."""
        relative = posixpath.relpath(path, self.path)
        return self.uri if relative == "." else posixpath.join(self.uri, relative)


def _check_safe_name(part: str) -> None:
    # Asset names and file names become path components: refuse anything that could climb out of the
    # storage prefix.
    pieces = part.split("/")
    if not part or part.startswith("/") or any(piece in ("", ".", "..") for piece in pieces):
        raise StorageConfigError(f"unsafe path component {part!r}")


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


def resolve(uri: str, setting: str = "storage URI") -> Location:
    """A `Location` for a local path, a `file://` URI or an `s3://bucket/prefix` URI.

    Everything after the bucket is taken literally as the key: no percent-decoding, and `#`, `?`,
    `%`, `+` and spaces are ordinary characters (they occur in real file names), unlike in
    `urllib.parse`. `setting` names the configuration that supplied the URI, for error messages."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageConfigError(f"{setting} is empty: give a local folder or an s3://bucket/prefix URI")
    uri = uri.strip()
    match = _SCHEME.match(uri)
    if match is None:
        path = os.path.abspath(os.path.expanduser(uri))
        return Location(uri=path, filesystem=pafs.LocalFileSystem(), path=path)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        path = os.path.abspath(rest if rest.startswith("/") else "/" + rest)
        return Location(uri=path, filesystem=pafs.LocalFileSystem(), path=path)
    if scheme in ("s3", "s3a"):
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            # s3://key:secret@bucket would put credentials in configs, logs and metadata.
            raise StorageConfigError(
                f"{setting}: credentials or ports do not belong in the URI; give s3://bucket/prefix and set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role"
            )
        if not bucket:
            raise StorageConfigError(f"{setting}={uri!r} has no bucket: use s3://bucket/prefix")
        prefix = prefix.strip("/")
        if ".." in prefix.split("/"):
            raise StorageConfigError(f"{setting}={uri!r} contains '..'")
        path = f"{bucket}/{prefix}" if prefix else bucket
        return Location(uri=f"s3://{path}", filesystem=s3_filesystem(), path=path)
    raise StorageConfigError(
        f"{setting}={uri!r}: unsupported scheme {scheme!r}; use a local folder or s3://bucket/prefix"
    )


@lru_cache(maxsize=16)
def _s3_filesystem(endpoint: str | None, region: str, credentials_key: tuple, attempts: int) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": region,
        # Transient errors (throttling, 5xx, dropped connections, timeouts) are retried with capped
        # exponential backoff and jitter by the AWS SDK; a lasting outage still fails after the last
        # attempt. Every S3 client's retries are described in `storage.transient`.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
        "connect_timeout": 5,
        # A small file is then uploaded in one PUT when it is closed, not as a multipart upload (three
        # requests): fewer round trips, and one whole-object PUT is safe to repeat after a lost answer.
        "allow_delayed_open": True,
    }
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    # Credentials are not passed here: pyarrow's AWS SDK finds them itself (environment, profile,
    # instance role), the same way boto3 does, so they never travel through our code or configs.
    ensure_io_threads(S3_IO_THREADS)  # before: the client's connection pool is sized from it
    return pafs.S3FileSystem(**kwargs)


def s3_endpoint() -> str | None:
    """AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (a non-AWS S3 such as the local SeaweedFS), if set."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION


def s3_filesystem() -> pafs.S3FileSystem:
    """The S3 filesystem configured by the standard AWS settings (region defaults to eu-central-1).

    pyarrow does not read AWS_ENDPOINT_URL itself, so it is passed on explicitly."""
    endpoint, region = s3_endpoint(), s3_region()
    # A new filesystem when the credentials in the environment change (they are only hashed into
    # the cache key, in memory; never logged).
    credentials_key = tuple(
        hash(os.environ.get(name)) for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    )
    return _s3_filesystem(endpoint, region, credentials_key, s3_max_attempts())


def missing_container(location: Location) -> str | None:
    """What is missing for `location` to exist: its S3 bucket, or its local folder; None if present.
    (pyarrow lists a missing bucket or folder as empty; an empty prefix is normal, a missing bucket
    is not.) Raises OSError if the bucket cannot be looked at (network, credentials)."""
    if location.is_local:
        info = location.filesystem.get_file_info(location.path)
        return None if info.type == pafs.FileType.Directory else f"folder {location.path} does not exist"
    if location.filesystem.get_file_info(location.bucket).type == pafs.FileType.NotFound:
        return f"bucket {location.bucket!r} does not exist or is not visible with the current AWS credentials"
    return None


def check_reachable(location: Location, setting: str) -> None:
    """Fail fast, naming the setting, if an S3 location's bucket is missing or refuses us."""
    if location.is_local:
        return
    try:
        missing = missing_container(location)
    except OSError as error:
        raise StorageConfigError(
            f"{setting}={location.uri}: cannot access bucket {location.bucket!r} ({_first_line(error)}). Check the "
            "AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role), "
            "AWS_ENDPOINT_URL and AWS_REGION"
        ) from None
    if missing:
        raise StorageConfigError(f"{setting}={location.uri}: {missing}: create it or fix {setting}")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def read_bytes(uri: str) -> bytes:
    """The whole content of a file given by its URI (local path or s3://)."""
    location = resolve(uri)
    with location.filesystem.open_input_file(location.path) as source:
        return source.read()
