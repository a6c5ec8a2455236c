"""S3 faults, injected between the product and a real S3 (SeaweedFS) by `fruit_assets_dev.s3_proxy`:
503 SlowDown, resets before a request reaches the store, answers lost after the store applied the
request, slow answers.

What a user relies on:
- transient faults are retried, and the writes go through;
- a commit whose answer was lost is found in the log and counts as made; one that never reached the
  store is made again; a real conflict still loses cleanly;
- no data file that a version names is ever deleted;
- a fault that outlives the retries says which operation, which endpoint, and the last status.
Ten graph runs under faults are `benchmarks.fault_soak` (minutes: not a test).
"""

import random
import re
import time
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from botocore.exceptions import ClientError
from dagster import AssetKey

from fruit_assets.storage import delta, resolve
from fruit_assets.storage.transient import TransientStorageError
from fruit_assets_dev.s3_proxy import FaultProxy
from fruit_assets_tests.support import TEST_BUCKET, io_manager, output_context, read_asset

GENERATIONS = 5
SCHEMA = pa.schema([("path", pa.string()), ("n", pa.int64())])


@pytest.fixture
def proxy(s3, monkeypatch):
    """A fault-injecting proxy in front of the test S3 server (no faults until a test asks); the AWS
    settings of this process point at it (storage caches one S3 filesystem per endpoint)."""
    with FaultProxy(s3.port, seed=23) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        yield proxy


@pytest.fixture
def table(proxy) -> delta.Location:
    return resolve(f"s3://{TEST_BUCKET}/faults-{uuid.uuid4().hex[:8]}").child("table")


def _rows(*paths: str) -> pa.Table:
    return pa.table({"path": list(paths), "n": list(range(len(paths)))}, schema=SCHEMA)


def _log_entry(version: int) -> str:
    return rf"/_delta_log/{version:020d}\.json$"


def assert_every_version_whole(location: delta.Location) -> None:
    """Every version in the log reads back: no data file that a version names was deleted."""
    latest = delta.snapshot(location)
    assert latest is not None
    for version in range(latest.version + 1):
        snapshot = delta.snapshot(location, version)
        assert snapshot is not None
        for file in snapshot.files:
            info = location.filesystem.get_file_info(snapshot.file_location(file.path).path)
            assert info.type == pafs.FileType.File, f"version {version} names {file.path}, which is gone"
        assert delta.read_arrow(location, version).num_rows == snapshot.rows


# -- the proxy ---------------------------------------------------------------------------------


def test_the_proxy_injects_what_it_says(s3, proxy):
    import boto3
    from botocore.config import Config

    config = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1, "mode": "standard"})
    client = boto3.client("s3", endpoint_url=proxy.endpoint_url, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name=s3.region, config=config)
    direct = s3.client()

    def keys() -> set[str]:
        listing = direct.list_objects_v2(Bucket=TEST_BUCKET, Prefix="proxy-check/")
        return {item["Key"] for item in listing.get("Contents", [])}

    proxy.inject("slowdown", "PUT", r"proxy-check/slowdown\b")
    with pytest.raises(ClientError, match="SlowDown"):
        client.put_object(Bucket=TEST_BUCKET, Key="proxy-check/slowdown", Body=b"x")
    proxy.inject("reset", "PUT", r"proxy-check/reset\b")
    with pytest.raises(Exception, match="(?i)connection"):
        client.put_object(Bucket=TEST_BUCKET, Key="proxy-check/reset", Body=b"x")
    proxy.inject("lost", "PUT", r"proxy-check/lost\b")
    with pytest.raises(Exception, match="(?i)connection"):
        client.put_object(Bucket=TEST_BUCKET, Key="proxy-check/lost", Body=b"x")
    proxy.slow_seconds = 0.3
    proxy.inject("slow", "PUT", r"proxy-check/slow\b")
    started = time.monotonic()
    client.put_object(Bucket=TEST_BUCKET, Key="proxy-check/slow", Body=b"x")
    assert time.monotonic() - started >= 0.3

    # A 503 and a reset never reach the store; a lost answer's request was applied.
    assert keys() == {"proxy-check/lost", "proxy-check/slow"}
    assert proxy.injected == {"slowdown": 1, "reset": 1, "lost": 1, "slow": 1}
    assert proxy.lost_answers == 1
    assert [fault for fault, *_ in proxy.injected_log] == ["slowdown", "reset", "lost", "slow"]


