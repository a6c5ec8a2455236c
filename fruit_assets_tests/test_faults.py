"""Faults injected into real parts: a Spark Python worker killed mid-featurization, S3 going away."""

import os
import signal
import threading
import time

import pytest

from fruit_assets.plumbing import spark_worker_daemon
from fruit_assets_dev.demo_data import generate_demo_set
from fruit_assets_dev.local_s3 import start_local_s3
from fruit_assets_tests.support import failure_text, local_resources, materialize_all, metadata_of, new_python_workers, read_asset

pytestmark = pytest.mark.spark  # runs local Spark in Dagster runs


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process (a JVM forks from many threads, so /proc/PID/children,
    which lists one thread's children, is not enough)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def _children(pid: int, parents: dict[int, int]) -> list[int]:
    return [child for child, parent in parents.items() if parent == pid]


def _has_model_runtime(pid: int) -> bool:
    """ONNX Runtime (or TensorFlow) is loaded in the process: it has built a model."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("onnxruntime" in line or "libtensorflow" in line for line in f)
    except OSError:
        return False


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _worker_daemon(pid: int) -> bool:
    """A Spark Python worker daemon, or a worker it forked: pyspark's, or the local deployment's."""
    return any(f"-m {module} " in _cmdline(pid) for module in ("pyspark.daemon", spark_worker_daemon.__name__))


def python_workers() -> list[int]:
    """Spark's Python workers: the children of worker daemons started for this test session."""
    workers, parents = [], _parents()
    pending = [os.getpid()]
    while pending:
        pid = pending.pop()
        for child in _children(pid, parents):
            pending.append(child)
            if _worker_daemon(pid) and _worker_daemon(child):
                workers.append(child)
    return workers


def test_a_killed_python_worker_is_retried_and_every_image_appears_once(spark, tmp_path):
    images = tmp_path / "images"
    generate_demo_set(images, labels=8, images_per_label=12)  # 96 images: enough time to strike
    killed: list[int] = []

    def kill_a_featurizing_worker():
        deadline = time.monotonic() + 240
        ticks: dict[int, int] = {}
        while time.monotonic() < deadline and not killed:
            for pid in python_workers():
                before, ticks[pid] = ticks.get(pid), _cpu_ticks(pid)
                # A model runtime is loaded and the worker is computing: it is featurizing.
                if before is not None and ticks[pid] > before and _has_model_runtime(pid):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_featurizing_worker, daemon=True)
    killer.start()
    # New Python workers, so that none already holds the model and the kill lands mid-task. (A fresh
    # weights seed did that too, for a TensorFlow process and an ONNX conversion of 12 CPU-s.)
    with new_python_workers(spark):
        result = materialize_all(local_resources(images, tmp_path / "store"), selection=["raw_images", "image_features"])
    killer.join(timeout=5)
    assert killed, "no featurizing Python worker was found to kill"
    assert result.success
    assert metadata_of(result, "image_features")["rows"] == 96
    stored = read_asset(tmp_path / "store", "image_features")
    assert len(stored) == 96 and stored.path.is_unique
    assert sorted(stored.path) == sorted(str(p) for p in images.rglob("*.jpg"))


@pytest.fixture
def private_s3(tmp_path, monkeypatch):
    """A second S3 server that this test may stop and restart; only the driver talks to it."""
    server = start_local_s3(data_dir=str(tmp_path / "s3"), die_with_parent=True)
    server.create_bucket("outage")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    yield server
    server.stop()


def test_s3_outage_fails_clearly_and_the_last_version_survives(spark, private_s3, tmp_path, monkeypatch):
    images = tmp_path / "images"
    generate_demo_set(images, labels=3, images_per_label=2)
    resources = local_resources(images, "s3://outage/assets")
    assert materialize_all(resources, selection=["raw_images"]).success
    before = private_s3.client().list_objects_v2(Bucket="outage", Prefix="assets/raw_images/")["KeyCount"]
    assert before >= 1

    port, data_dir, secret = private_s3.port, private_s3.data_dir, private_s3.secret_key
    private_s3.stop()
    monkeypatch.setenv("FRUIT_S3_MAX_ATTEMPTS", "2")  # the outage is certain: 1 s of backoff per request, not 5-12
    started = time.monotonic()
    result = materialize_all(resources, selection=["raw_images"], raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "FRUIT_STORAGE_URI=s3://outage/assets: cannot access bucket 'outage'" in text
    assert secret not in text
    assert time.monotonic() - started < 120  # retried with backoff, then a clear failure: no hang

    back = start_local_s3(data_dir=data_dir, s3_port=port, access_key=private_s3.access_key, secret_key=secret, die_with_parent=True)
    try:
        assert len(read_asset("s3://outage/assets", "raw_images")) == 6
    finally:
        back.stop()
