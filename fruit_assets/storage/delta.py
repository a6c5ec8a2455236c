"""Delta tables on local folders and S3: how every asset is stored.

A Delta table is a folder of Parquet data files plus a transaction log (`_delta_log/`, one JSON file
per version). A file that the log does not list is not part of the table, so writing is two steps:
the data files are written first (by Spark tasks in parallel, or by this process), and one commit
then adds them, and removes the files they replace, atomically. A failed or killed writer commits
nothing: readers keep seeing the last version, and the files it left are removed by `vacuum` once
they are older than the retention period. Every commit is a version that can be read again
(`DeltaTable(uri, version=N)`, polars `read_delta(uri, version=N)`) until vacuum removes its files.

Commits are never retried on top of a newer version: each is made against the version its writer
read (`Snapshot`), with delta-rs' commit retries off. On S3 the log entry is written with a conditional
put (`If-None-Match`), so when two writers commit at once exactly one wins; the other gets a
`TableConflictError` and nothing of it becomes visible. Never a mix, never a lost commit.

S3 faults (see `storage.transient`). Every request is retried by its client when the fault is
transient, except the conditional put of the log entry after a reset or a lost answer: it may have
been applied. So a commit whose request fails is resolved by reading the log at the version it was
to create, where each commit leaves its own transaction id: its id there, the commit was made; another
writer's commit there, a real conflict; nothing there, the commit is tried again. A conflict is
reported only when another writer's commit was seen, and data files are deleted after a failed commit
only then: a commit that looked failed to its writer may still be in the log. Not by delta-rs' error
type either: its `CommitFailedError` says only that the version exists, which is also how this writer's
own commit looks once its answer was lost and the request made again, and a table that another writer
created first fails as a plain `DeltaError`. Only the log's transaction id tells the two apart.

delta-rs (the `deltalake` package, no JVM) writes the log. It has its own S3 client: it gets the
endpoint and region here, and finds the credentials in the environment itself, as pyarrow and boto3
do; none is passed through this code or written to the log.

No Dagster, no Spark.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from itertools import pairwise
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fruit_assets.storage import Location, s3_endpoint, s3_region
from fruit_assets.storage.transient import (
    TransientStorageError,
    delta_retry_options,
    gave_up,
    is_transient,
    last_status,
    s3_max_attempts,
)

LOG_DIR = "_delta_log"
COMMIT_KEY = "fruit_assets"  # our entry in a commit's commitInfo: what else the version consists of
DEFAULT_RETENTION_HOURS = 168  # 7 days, Delta's own default for removed files


TRANSACTION_KEY = "fruit_assets_transaction"  # a commit's own id in its commitInfo (see `commit`)
COMMIT_ATTEMPTS = 3  # commit requests when transient faults make one fail; each request is retried by S3 too
COMMIT_BACKOFF_SECONDS = 0.5


class TableConflictError(RuntimeError):
    """Another writer's commit was seen at the version this writer was to create: nothing of this
    writer was committed."""


@dataclass(frozen=True)
class DataFile:
    """A Parquet data file written into a table's folder, not yet (or already) committed."""

    path: str  # relative to the table folder
    size: int
    rows: int


@dataclass(frozen=True)
class Snapshot:
    """One version of a table: what a writer read and commits against, and what a reader reads."""

    location: Location
    version: int
    files: tuple[DataFile, ...]
    schema: pa.Schema
    table_id: str
    commit: dict = field(default_factory=dict)  # our COMMIT_KEY entry of this version's commit

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def dataset(self, files: list[str] | None = None):
        """A pyarrow dataset of this version's data files (or of `files`, some of them): for reading
        a version, or part of it, in this process as Arrow batches."""
        import pyarrow.dataset as pads

        paths = [self.file_location(f).path for f in (files if files is not None else [f.path for f in self.files])]
        return pads.dataset(paths, filesystem=self.location.filesystem, format="parquet")

    def file_location(self, relative: str) -> Location:
        return Location(
            uri=posixpath.join(self.location.uri, relative),
            filesystem=self.location.filesystem,
            path=posixpath.join(self.location.path, relative),
        )


def table_uri(location: Location) -> str:
    return location.path if location.is_local else f"s3://{location.path}"