def test_fault_rates_are_kept_and_the_draws_follow_the_seed():
    requests = [("GET", f"/bucket/key-{i}") for i in range(4000)]
    random.Random(1).shuffle(requests)

    def draws(seed: int, order) -> dict:
        proxy = FaultProxy(9, slowdown=0.05, reset=0.03, lost=0.02, slow=0.01, seed=seed)  # not started: draws only
        return {request: proxy.choose_fault(*request) for request in order}

    first = draws(7, requests)
    assert first == draws(7, list(reversed(requests)))  # the order requests come in does not matter
    assert first != draws(8, requests)
    counts = pd.Series(list(first.values())).value_counts()
    for fault, rate in {"slowdown": 0.05, "reset": 0.03, "lost": 0.02, "slow": 0.01}.items():
        assert abs(counts.get(fault, 0) / len(requests) - rate) < 0.01, (fault, counts.to_dict())


# -- commits whose answer is unknown -----------------------------------------------------------


@pytest.mark.parametrize("fault", ["lost", "reset"])
@pytest.mark.parametrize("creating", [True, False], ids=["create", "append"])
def test_a_commit_with_an_unknown_outcome_is_resolved_from_the_log(table, proxy, fault, creating):
    """The PUT of the log entry gets a fault: a lost answer (the store applied it), or a reset (it
    never got there). Either way the commit is made exactly once and every file it names is there."""
    base = None
    if not creating:
        delta.commit_arrow(table, _rows("a"), None, {"run_id": "first"})
        base = delta.snapshot(table)
    version = 0 if base is None else base.version + 1
    proxy.inject(fault, "PUT", _log_entry(version))

    attempts = delta.CommitAttempts()
    assert delta.commit_arrow(table, _rows("b", "c"), base, {"run_id": "second"}, report=attempts) == version

    if fault == "lost":  # made at the first request: found in the log by its transaction id
        assert proxy.lost_answers == 1 and (attempts.attempts, attempts.resolved_from_log) == (1, 1)
    else:  # never made: made by a second request
        assert (attempts.attempts, attempts.resolved_from_log) == (2, 0)
    latest = delta.snapshot(table)
    assert latest is not None and latest.version == version and latest.commit == {"run_id": "second"}
    assert sorted(delta.read_arrow(table).column("path").to_pylist()) == ["b", "c"]
    assert_every_version_whole(table)


def test_a_real_conflict_still_loses_cleanly(table, proxy):
    """Another writer takes the version first; this writer's request is reset on the way. The log
    shows the other's commit: a conflict naming it, and only this writer's own files are removed."""
    delta.commit_arrow(table, _rows("a"), None, {"run_id": "first"})
    base = delta.snapshot(table)
    assert base is not None
    winner = delta.write_arrow_file(table, _rows("winner"))
    delta.commit(table, [winner], SCHEMA, base, mode=delta.Mode.OVERWRITE, metadata={"run_id": "winner-run"})

    loser = delta.write_arrow_file(table, _rows("loser"))
    proxy.inject("reset", "PUT", _log_entry(base.version + 1))
    with pytest.raises(delta.TableConflictError, match="version 1 is run winner-run's commit") as caught:
        delta.commit_or_discard(table, [loser], SCHEMA, base, {"run_id": "loser-run"}, mode=delta.Mode.OVERWRITE)
    assert "another run committed to this Delta table" in str(caught.value)

    assert delta.read_arrow(table).column("path").to_pylist() == ["winner"]
    exists = {name: table.filesystem.get_file_info(table.child(name).path).type == pafs.FileType.File
              for name in (winner.path, loser.path)}
    assert exists == {winner.path: True, loser.path: False}
    assert_every_version_whole(table)


