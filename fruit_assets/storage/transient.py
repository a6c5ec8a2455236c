"""Transient S3 faults: how each S3 client retries them, and the error when retries run out.

Cloud S3 fails in small ways all the time: 503 SlowDown when a prefix is busy, 500s, connection
resets and timeouts. Every client that talks to S3 retries those itself, with capped exponential
backoff and jitter, configured here in one place:
- pyarrow (reads, writes, listings, on the driver and in Spark's Python workers): the AWS SDK's
  standard retry strategy (`storage._s3_filesystem`);
- delta-rs (the Delta log and the data it reads): object_store's retry settings (`delta_retry_options`).
  object_store does not repeat a request that may have been applied unless it is idempotent: the
  conditional PUT of a commit's log entry is not, and is resolved in `delta.commit` instead;
- boto3 (the developer tools in `fruit_assets_dev`): botocore's standard mode;
- Spark tasks: `local[N,F]` (`resources.with_task_retries`).
The S3 clients make `s3_max_attempts()` attempts per request (FRUIT_S3_MAX_ATTEMPTS, else 5).
Only requests that are safe to repeat are repeated: a whole-object PUT or GET, a DELETE, a listing.

When a fault outlives its retries, `TransientStorageError` says which operation failed, against which
endpoint, and the last status the store (or the network) gave; never credentials.

No Dagster, no Spark.
"""

from __future__ import annotations

import os
import re

from fruit_assets.settings import Setting, whole

# Attempts per request, first included: at a 2% fault rate five faults in a row are one in 3e8.
S3_MAX_ATTEMPTS = 5
# ... unless this variable says otherwise. The AWS SDK's standard strategy (pyarrow's) waits up to 2**n
# seconds before its n-th retry, and its base delay cannot be set: against a store that is down, one
# request took 7-12 s to fail with 5 attempts and 1 s with 2 (2-core AMD EPYC Zen 4). Fewer attempts fail
# fast where the store is known to be down (the tests of outages); more ride out a flaky network.
S3_ATTEMPTS = Setting("FRUIT_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS, whole(1))


def s3_max_attempts() -> int:
    """Attempts per S3 request, the first included: FRUIT_S3_MAX_ATTEMPTS, else 5."""
    return S3_ATTEMPTS.resolve("the attempts per S3 request")


def delta_retry_options() -> dict[str, str]:
    """object_store (delta-rs) retries: 100 ms doubling up to 5 s, with jitter (its own, decorrelated);
    its default retry timeout is three minutes: one request stuck that long is an outage, not a blip."""
    return {
        "max_retries": str(s3_max_attempts() - 1),
        "retry_timeout": "60s",
        "backoff_config.init_backoff": "100ms",
        "backoff_config.max_backoff": "5s",
        "backoff_config.base": "2",
    }

# What the clients say about faults that are worth another try (pyarrow's AWS SDK, object_store).
_TRANSIENT = re.compile(
    r"\b50[0234] (?:Service Unavailable|Internal Server Error|Bad Gateway|Gateway Time-?out|Slow Down)"
    r"|SLOW_?DOWN|<Code>SlowDown|INTERNAL_FAILURE|SERVICE_UNAVAILABLE|NETWORK_CONNECTION|REQUEST_TIMEOUT"
    r"|Connection reset|connection error|error sending request|Empty reply|\btimed out\b|Broken pipe"
    r"|curlCode: (?:7|28|52|55|56)\b|IncompleteMessage|connection closed before message completed",
    re.IGNORECASE,
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STATUS_PATTERNS = (
    re.compile(r"\b([45]\d\d) ([A-Z][A-Za-z ]+?)\s*(?:↳|$|\n|:)"),  # object_store: "503 Service Unavailable"
    re.compile(r"AWS Error ([A-Z_]+) during (\w+) operation: ([^;(\n]+)"),  # pyarrow's AWS SDK
    re.compile(r"(Connection reset by peer|Connection refused|Empty reply from server|timed out|Broken pipe)", re.I),
)


class TransientStorageError(OSError):
    """S3 kept failing with faults that are usually transient (503, 500, resets, timeouts) after every
    retry. Nothing is lost: what was committed before stays, and the run can be started again."""


def is_transient(error: BaseException) -> bool:
    """Whether `error` looks like a fault worth another try (throttling, a 5xx, the network)."""
    return isinstance(error, (TransientStorageError, TimeoutError, ConnectionError)) or bool(
        _TRANSIENT.search(str(error))
    )


def last_status(error: BaseException) -> str:
    """The last status the store or the network gave, in a few words: "503 Service Unavailable",
    "SLOW_DOWN (PutObject): Please reduce your request rate.", "Connection reset by peer"."""
    text = clean(str(error))
    for pattern in _STATUS_PATTERNS:
        match = pattern.search(text)
        if match:
            if pattern is _STATUS_PATTERNS[1]:
                return f"{match.group(1)} ({match.group(2)}): {match.group(3).strip()}"
            return " ".join(group.strip() for group in match.groups())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def clean(text: str) -> str:
    """An error text fit for users: no terminal colours, and no credential from the environment."""
    text = _ANSI.sub("", text).replace("↳", "").replace("\u200b", "")
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):  # the key id is no secret, and may be a common word
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def gave_up(operation: str, uri: str, endpoint: str | None, error: BaseException, attempts: str, after: str = "") -> TransientStorageError:
    """The error of an S3 `operation` on `uri` that failed with a transient fault `attempts` times."""
    where = endpoint or "AWS S3"
    return TransientStorageError(
        f"{operation} of {uri} failed: S3 at {where} kept failing after {attempts}; the last status was "
        f"{last_status(error)}. {after}These faults are usually transient (throttling, a busy or "
        "restarting store, the network): run again. If it persists, check the endpoint and the store's health."
    )