def storage_options(location: Location) -> dict[str, str]:
    """delta-rs settings for the location: endpoint, region and retries of transient faults (no
    credentials: delta-rs reads them from the environment, like pyarrow and boto3)."""
    if location.is_local:
        return {}
    options = {"AWS_REGION": s3_region(), "conditional_put": "etag"} | delta_retry_options()
    endpoint = s3_endpoint()
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        options["AWS_ALLOW_HTTP"] = "true" if urlparse(endpoint).scheme == "http" else "false"
    return options


@contextlib.contextmanager
def _s3_operation(operation: str, location: Location):
    """Turn a transient S3 fault that outlived the client's retries into an error that says so."""
    try:
        yield
    except OSError as error:
        if location.is_local or isinstance(error, TransientStorageError) or not is_transient(error):
            raise
        raise gave_up(operation, location.uri, s3_endpoint(), error, f"{s3_max_attempts()} attempts per request") from error


def _delta_table(location: Location, version: int | None = None):
    from deltalake import DeltaTable

    return DeltaTable(table_uri(location), version=version, storage_options=storage_options(location))


def is_table(location: Location) -> bool:
    # Through pyarrow's S3 client, whose retries and timeouts storage/transient.py sets for faults. Not
    # `DeltaTable.is_deltatable`: its listing goes through delta-rs' own client, which waited 60 s on a
    # request whose answer the fault proxy dropped: 7 tests of test_s3_faults, test_storage and
    # test_s3_pipeline failed with it (tried 2026-12-06).
    info = location.filesystem.get_file_info(posixpath.join(location.path, LOG_DIR))
    return info.type == pafs.FileType.Directory or (not location.is_local and bool(_log_entries(location, limit=1)))


def _log_entries(location: Location, limit: int | None = None) -> list[str]:
    selector = pafs.FileSelector(posixpath.join(location.path, LOG_DIR), allow_not_found=True)
    entries = [info.path for info in location.filesystem.get_file_info(selector) if info.type == pafs.FileType.File]
    return entries[:limit] if limit else entries


def snapshot(location: Location, version: int | None = None) -> Snapshot | None:
    """The table at `version` (default: the latest), or None if there is no table there yet."""
    with _s3_operation("Reading the Delta log", location):
        return _snapshot(location, version)


def _snapshot(location: Location, version: int | None) -> Snapshot | None:
    if not is_table(location):
        return None
    table = _delta_table(location, version)
    actions = pa.table(table.get_add_actions(flatten=True))
    files = tuple(
        DataFile(path, int(size), int(rows) if rows is not None else -1)
        for path, size, rows in zip(
            actions.column("path").to_pylist(),
            actions.column("size_bytes").to_pylist(),
            actions.column("num_records").to_pylist(),
            strict=True,
        )
    )
    return Snapshot(
        location=location,
        version=table.version(),
        files=tuple(sorted(files, key=lambda f: f.path)),
        schema=pa.schema(table.schema().to_arrow()),
        table_id=str(table.metadata().id),
        commit=commit_info(location, table.version()),
    )


def commit_info(location: Location, version: int) -> dict:
    """Our entry in the commit of `version` ({} if the commit holds none, or its log file was cleaned)."""
    info = log_commit_info(location, version) or {}
    return json.loads(info[COMMIT_KEY]) if COMMIT_KEY in info else {}


def log_commit_info(location: Location, version: int) -> dict | None:
    """The commitInfo of `version` ({} if it has none), or None if the log has no such version (never
    made, or its log file cleaned). Read from the version's own log file, `_delta_log/<version>.json`,
    one JSON action per line: the one request that says whether a commit whose answer was lost was made.

    Not `DeltaTable.history()`: in deltalake 1.6.6, the history of a table loaded at an earlier version
    ignores `limit` and gives the latest commits' infos under that version's numbers (version 0 of a
    4-version table reads as the commitInfo of version 3; test_storage shows it). The latest version's
    history is right, but a lost answer must be checked at the very version the commit was to create."""
    path = posixpath.join(location.path, LOG_DIR, f"{version:020d}.json")
    try:
        with location.filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode("utf-8").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        action = json.loads(line) if line.strip() else {}
        if "commitInfo" in action:
            return action["commitInfo"]
    return {}