# -- writes under faults, and faults that outlive the retries ---------------------------------


def test_writes_go_through_a_few_percent_of_each_fault(proxy):
    """Versions committed through the IO manager (snapshot, data file, commit, vacuum, read back)
    while the proxy injects each fault into 3% of the about 140 requests, and each kind at least once
    where it hurts most (the names of data files are random, and so are the draws of their requests)."""
    storage = f"s3://{TEST_BUCKET}/faults-{uuid.uuid4().hex[:8]}"
    manager = io_manager(storage)
    proxy.rates.update(slowdown=0.03, reset=0.03, lost=0.03, slow=0.03)
    proxy.slow_seconds = 0.05
    proxy.inject("lost", "PUT", _log_entry(2))
    proxy.inject("reset", "PUT", r"\.parquet$")
    proxy.inject("slowdown", "GET", _log_entry(1))
    proxy.inject("slow", "GET", r"list-type=2")
    attempts = []
    for generation in range(GENERATIONS):
        frame = pd.DataFrame({"path": [f"img/{i}.jpg" for i in range(generation + 1)], "generation": generation})
        context = output_context(asset_key=AssetKey("table"), run_id=f"run-{generation}")
        manager.handle_output(context, frame)
        metadata = context.consume_logged_metadata()
        assert metadata["delta_version"].value == generation
        attempts.append((metadata["commit_attempts"].value, metadata["commit_answers_lost"].value))
    proxy.rates.update(slowdown=0.0, reset=0.0, lost=0.0, slow=0.0)

    assert set(proxy.injected) == {"slowdown", "reset", "lost", "slow"}, proxy.injected
    stored = read_asset(storage, "table")
    assert len(stored) == GENERATIONS and set(stored.generation) == {GENERATIONS - 1}
    assert_every_version_whole(resolve(storage).child("table"))
    assert all(made >= 1 and lost <= made for made, lost in attempts)


def test_a_fault_that_outlives_the_retries_says_what_happened(table, proxy, s3):
    delta.commit_arrow(table, _rows("a"), None, {"run_id": "first"})
    base = delta.snapshot(table)
    assert base is not None

    # Every commit request is reset on the way: the commit is tried three times, then given up.
    proxy.inject("reset", "PUT", _log_entry(1), times=100)
    file = delta.write_arrow_file(table, _rows("b"))
    with pytest.raises(TransientStorageError) as caught:
        delta.commit_or_discard(table, [file], SCHEMA, base, {"run_id": "second"})
    message = str(caught.value)
    for expected in (f"Commit of version 1 of {table.uri}", proxy.endpoint_url, "Connection reset by peer",
                     "no version 1", "run again"):
        assert expected in message, message
    assert s3.secret_key not in message and "\x1b[" not in message
    assert delta.snapshot(table).version == 0  # the table is as it was
    assert table.filesystem.get_file_info(table.child(file.path).path).type == pafs.FileType.File  # left for vacuum

    # Every read of the log is throttled: delta-rs' retries run out, and the error says so.
    proxy.inject("slowdown", "GET", r"_delta_log", times=1000)
    with pytest.raises(TransientStorageError) as caught:
        delta.read_arrow(table)
    message = str(caught.value)
    for expected in (f"Reading the table of {table.uri}", proxy.endpoint_url, "503 Service Unavailable", "5 attempts"):
        assert expected in message, message


