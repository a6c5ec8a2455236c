"""The Databricks Pipes task's message writer (`databricks/pipes/remote.py`): it forwards the task's stdout and
stderr to the Dagster run at the host's poll interval, and loses none of it when it closes. (The whole task
runs against the workspace emulator in test_databricks_pipes.)"""

import json
import os

import pytest

from fruit_assets.databricks.pipes.remote import (
    INTERVAL_ARGUMENT,
    MESSAGE_INTERVAL_SECONDS,
    MessageWriter,
    _StdioWriter,
    message_interval,
)


def test_the_task_writes_as_often_as_the_host_polls_and_at_least_once_a_second():
    assert message_interval(["entry.py", "--fruit-package", "p.zip"]) == MESSAGE_INTERVAL_SECONDS == 1.0
    assert message_interval(["entry.py", INTERVAL_ARGUMENT, "0.2"]) == 0.2
    assert message_interval(["entry.py", INTERVAL_ARGUMENT, "5"]) == 1.0  # the settings file's poll interval
    with pytest.raises(ValueError):
        message_interval(["entry.py", INTERVAL_ARGUMENT, "often"])


def test_stdout_and_stderr_reach_the_messages_up_to_the_last_line(tmp_path):
    """Written to the file descriptors, as the task's libraries and child processes write, right before the
    writer closes: the shorter wait for `tee` still forwards the last line."""
    with MessageWriter(interval=0.2).open({"path": str(tmp_path), "include_stdio_in_messages": True}):
        os.write(1, b"to stdout\n")
        os.write(2, b"first to stderr\n")
        os.write(2, b"last to stderr\n")
    messages = [json.loads(line) for chunk in sorted(tmp_path.glob("*.json")) for line in chunk.read_text().splitlines()]
    streams = {"stdout": "", "stderr": ""}
    for message in messages:
        assert message["method"] == "log_external_stream", message
        streams[message["params"]["stream"]] += message["params"]["text"]
    assert streams["stderr"] == "first to stderr\nlast to stderr\n"
    # stderr's `tee` echoes into the stdout it inherited, which stdout's `tee` captures: dagster-pipes' way
    assert streams["stdout"] in ("to stdout\nfirst to stderr\nlast to stderr\n", "to stdout\n"), streams


def test_the_stdio_channels_take_the_writers_interval_for_polling_and_for_tee():
    channel = _StdioWriter(message_channel=object(), interval=0.2).make_channel({}, "stderr")  # type: ignore[arg-type]
    assert (channel.interval, channel.WAIT_FOR_TEE_SECONDS, channel.stream) == (0.2, 0.2, "stderr")
    assert type(channel).__mro__[1].WAIT_FOR_TEE_SECONDS == 1.0  # dagster-pipes' own, which production keeps at 1 s
