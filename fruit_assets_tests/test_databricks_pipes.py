"""FRUIT_DEPLOYMENT=databricks_pipes: the Spark assets as Databricks job runs launched by Dagster Pipes,
against the workspace emulator WITHOUT a DBFS root (as new accounts are), with the data in SeaweedFS.
Dagster runs as users run it (`dagster asset materialize`), with the repository's own settings files:
databricks_pipes.yaml (a classic 17.3 LTS job cluster) and databricks_pipes_serverless.yaml (serverless,
where the task gets a Spark Connect session only). Everything Pipes stages goes through the Files API
into the emulator's Unity Catalog volume; the tasks read it at /Volumes. (The step launcher's message in
such a workspace, which points here, is test_databricks_preflight's.)"""

import os
import signal
import time
from pathlib import Path

import pytest
from dagster import DagsterEventType

from fruit_assets_tests.test_databricks_pipeline import (
    assert_equals_the_local_run,
    assert_failed_without_materializing,
    finish,
    last_run_events,
    materialize_cli,
    uploaded_demo_images,
)

pytestmark = pytest.mark.databricks

REPO = Path(__file__).resolve().parent.parent
CLASSIC_YAML, SERVERLESS_YAML = REPO / "databricks_pipes.yaml", REPO / "databricks_pipes_serverless.yaml"
SPARK_ASSETS = ("image_features", "pca_model", "reduced_features")
CHECKS = {"one_row_per_image", "vectors_are_finite_floats_of_the_model_dimension", "explained_variance_reaches_target",
          "k_columns_and_same_rows", "pca_model_is_an_exact_decomposition"}


@pytest.fixture(scope="module")
def emulator(s3, tmp_path_factory, emulated_runtimes):
    from fruit_assets_dev.databricks_emulator import DatabricksEmulator

    with DatabricksEmulator(
        str(tmp_path_factory.mktemp("workspace")),
        secrets={"fruit-assets": {"aws-access-key-id": s3.access_key, "aws-secret-access-key": s3.secret_key}},
        spark_master="local[2,4]", environments=emulated_runtimes, dbfs_root=False,
    ) as workspace:
        yield workspace


@pytest.fixture(scope="module")
def bucket(s3, demo_images):
    return uploaded_demo_images(demo_images, "pipes")


def pipes_env(emulator, bucket, home: Path, settings: Path, storage: str, **overrides) -> dict:
    home.mkdir(exist_ok=True)
    return os.environ | {
        "FRUIT_DEPLOYMENT": "databricks_pipes", "FRUIT_DATABRICKS_PIPES_CONFIG": str(settings),
        "DATABRICKS_HOST": emulator.url, "DATABRICKS_TOKEN": emulator.token,
        "FRUIT_IMAGES_URI": f"{bucket}/images", "FRUIT_STORAGE_URI": f"{bucket}/{storage}",
        "FRUIT_MODEL_WEIGHTS": "random:0", "DAGSTER_HOME": str(home),
        "FRUIT_DATABRICKS_POLL_SECONDS": "0.2",  # over the files' 5 s: a local emulator, and the tasks write as often (remote.py)
    } | overrides


def materialized(events) -> dict:
    return {e.dagster_event.asset_key.to_user_string(): {k: v.value for k, v in e.dagster_event.materialization.metadata.items()}
            for e in events if e.dagster_event and e.dagster_event.event_type == DagsterEventType.ASSET_MATERIALIZATION}


@pytest.mark.parametrize("settings", [CLASSIC_YAML, SERVERLESS_YAML], ids=["classic", "serverless"])
def test_the_graph_runs_through_pipes_without_dbfs_and_equals_the_local_run(emulator, bucket, local_run_storage, tmp_path, settings):
    known = {run.run_id for run in emulator.runs}
    storage = f"{bucket}/{settings.stem}"
    process = materialize_cli(pipes_env(emulator, bucket, tmp_path / "home", settings, settings.stem))
    output = finish(process)
    assert process.returncode == 0, output[-5000:]

    remote = [run for run in emulator.runs if run.run_id not in known]
    assert [run.result_state for run in remote] == ["SUCCESS"] * 3
    serverless = settings == SERVERLESS_YAML
    assert all(run.serverless == serverless and run.spark_python_task["python_file"].startswith("/Volumes/") for run in remote)
    # Nothing touched DBFS (the workspace has none); Pipes went through the volume's Files API.
    assert not emulator.requests_to(r"/api/2\.0/dbfs/") and emulator.requests_to(r"/api/2\.0/fs/files/Volumes/")
    if serverless:  # the task was a Spark Connect client: what it may not use, it could not
        assert all("Spark Connect session (serverless)" in run.stderr_path.read_text() for run in remote)

    _, events = last_run_events(tmp_path / "home")
    metadata = materialized(events)
    assert set(metadata) == {"raw_images", *SPARK_ASSETS}
    features = metadata["image_features"]
    assert (features["rows"], features["featurized"], features["weights_source"]) == (72, 72, "random:0")
    assert features["onnx_model_prepared_on"] == "host" and features["delta_version"] == 0
    assert "Databricks Job Run ID" in features  # dagster-databricks' own, beside the task's
    assert "explained_variance_plot" in metadata["pca_model"] and metadata["reduced_features"]["rows"] == 72
    if serverless:
        assert "worker_model_setup_note" in features  # no accumulators on Spark Connect
    messages = [e.user_message for e in events]
    assert any("72 of 72 images have features" in m for m in messages)  # the remote step's log
    checks = {e.dagster_event.event_specific_data.check_name: e.dagster_event.event_specific_data.passed
              for e in events if e.dagster_event and e.dagster_event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION}
    assert set(checks) == CHECKS
    assert all(passed for name, passed in checks.items() if name != "explained_variance_reaches_target")  # that one warns
    assert emulator.token not in output and emulator.token not in str(metadata)
    assert_equals_the_local_run(storage, local_run_storage)


def test_cancelling_the_dagster_run_cancels_the_databricks_run(emulator, bucket, tmp_path):
    env = pipes_env(emulator, bucket, tmp_path / "home", CLASSIC_YAML, "cancelled")
    known = {run.run_id for run in emulator.runs}
    process = materialize_cli(env, "raw_images,image_features", start_new_session=True)
    deadline, remote = time.monotonic() + 600, None
    while time.monotonic() < deadline and remote is None:
        remote = next((r for r in emulator.runs if r.run_id not in known and r.life_cycle_state == "RUNNING"), None)
        time.sleep(0.5)
    assert remote is not None, "the remote run never started"
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    output = finish(process, timeout=300)
    assert emulator.wait_for_run(remote.run_id, timeout=120).result_state == "CANCELED", output[-3000:]
    assert emulator.requests_to(r"/jobs/runs/cancel$")
    _, events = last_run_events(tmp_path / "home")
    assert_failed_without_materializing(events, "image_features")
    # The task closed its Pipes session when the cancel reached it (SIGTERM, then SIGKILL 5 s later), so
    # the host heard why it ended rather than waiting 10 s for messages that could not come (remote.main).
    closed = [e.dagster_event.engine_event_data.error for e in events if e.dagster_event
              and e.user_message == "[pipes] external process pipes closed with exception"]
    assert closed and "the task got signal SIGTERM" in closed[0].message, [e.user_message for e in events][-20:]