# What the clients say, as captured through the proxy (pyarrow's AWS SDK, delta-rs' object_store).
PYARROW_SLOWDOWN = (
    "When initiating multiple part upload for key 't1/part-3c.parquet' in bucket 'fruit-exp': AWS Error "
    "SLOW_DOWN during CreateMultipartUpload operation: Please reduce your request rate. (Request ID: fault-proxy)"
)
PYARROW_RESET = (
    "When initiating multiple part upload for key 't1/part-a5.parquet' in bucket 'fruit-exp': AWS Error "
    "NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 56, Failure when receiving data from "
    "the peer; Details: Recv failure: Connection reset by peer"
)
OBJECT_STORE_503 = (
    "Kernel error -> Generic S3 error\n          \x1b[31m↳\x1b[0m Error performing GET http://127.0.0.1:36947/"
    "fruit-exp/t1/_delta_log/_last_checkpoint in 188.054144ms, after 3 retries, max_retries\n           "
    "\x1b[31m↳\x1b[0m 3, retry_timeout\n            \x1b[31m↳\x1b[0m 20s  - Server returned non-2xx status code\n"
    "             \x1b[31m↳\x1b[0m 503 Service Unavailable\n              \x1b[31m↳\x1b[0m <?xml version=\"1.0\"?>"
    "<Error><Code>SlowDown</Code></Error>\n"
)


@pytest.mark.parametrize(
    "message, status",
    [
        (PYARROW_SLOWDOWN, "SLOW_DOWN (CreateMultipartUpload): Please reduce your request rate."),
        (PYARROW_RESET, "NETWORK_CONNECTION (CreateMultipartUpload): curlCode: 56, Failure when receiving data from the peer"),
        (OBJECT_STORE_503, "503 Service Unavailable"),
    ],
    ids=["pyarrow-slowdown", "pyarrow-reset", "object_store-503"],
)
def test_transient_faults_are_recognized_and_their_last_status_named(message, status):
    from fruit_assets.storage.transient import is_transient, last_status

    assert is_transient(OSError(message))
    assert last_status(OSError(message)) == status


@pytest.mark.parametrize(
    "message",
    [
        "AWS Error ACCESS_DENIED during PutObject operation: Access Denied",
        "No such file or directory: s3://bucket/images/r0_500.jpg",
        "Generic S3 error: Server returned non-2xx status code: 403 Forbidden",
    ],
    ids=["access-denied", "a-500-in-a-name", "forbidden"],
)
def test_lasting_errors_are_not_taken_for_transient_ones(message):
    from fruit_assets.storage.transient import is_transient

    assert not is_transient(OSError(message))


def test_a_local_spark_master_retries_failed_tasks_as_a_cluster_does():
    from fruit_assets.resources import local_spark_config, with_task_retries

    assert [with_task_retries(m) for m in ("local", "local[2]", "local[*]", "local[2,3]", "spark://host:7077")] == [
        "local[1,4]", "local[2,4]", "local[*,4]", "local[2,3]", "spark://host:7077"
    ]
    assert local_spark_config("local[2]")["spark.master"] == "local[2,4]"


def test_the_attempts_per_request_are_a_setting_that_both_clients_take(monkeypatch):
    from fruit_assets.storage.transient import delta_retry_options, s3_max_attempts

    monkeypatch.delenv("FRUIT_S3_MAX_ATTEMPTS", raising=False)
    assert (s3_max_attempts(), delta_retry_options()["max_retries"]) == (5, "4")
    monkeypatch.setenv("FRUIT_S3_MAX_ATTEMPTS", "2")
    assert (s3_max_attempts(), delta_retry_options()["max_retries"]) == (2, "1")
    for bad in ("0", "many", "1.5"):
        monkeypatch.setenv("FRUIT_S3_MAX_ATTEMPTS", bad)
        expected = f"FRUIT_S3_MAX_ATTEMPTS='{bad}' is not a whole number >= 1 (it sets the attempts per S3 request)"
        with pytest.raises(ValueError, match=re.escape(expected)):
            s3_max_attempts()