def same_schema(a: pa.Schema, b: pa.Schema) -> bool:
    """Whether rows of schema `a` can be added to a table of schema `b`: the same names and types,
    whatever the nullability (Spark marks fields and list items non-null, pandas does not) and the
    names of list items."""
    from deltalake import Schema as DeltaSchema

    def canonical(schema: pa.Schema) -> str:
        fields = [pa.field(f.name, _nullable_type(f.type)) for f in schema]
        return DeltaSchema.from_arrow(pa.schema(fields)).to_json()

    return canonical(a) == canonical(b)


def _nullable_type(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(pa.field("element", _nullable_type(kind.value_type)))
    if pa.types.is_struct(kind):
        return pa.struct([pa.field(f.name, _nullable_type(f.type)) for f in kind])
    return kind


def new_file_name(prefix: str = "part") -> str:
    """The name of a data file this release writes. It ends in 32 hex digits, which the files of the
    release before Delta never did (`part-00000-<12 hex>.parquet`): see `legacy_parquet_files`."""
    return f"{prefix}-{uuid.uuid4().hex}.parquet"


NEW_FILE_NAME = re.compile(r"-[0-9a-f]{32}\.parquet$")


def write_arrow_file(location: Location, table: pa.Table, name: str | None = None) -> DataFile:
    """Write one Parquet data file into the table folder (not committed)."""
    name = name or new_file_name()
    if location.is_local:  # S3 has no folders to create
        location.filesystem.create_dir(location.path, recursive=True)
    path = posixpath.join(location.path, name)
    out = pa.BufferOutputStream()
    # Spark's timestamps are microseconds, and so are Delta's.
    pq.write_table(table, out, coerce_timestamps="us", allow_truncated_timestamps=True)
    data = out.getvalue()
    with _s3_operation(f"Writing data file {name}", location):
        _upload(location, path, data)
    return DataFile(name, data.size, table.num_rows)


def _upload(location: Location, path: str, data: pa.Buffer) -> None:
    """Store `data` at `path`, a name no other write uses. The S3 client retries each request; a
    large file is a multipart upload, and when the answer to its last request (complete the upload)
    is lost, a store may refuse the client's retry (the upload is gone: it was completed). The file
    is then there, whole: its size says so. Otherwise, after a transient fault, the whole upload is
    made again, which is safe: same name, same bytes."""
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            with location.filesystem.open_output_stream(path) as stream:
                stream.write(data)
            return
        except OSError as error:
            with contextlib.suppress(OSError):
                if location.filesystem.get_file_info(path).size == data.size:
                    return
            if location.is_local or not is_transient(error) or attempt == COMMIT_ATTEMPTS:
                raise
            time.sleep(random.uniform(0, COMMIT_BACKOFF_SECONDS * 2**attempt))


def _add_action(file: DataFile):
    from deltalake.transaction import AddAction

    stats = json.dumps({"numRecords": file.rows})
    return AddAction(file.path, file.size, {}, int(time.time() * 1000), True, stats)


def _commit_properties(metadata: dict | None, transaction: str):
    from deltalake import CommitProperties

    custom = {TRANSACTION_KEY: transaction}
    if metadata:
        custom[COMMIT_KEY] = json.dumps(metadata, sort_keys=True)
    # No retries on top of a newer version: a commit is only valid on top of the version its writer
    # read. (A commit whose answer was lost is resolved in `commit`, not by delta-rs.)
    return CommitProperties(custom_metadata=custom, max_commit_retries=0)


@dataclass
class CommitAttempts:
    """How a commit went, for the run's metadata: given to `commit` as `report`, which fills it in (the
    S3 clients do not report their own retries of single requests; these are the commit's, which this
    module makes and sees)."""

    attempts: int = 0  # commit requests made: 1 unless a transient fault made it try again; 0: no commit
    resolved_from_log: int = 0  # errors after which the log showed this commit had been made all the same


class Mode(Enum):
    """What a commit does to the version it is made on (with no table yet, it creates one either way)."""

    APPEND = "append"  # add the new files, and remove the `removed` ones
    OVERWRITE = "overwrite"  # add the new files; every file of the base goes, and the schema may change


def commit(
    location: Location,
    added: list[DataFile],
    schema: pa.Schema,
    base: Snapshot | None,
    *,
    mode: Mode = Mode.APPEND,
    removed: list[str] | None = None,
    metadata: dict | None = None,
    report: CommitAttempts | None = None,
) -> int:
    """Commit `added` (and remove `removed`, or with `Mode.OVERWRITE` everything `base` holds) in one
    transaction on top of `base`, the version the writer read (None: create the table). Returns the
    new version. `report`, if given, is told how many requests the commit took.

    The commit carries a transaction id of its own. When the commit request fails, the log at the
    version it was to create says what happened: this id there, the commit was made (its answer was
    lost); another writer's commit there, a conflict (`TableConflictError`); nothing there, it was
    not made, and is tried again if the fault was transient (`TransientStorageError` when it stays)."""
    if mode is Mode.OVERWRITE and removed:
        raise ValueError("an overwrite removes every file of its base: `removed` would say nothing")
    version = 0 if base is None else base.version + 1
    transaction = uuid.uuid4().hex
    properties = _commit_properties(metadata, transaction)

    def request() -> None:
        _request_commit(location, added, schema, base, mode, removed or [], properties)

    report = report if report is not None else CommitAttempts()
    return _commit_resolved(request, location, base, version, transaction, report)


def _commit_resolved(
    request: Callable[[], None], location: Location, base: Snapshot | None, version: int, transaction: str,
    report: CommitAttempts,
) -> int:
    """Make the commit `request` of `version`, resolving failed requests from the log (see `commit`)."""
    from deltalake.exceptions import DeltaError

    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        report.attempts = attempt
        try:
            request()
            return version
        except (DeltaError, OSError) as error:  # delta-rs' errors, and its storage's
            if _made_by(location, version, transaction, base, error):
                report.resolved_from_log += 1
                return version
            if location.is_local or not is_transient(error):
                raise
            if attempt == COMMIT_ATTEMPTS:
                raise _commit_gave_up(location, version, error) from error
            time.sleep(random.uniform(0, COMMIT_BACKOFF_SECONDS * 2**attempt))  # full jitter
    raise AssertionError("unreachable")


def _commit_gave_up(location: Location, version: int, error: BaseException) -> TransientStorageError:
    return gave_up(
        f"Commit of version {version}", location.uri, s3_endpoint(), error, f"{COMMIT_ATTEMPTS} commit attempts",
        after=f"The log showed no version {version} afterwards: the table is as it was, and the "
        "files written for this commit are left for vacuum. ",
    )


def _request_commit(location: Location, added: list[DataFile], schema: pa.Schema, base: Snapshot | None,
                    mode: Mode, removed: list[str], properties) -> None:
    """One commit request through delta-rs: create the table, overwrite, or append and remove."""
    from deltalake.transaction import AddAction, RemoveAction

    adds: list[AddAction | RemoveAction] = [_add_action(f) for f in added]
    if base is None:
        _create_table(location, schema, adds, properties)
    elif mode is Mode.OVERWRITE:
        # "overwrite" removes every file of `base` itself, and takes the new schema.
        _delta_table(location, base.version).create_write_transaction(
            adds, mode="overwrite", schema=schema, commit_properties=properties
        )
    else:
        now = int(time.time() * 1000)
        removes = [RemoveAction(path, True, now) for path in removed]
        _delta_table(location, base.version).create_write_transaction(
            adds + removes, mode="append", schema=schema, commit_properties=properties
        )


def _create_table(location: Location, schema: pa.Schema, adds: list, properties) -> None:
    """Version 0, unless another writer made it first."""
    from deltalake import Schema as DeltaSchema
    from deltalake.transaction import create_table_with_add_actions

    create_table_with_add_actions(
        table_uri(location), DeltaSchema.from_arrow(schema), adds, mode="error",
        storage_options=storage_options(location), commit_properties=properties,
    )


def _made_by(location: Location, version: int, transaction: str, base: Snapshot | None, error: Exception) -> bool:
    """After a failed commit request: True if the log's `version` is this transaction's commit (made,
    its answer lost). Raises TableConflictError if it is another writer's; False if there is none."""
    try:
        found = log_commit_info(location, version)
    except OSError as unreadable:
        raise gave_up(
            f"Commit of version {version}", location.uri, s3_endpoint(), unreadable, "the S3 client's retries",
            after=f"The commit request failed ({last_status(error)}) and the log could not be read to learn whether "
            f"version {version} was made: run again (a made commit is kept; files of an unmade one go with vacuum). ",
        ) from error
    if found is None:
        return False
    if found.get(TRANSACTION_KEY) == transaction:
        return True
    raise _conflict(location, base, version, found) from error


def _conflict(location: Location, base: Snapshot | None, version: int, other: dict) -> TableConflictError:
    read = "found no table" if base is None else f"read version {base.version}"
    ours = json.loads(other.get(COMMIT_KEY, "{}"))
    who = f"run {ours['run_id']}" if ours.get("run_id") else "another writer"
    return TableConflictError(
        f"{location.uri}: another run committed to this Delta table after this run {read}: version {version} is "
        f"{who}'s commit, so this run committed nothing (the table holds the other run's version). Run again to "
        "build on it."
    )


def discard(location: Location, files: list[DataFile]) -> None:
    """Delete data files that will not be committed (best effort: vacuum removes what is left)."""
    for file in files:
        with contextlib.suppress(OSError):
            location.filesystem.delete_file(posixpath.join(location.path, file.path))


# A parallel write's token (`open_write`): its tasks write data files only while it exists. When the job fails,
# Spark reports the failure while other tasks' Python workers may still be writing a file (they hold their
# partition's rows already); the driver then removes the token before deleting the write's files, and a
# task that finds it gone after writing removes its own files. Without it, such a file was left behind
# 1-10 ms after the driver's clean-up had listed the folder (2-core AMD EPYC: 3 of 12 failed 2M-row writes).
WRITE_TOKEN_SUFFIX = ".open"


def open_write(location: Location, prefix: str) -> None:
    """Create the token of the write whose files start with `prefix`, before its tasks start."""
    if location.is_local:
        location.filesystem.create_dir(location.path, recursive=True)
    with _s3_operation(f"Starting the write {prefix}", location):
        _upload(location, posixpath.join(location.path, prefix + WRITE_TOKEN_SUFFIX), pa.py_buffer(b""))


def write_is_open(location: Location, prefix: str) -> bool:
    """Whether the write's token is still there (a task asks before and after each file it writes)."""
    with _s3_operation(f"Checking the write {prefix}", location):
        info = location.filesystem.get_file_info(posixpath.join(location.path, prefix + WRITE_TOKEN_SUFFIX))
    return info.type == pafs.FileType.File


def close_write(location: Location, prefix: str) -> None:
    """Remove the write's token: once the job has ended, or first thing when it failed."""
    with contextlib.suppress(FileNotFoundError), _s3_operation(f"Ending the write {prefix}", location):
        location.filesystem.delete_file(posixpath.join(location.path, prefix + WRITE_TOKEN_SUFFIX))


def discard_prefix(location: Location, prefix: str) -> None:
    """Delete the data files whose names start with `prefix` (a failed write's files; best effort). Each
    file on its own: one already gone (a task removes its own, see `open_write`) must not keep the rest."""
    try:
        infos = location.filesystem.get_file_info(pafs.FileSelector(location.path, allow_not_found=True))
    except OSError:
        return
    for info in infos:
        if info.type == pafs.FileType.File and info.base_name.startswith(prefix):
            with contextlib.suppress(OSError):
                location.filesystem.delete_file(info.path)


def read_arrow(location: Location, version: int | None = None, columns: list[str] | None = None) -> pa.Table:
    """The rows of a version of the table (default: the latest).

    Read through our own (C++) pyarrow filesystem, rooted at the table as deltalake documents, never
    deltalake's default: that is a `PyFileSystem` over Python code, and the scan's pre-buffered reads
    can drop their last reference to it on an Arrow I/O thread after the interpreter began to exit,
    where taking the GIL ends the thread inside a C++ destructor: "terminate called without an active
    exception", and the process aborts after its work is done (the demo, 1 run in 8 on a 2-core Xeon;
    its core dump showed `arrow::py::fs::PyFileSystem` disposed in `OwnedRefNoGIL::~OwnedRefNoGIL`)."""
    with _s3_operation("Reading the table", location):
        filesystem = pafs.SubTreeFileSystem(location.path, location.filesystem)
        return _delta_table(location, version).to_pyarrow_table(columns=columns, filesystem=filesystem)


def vacuum(location: Location, retention_hours: int) -> list[str]:
    """Delete data files removed from the table more than `retention_hours` ago, and files no commit
    ever added (left by failed writers) once they are that old. Versions younger than the retention
    stay readable. Returns the deleted paths."""
    with _s3_operation("Vacuum", location):
        table = _delta_table(location)
        # full: also files that no commit references (a killed writer's), not only removed ones.
        return table.vacuum(retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False, full=True)


def commit_or_discard(
    location: Location,
    files: list[DataFile],
    schema: pa.Schema,
    base: Snapshot | None,
    metadata: dict,
    *,
    mode: Mode = Mode.APPEND,
    removed: list[str] | None = None,
    report: CommitAttempts | None = None,
) -> int:
    """`commit`, deleting the written files if another writer's commit took the version.

    Only then: after any other failure the files are kept, because a commit that failed for its
    writer may still be in the log (an answer lost, a request still on its way, an interruption), and
    deleting the files it names would break that version. Files of a commit never made are removed
    by `vacuum` once older than the retention period."""
    try:
        return commit(location, files, schema, base, mode=mode, removed=removed, metadata=metadata, report=report)
    except TableConflictError:
        discard(location, files)
        raise


def nullable(schema: pa.Schema) -> pa.Schema:
    """The schema with every field nullable and no metadata, as Delta tables declare them (Parquet
    written from Spark marks fields non-null)."""
    return pa.schema([f.with_nullable(True) for f in schema], metadata=None)


def commit_arrow(
    location: Location, table: pa.Table, base: Snapshot | None, metadata: dict, *, report: CommitAttempts | None = None
) -> int:
    """Replace the table's rows by `table` (written by this process as one file), in one commit."""
    file = write_arrow_file(location, table)
    schema = pq.read_schema(posixpath.join(location.path, file.path), filesystem=location.filesystem)
    return commit_or_discard(location, [file], nullable(schema), base, metadata, mode=Mode.OVERWRITE, report=report)


# -- folders written by the release before Delta ---------------------------------------------------


def legacy_parquet_files(location: Location) -> list[pafs.FileInfo]:
    """The data files of a folder written by the release before Delta: top-level *.parquet files.

    Files named by this release are not among them: in a folder with no Delta log yet they are the
    uncommitted files of a writer creating the table (or of one that was killed). Converting them
    took a concurrent first writer's files into a version 0 that writer then failed to create and
    deleted its files from (measured: two graph runs at once on S3, the second run's snapshot)."""
    infos = location.filesystem.get_file_info(pafs.FileSelector(location.path, allow_not_found=True))
    found = [i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")]
    legacy = (i for i in found if not i.base_name.startswith(("_", ".")) and not NEW_FILE_NAME.search(i.base_name))
    return sorted(legacy, key=lambda i: i.path)


def convert_legacy_folder(location: Location) -> int:
    """Commit a legacy folder's Parquet files, in place, as version 0 of a Delta table (what
    `deltalake.convert_to_deltalake` does; it cannot skip pca_model's `_spark_model/` folder)."""
    files, schema = [], None
    for info in legacy_parquet_files(location):
        footer = pq.read_metadata(info.path, filesystem=location.filesystem)
        schema = schema or footer.schema.to_arrow_schema()
        files.append(DataFile(info.base_name, info.size, footer.num_rows))
    return commit(location, files, nullable(schema), None, metadata={"converted_from": "parquet folder"})


def open_snapshot(location: Location, version: int | None = None) -> Snapshot | None:
    """`snapshot`, after converting a folder from the release before Delta in place on first use."""
    found = snapshot(location, version)
    if found is None and version is None and legacy_parquet_files(location):
        convert_legacy_folder(location)
        found = snapshot(location)
    return found


# -- side folders: files that belong to a version without being table rows ------------------------


def new_side_folder_name() -> str:
    """A name for a folder of files that a commit will name (see `Snapshot.commit`). Sortable by
    creation time, so that `expire_side_folders` can tell which ones were superseded when."""
    return f"{int(time.time() * 1000):015d}-{uuid.uuid4().hex[:8]}"


def expire_side_folders(parent: Location, retention_hours: int) -> None:
    """Delete the side folders superseded more than `retention_hours` ago: a folder's version stays
    readable until the version after it is that old (which is when vacuum removes its data too)."""
    infos = parent.filesystem.get_file_info(pafs.FileSelector(parent.path, allow_not_found=True))
    folders = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    cutoff_ms = (time.time() - retention_hours * 3600) * 1000
    for older, newer in pairwise(folders):
        if int(newer.split("-")[0]) < cutoff_ms:
            parent.filesystem.delete_dir(parent.child(older).path)
