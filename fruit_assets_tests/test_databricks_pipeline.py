"""FRUIT_DEPLOYMENT=databricks: the Spark assets materialized by the real databricks_pyspark_step_launcher,
against the local workspace emulator, with the data in SeaweedFS. Dagster runs as users run it: the
`dagster asset materialize` command, in its own process.

The emulator runs each step on the emulated runtime its YAML names (its Python 3.12, its pyspark and
packages, the YAML's libraries pip-installed over them): the graph on 17.3 LTS (the repository's YAML),
a single-asset step on 18 LTS (a copy of it), so that both supported runtimes run here. Each run's
`runtime.json` says what the step process ran."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance

from fruit_assets_dev.local_s3 import upload_tree
from fruit_assets_tests.support import TEST_BUCKET, by_image, read_asset, write_import_guard

pytestmark = pytest.mark.databricks  # runs steps through the local Databricks workspace emulator

REPO = Path(__file__).resolve().parent.parent
DAGSTER = str(Path(sys.executable).with_name("dagster"))
SPARK_ASSETS = ("image_features", "pca_model", "reduced_features")


@pytest.fixture(scope="module")
def guarded_imports(tmp_path_factory) -> Path:
    """The file where the cluster's import guard records every attempt to import TensorFlow, tf2onnx,
    onnx or Keras (none is in databricks.yaml's libraries: the host converts the model and stages it)."""
    folder = tmp_path_factory.mktemp("cluster_guard")
    write_import_guard(folder / "site", folder / "imports.txt")
    return folder / "imports.txt"


@pytest.fixture(scope="module")
def emulator(s3, tmp_path_factory, guarded_imports, emulated_runtimes):
    from fruit_assets_dev.databricks_emulator import DatabricksEmulator

    # The secret scope holds the S3 keys, as a real workspace would, under the names databricks.yaml
    # gives (its `storage.s3`); the launcher's storage config reads them on the cluster. Every task, its
    # Spark driver and Python workers alike, finds the import guard first on its path: a cluster without
    # TensorFlow, tf2onnx and onnx, as databricks.yaml's libraries make it.
    guard = guarded_imports.parent / "site"
    with DatabricksEmulator(
        str(tmp_path_factory.mktemp("workspace")),
        secrets={"fruit-assets": {"aws-access-key-id": s3.access_key, "aws-secret-access-key": s3.secret_key}},
        spark_master="local[2,4]",
        env={"PYTHONPATH": str(guard)},  # before the emulator's own entry (the runner's package)
        environments=emulated_runtimes,
    ) as workspace:
        yield workspace


def uploaded_demo_images(demo_images, name: str) -> str:
    """A prefix of its own in the test bucket, holding the demo set under `images/`."""
    prefix = f"s3://{TEST_BUCKET}/{name}-{uuid.uuid4().hex[:6]}"
    upload_tree(demo_images, f"{prefix}/images")
    return prefix


@pytest.fixture(scope="module")
def bucket(s3, demo_images):
    return uploaded_demo_images(demo_images, "databricks")


# The repository's databricks.yaml, which the README shows: the tests run that very file. Only the
# host and token (DATABRICKS_HOST, DATABRICKS_TOKEN) and the S3 paths (FRUIT_*_URI) are the tests' own;
# the emulator serves the secret scope the file names, and ignores its node types and instance profile.
DATABRICKS_YAML = REPO / "databricks.yaml"


def yaml_copy(tmp_path: Path, spark_version: str | None = None, drop: str | None = None) -> Path:
    """The repository's YAML with another runtime, or without one library."""
    settings = yaml.safe_load(DATABRICKS_YAML.read_text())
    if spark_version:
        settings["run_config"]["cluster"]["new"]["spark_version"] = spark_version
    if drop:
        libraries = settings["run_config"]["libraries"]
        kept = [lib for lib in libraries if not lib["pypi"]["package"].startswith(f"{drop}==")]
        assert len(kept) == len(libraries) - 1, drop
        settings["run_config"]["libraries"] = kept
    path = tmp_path / "databricks.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def runtime_of(run) -> dict:
    """What the run's step process ran (runtime.json, written by the emulator's task runner)."""
    return json.loads(run.runtime_path.read_text())


def dagster_env(emulator, bucket, home: Path, tmp_path: Path, **overrides) -> dict:
    home.mkdir(exist_ok=True)
    return os.environ | {
        "FRUIT_DEPLOYMENT": "databricks",
        "FRUIT_DATABRICKS_CONFIG": str(DATABRICKS_YAML),
        "DATABRICKS_HOST": emulator.url,
        "DATABRICKS_TOKEN": emulator.token,
        "FRUIT_IMAGES_URI": f"{bucket}/images",
        "FRUIT_STORAGE_URI": f"{bucket}/assets",
        "FRUIT_MODEL_WEIGHTS": "random:0",
        "DAGSTER_HOME": str(home),
        "FRUIT_DATABRICKS_POLL_SECONDS": "0.5",  # the test setting over the file's 2 s: a local emulator
    } | overrides


def materialize_cli(env: dict, select: str = "*", config: dict | None = None, **popen) -> subprocess.Popen:
    command = [DAGSTER, "asset", "materialize", "-m", "fruit_assets.definitions", "--select", select]
    if config:
        command += ["--config-json", json.dumps(config)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    output, _ = process.communicate(timeout=timeout)
    return output


def step_failures(home: Path) -> str:
    """The errors of the last run's failed steps, as Dagster recorded them."""
    _, events = last_run_events(home)
    return "\n".join(
        e.dagster_event.step_failure_data.error.to_string()
        for e in events
        if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_FAILURE
    )


def last_run_events(home: Path):
    with DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs(limit=1)
        return run, [record.event_log_entry for record in instance.get_records_for_run(run.run_id, limit=100_000).records]


def test_the_graph_runs_through_the_step_launcher_and_equals_the_local_run(emulator, bucket, local_run_storage, tmp_path, guarded_imports):
    submits_before = len(emulator.requests_to(r"/jobs/runs/submit$"))
    guarded_before = guarded_imports.read_text() if guarded_imports.exists() else ""
    home = tmp_path / "home"
    process = materialize_cli(dagster_env(emulator, bucket, home, tmp_path))
    output = finish(process)
    assert process.returncode == 0, output[-5000:]

    # Each Spark asset went to the workspace as its own run, and ended well there.
    submitted = emulator.requests_to(r"/jobs/runs/submit$")[submits_before:]
    assert len(submitted) == len(SPARK_ASSETS)
    assert [run.result_state for run in emulator.runs[-3:]] == ["SUCCESS"] * 3
    # On the runtime the YAML names, 17.3 LTS: its Python and pyspark; the YAML's libraries over its packages.
    for remote in emulator.runs[-3:]:
        runtime = runtime_of(remote)
        assert runtime["python"].startswith("3.12.") and runtime["pyspark"] == "4.0.0", runtime
        assert (runtime["onnxruntime"], runtime["deltalake"], runtime["pyarrow"]) == ("1.32.0", "1.6.6", "26.0.1"), runtime
        assert runtime["runtime"] == "17.3 LTS" and runtime["executable"] != sys.executable

    # The remote steps' events came back into the Dagster run: materializations with metadata, logs.
    run, events = last_run_events(home)
    # The host's steps ran in the CLI's own process (definitions' in-process executor): no step worker,
    # no Python per step. (The launched steps' own STEP_START events come from the remote task.)
    kinds = [e.dagster_event.event_type for e in events if e.dagster_event]
    assert DagsterEventType.STEP_WORKER_STARTING not in kinds and DagsterEventType.STEP_WORKER_STARTED not in kinds
    [local_start] = [e.dagster_event for e in events if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_START
                     and e.dagster_event.step_key == "raw_images"]
    assert local_start.pid == process.pid
    materialized = {
        e.dagster_event.asset_key.to_user_string(): e
        for e in events
        if e.dagster_event and e.dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION
    }
    assert set(materialized) == {"raw_images", *SPARK_ASSETS}
    metadata = {k: v.value for k, v in materialized["image_features"].dagster_event.materialization.metadata.items()}
    assert (metadata["rows"], metadata["featurized"], metadata["weights_source"]) == (72, 72, "random:0")
    assert metadata["runtime"] == "onnxruntime"  # the default runtime on the cluster too
    # The host converted the model and staged it in S3; the cluster read it and imported no TensorFlow,
    # tf2onnx, onnx or Keras: its guard recorded no attempt (and would have failed the step).
    staged = f"{bucket}/assets/_models/mobilenet_v2_features_{metadata['weights_fingerprint']}_"
    assert str(metadata["onnx_model_file"]).startswith(staged) and metadata["onnx_model_prepared_on"] == "host"
    assert (guarded_imports.read_text() if guarded_imports.exists() else "") == guarded_before
    messages = [e.user_message for e in events]
    assert any(f"staged at {staged}" in m for m in messages)
    assert any("72 of 72 images have features" in m for m in messages)
    checks = [
        e.dagster_event.event_specific_data
        for e in events
        if e.dagster_event and e.dagster_event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION
    ]
    assert {c.check_name for c in checks} >= {
        "one_row_per_image",
        "vectors_are_finite_floats_of_the_model_dimension",
        "k_columns_and_same_rows",
        "pca_model_is_an_exact_decomposition",
    }

    # Same outputs as the local run on the same images (this venv: Python 3.11, pyspark 4.3).
    assert_equals_the_local_run(f"{bucket}/assets", local_run_storage)


def assert_equals_the_local_run(storage: str, local_storage) -> None:
    """A remote run's tables equal the local run's on the same images: the features within 1e-5, the PCA
    (its components, with their canonical signs, and explained variance) within 1e-6."""
    remote, local = (by_image(read_asset(s, "image_features")) for s in (storage, local_storage))
    assert list(remote.index) == list(local.index)
    np.testing.assert_allclose(np.stack(remote.features), np.stack(local.features), rtol=0, atol=1e-5)
    remote_pca, local_pca = (read_asset(s, "pca_model").sort_values("component") for s in (storage, local_storage))
    assert list(remote_pca.component) == list(local_pca.component)
    np.testing.assert_allclose(np.stack(remote_pca.loadings), np.stack(local_pca.loadings), rtol=0, atol=1e-6)
    np.testing.assert_allclose(remote_pca.explained_variance, local_pca.explained_variance, rtol=0, atol=1e-6)
    remote, local = (by_image(read_asset(s, "reduced_features")) for s in (storage, local_storage))
    assert list(remote.index) == list(local.index)
    np.testing.assert_allclose(np.stack(remote.pca_features), np.stack(local.pca_features), rtol=1e-5, atol=1e-5)


def test_a_failure_on_the_cluster_of_18_lts_fails_the_step_with_the_remote_traceback(emulator, bucket, tmp_path):
    """The single-asset step that runs on 18 LTS (the graph runs on 17.3): the YAML's libraries install
    there too (deltalake 1.6.6 over its 1.1.4), the preflight passes and the asset's code runs."""
    home = tmp_path / "home"
    env = dagster_env(emulator, bucket, home, tmp_path, FRUIT_DATABRICKS_CONFIG=str(yaml_copy(tmp_path, "18.0.x-scala2.13")))
    known = {run.run_id for run in emulator.runs}
    process = materialize_cli(env, "pca_model", {"ops": {"pca_model": {"config": {"k": 500}}}})
    output = finish(process)
    assert process.returncode != 0
    [remote] = [run for run in emulator.runs if run.run_id not in known]
    runtime = runtime_of(remote)
    assert runtime["python"].startswith("3.12.") and runtime["pyspark"] == "4.1.0", runtime
    assert (runtime["runtime"], runtime["deltalake"], runtime["onnxruntime"]) == ("18 LTS", "1.6.6", "1.32.0"), runtime
    assert "PreflightError" not in output
    _, events = last_run_events(home)
    [failure] = [e.dagster_event for e in events if e.dagster_event and e.dagster_event.event_type == DagsterEventType.STEP_FAILURE]
    error = failure.step_failure_data.error
    text = error.to_string()
    assert "k=500 is out of range" in text and "refuse_impossible_k" in text  # the remote traceback, frames included


def test_cancelling_the_dagster_run_cancels_the_remote_run(emulator, bucket, tmp_path):
    home = tmp_path / "home"
    # A storage of its own: nothing to reuse, so the remote step featurizes every image and is busy long
    # enough to be cancelled. Weights the other tests use too (random:1): the run's model cache has them,
    # so no seed of its own costs a TensorFlow build and an ONNX conversion.
    env = dagster_env(emulator, bucket, home, tmp_path, FRUIT_MODEL_WEIGHTS="random:1", FRUIT_STORAGE_URI=f"{bucket}/cancelled")
    known = {run.run_id for run in emulator.runs}
    process = materialize_cli(env, "raw_images,image_features", start_new_session=True)
    deadline = time.monotonic() + 600
    remote = None
    while time.monotonic() < deadline and remote is None:
        remote = next((r for r in emulator.runs if r.run_id not in known and r.life_cycle_state == "RUNNING"), None)
        time.sleep(0.5)
    assert remote is not None, "the remote run never started"
    # Cancel once the launcher polls the running run (its wait loop, where Ctrl-C must cancel the remote
    # run), not after a fixed delay.
    polls = len(emulator.requests_to(r"/jobs/runs/get$"))
    while time.monotonic() < deadline and len(emulator.requests_to(r"/jobs/runs/get$")) == polls:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    finish(process, timeout=300)
    assert process.returncode != 0
    assert emulator.wait_for_run(remote.run_id, timeout=120).result_state == "CANCELED"
    assert emulator.requests_to(r"/jobs/runs/cancel$")
    _, events = last_run_events(home)
    assert_failed_without_materializing(events, "image_features")


def assert_failed_without_materializing(events, step_key: str) -> None:
    """A cancelled step wrote nothing, and its run says so: the step failed, with no materialization."""
    kinds = {(e.dagster_event.event_type, e.dagster_event.step_key) for e in events if e.dagster_event}
    assert (DagsterEventType.STEP_FAILURE, step_key) in kinds, kinds
    assert not any(kind == DagsterEventType.ASSET_MATERIALIZATION and step == step_key for kind, step in kinds), kinds


def test_a_wrong_token_is_a_clear_error(emulator, bucket, tmp_path):
    home = tmp_path / "home"
    process = materialize_cli(dagster_env(emulator, bucket, home, tmp_path, DATABRICKS_TOKEN="not-the-token"), "image_features")
    output = finish(process, timeout=300)
    assert process.returncode != 0
    text = step_failures(home)
    assert "PermissionDenied: Invalid access token." in text, text[-3000:]  # the workspace's 403, as the SDK names it
    assert "not-the-token" not in text and emulator.token not in output


def test_without_onnxruntime_in_the_libraries_the_step_fails_naming_it(emulator, bucket, tmp_path):
    """On the emulated runtime the library is really absent (17.3 LTS does not ship it): the step's
    preflight fails before any Spark work, with the library and the line that fixes it."""
    home = tmp_path / "home"
    env = dagster_env(emulator, bucket, home, tmp_path, FRUIT_DATABRICKS_CONFIG=str(yaml_copy(tmp_path, drop="onnxruntime")),
                      FRUIT_STORAGE_URI=f"{bucket}/without-onnxruntime")
    known = {run.run_id for run in emulator.runs}
    process = materialize_cli(env, "raw_images,image_features")
    output = finish(process, timeout=600)
    assert process.returncode != 0
    [remote] = [run for run in emulator.runs if run.run_id not in known]
    assert runtime_of(remote)["onnxruntime"] is None
    assert "onnxruntime: not installed" in output, output[-3000:]
    assert '{"pypi": {"package": "onnxruntime==1.32.0"}}' in output


def test_an_unsupported_runtime_fails_before_anything_reaches_the_workspace(emulator, bucket, tmp_path):
    path = yaml_copy(tmp_path, "13.3.x-scala2.12")
    requests_before = len(emulator.request_log)
    env = dagster_env(emulator, bucket, tmp_path / "home", tmp_path, FRUIT_DATABRICKS_CONFIG=str(path))
    process = materialize_cli(env, "image_features")
    output = finish(process, timeout=300)
    assert process.returncode != 0
    assert "Databricks runtime '13.3.x-scala2.12' is not supported" in output, output[-3000:]
    assert "17.3 LTS (spark_version 17.3.x-scala2.13), 18 LTS (spark_version 18.0.x-scala2.13)" in output
    assert len(emulator.request_log) == requests_before  # no upload, no submitted job


def test_the_cluster_guard_bites_runtime_tensorflow_needs_tensorflow_on_the_cluster(emulator, bucket, tmp_path, guarded_imports):
    """The control of the guard above: runtime tensorflow stages nothing and needs TensorFlow on the cluster,
    so on a cluster without it the step's preflight fails, and the guard saw its probe."""
    home = tmp_path / "home"
    # A storage of its own: nothing to reuse, so the executors must run the model.
    env = dagster_env(emulator, bucket, home, tmp_path, FRUIT_MODEL_RUNTIME="tensorflow", FRUIT_STORAGE_URI=f"{bucket}/tensorflow")
    process = materialize_cli(env, "raw_images,image_features")
    finish(process)
    assert process.returncode != 0
    text = step_failures(home)
    # The step's preflight, for the runtime the resource resolved, names TensorFlow and the line that
    # adds it, before any Spark work; its probe is what the guard saw.
    assert "tensorflow-cpu: not installed" in text and '{"pypi": {"package": "tensorflow-cpu==2.21.0"}}' in text, text[-3000:]
    assert "tensorflow" in guarded_imports.read_text().split()
