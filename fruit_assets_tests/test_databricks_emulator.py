"""The local Databricks workspace emulator, driven by the real clients: databricks-sdk for DBFS and Jobs,
and dagster-databricks' ``databricks_pyspark_step_launcher`` materializing a tiny asset on it.

Everything is real: an HTTP server on 127.0.0.1, task processes with their own local Spark (each one
starts a JVM: 10-20 s on this machine, more when it is busy), Dagster runs on a test instance. The
three Jobs runs are submitted together, so their JVMs start side by side. They run in the emulator's
local mode (this venv); the step launcher's runs run on the emulated 18 LTS runtime (its Python 3.12,
pyspark 4.1.0 and packages, the launcher's libraries installed over them: `runtime_emulator`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from fruit_assets.databricks.runtimes import SUPPORTED_RUNTIMES, runtime_for_spark_version
from fruit_assets_dev.databricks_emulator import DatabricksEmulator
from fruit_assets_dev.databricks_emulator.environments import EnvironmentCache, share_bytecode
from fruit_assets_dev.databricks_emulator.server import running_group_members

SECRETS = {
    "storage": {"access_key": "AKIA-EMULATED-KEY", "secret_key": "emulated-secret-value-123"},
    "app": {"greeting": "hello-from-secret-scope"},
}
RUN_TIMEOUT = 600  # seconds; generous: other test suites share the two cores

# databricks_pyspark_step_launcher is "superseded" (by Dagster Pipes) and says so on every use.
pytestmark = [pytest.mark.databricks, pytest.mark.filterwarnings("ignore:StepLauncher is superseded")]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with DatabricksEmulator(tmp_path_factory.mktemp("databricks"), secrets=SECRETS) as emu:
        yield emu


@pytest.fixture(scope="module")
def client(emulator):
    return emulator.workspace_client()


RUNTIME_18 = runtime_for_spark_version("18.0.x-scala2.13")


@pytest.fixture(scope="module")
def runtime_emulator(tmp_path_factory, emulated_runtimes):
    """A workspace whose tasks run on the emulated runtimes; environments are kept for the whole pytest
    run, shared by its workers (test_databricks_pipeline uses the same folder)."""
    with DatabricksEmulator(
        tmp_path_factory.mktemp("databricks_runtimes"), secrets=SECRETS,
        environments=emulated_runtimes,
        clusters={"0101-000000-emulated": {"spark_version": RUNTIME_18.spark_version}},
    ) as emu:
        yield emu


# ----------------------------------------------------------------------------------------------- DBFS


def test_dbfs_round_trip_through_databricks_sdk(client, emulator):
    from dagster_databricks import DatabricksClient
    from databricks.sdk.errors import NotFound, ResourceAlreadyExists

    small = b"small file\n"
    client.dbfs.put("/roundtrip/small.txt", contents=base64.b64encode(small).decode(), overwrite=True)
    with pytest.raises(ResourceAlreadyExists):
        client.dbfs.put("/roundtrip/small.txt", contents=base64.b64encode(small).decode())

    big = os.urandom(2 * 1024 * 1024 + 12345)  # three 1 MiB blocks
    blocks_before = len(emulator.requests_to(r"/dbfs/add-block$"))
    client.dbfs.upload("dbfs:/roundtrip/sub/big.bin", io.BytesIO(big), overwrite=True)
    assert len(emulator.requests_to(r"/dbfs/add-block$")) - blocks_before == 3
    assert client.dbfs.download("/roundtrip/sub/big.bin").read() == big
    assert emulator.local_path("dbfs:/roundtrip/sub/big.bin").read_bytes() == big
    assert emulator.local_path("/dbfs/roundtrip/sub/big.bin") == emulator.local_path("/roundtrip/sub/big.bin")

    # The launcher's own client: streaming put (create/add-block/close) and 1 MiB-block reads.
    launcher_client = DatabricksClient(host=emulator.url, token=emulator.token)
    launcher_client.put_file(io.BytesIO(big), "dbfs:///roundtrip/launcher.bin", overwrite=True)
    assert launcher_client.read_file("dbfs:///roundtrip/launcher.bin") == big

    listing = {f.path: f for f in client.dbfs.list("/roundtrip")}
    assert set(listing) == {"/roundtrip/small.txt", "/roundtrip/sub", "/roundtrip/launcher.bin"}
    assert listing["/roundtrip/sub"].is_dir
    assert listing["/roundtrip/small.txt"].file_size == len(small)
    assert client.dbfs.get_status("/roundtrip/sub/big.bin").file_size == len(big)
    assert [f.path for f in client.dbfs.list("/roundtrip", recursive=True) if not f.is_dir] == [
        "/roundtrip/launcher.bin",
        "/roundtrip/small.txt",
        "/roundtrip/sub/big.bin",
    ]

    client.dbfs.delete("/roundtrip/small.txt")
    with pytest.raises(NotFound):
        client.dbfs.get_status("/roundtrip/small.txt")
    client.dbfs.delete("/roundtrip", recursive=True)
    assert not client.dbfs.exists("/roundtrip")

    # '..' cannot leave the DBFS folder: this is DBFS /etc/passwd, which does not exist.
    with pytest.raises(NotFound):
        client.dbfs.read("/../../../../etc/passwd")


def test_wrong_or_missing_token_is_refused(emulator):
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.errors import NotFound, PermissionDenied

    intruder = WorkspaceClient(host=emulator.url, token="not-the-token", auth_type="pat")
    with pytest.raises(PermissionDenied, match="Invalid access token"):
        intruder.dbfs.get_status("/")

    answer = requests.get(f"{emulator.url}/api/2.0/dbfs/list", params={"path": "/"}, timeout=30)
    assert answer.status_code == 401
    assert answer.json()["error_code"] == "UNAUTHENTICATED"

    with pytest.raises(NotFound, match=r"GET /api/2.0/no/such/endpoint"):
        emulator.workspace_client().api_client.do("GET", "/api/2.0/no/such/endpoint")
    assert emulator.requests_to(r"^/api/2.0/no/such/endpoint$")[-1].status == 404
    assert emulator.token not in repr(emulator.request_log)


# ----------------------------------------------------------------------------------------------- Jobs

OK_SCRIPT = """
import os, sys
print("argv:", sys.argv[1:])
print("rows:", spark.range(10).count())
print("same spark context:", sc is spark.sparkContext)
print("secret matches:", dbutils.secrets.get("app", "greeting") == "hello-from-secret-scope")
print("secret printed:", dbutils.secrets.get("app", "greeting"))
print("env from cluster:", os.environ.get("GREETING_ENV"))
print("fuse parameter:", open(sys.argv[1]).read().strip())
print("spark reads dbfs uri:", spark.read.text(sys.argv[2]).count())
print("dbutils.fs.ls:", [f.name for f in dbutils.fs.ls("dbfs:/jobs/input")])
"""

FAILING_SCRIPT = """
print("about to fail, after", spark.range(3).count(), "rows")
def explode():
    raise RuntimeError("boom from the failing task")
explode()
"""

SLEEPING_SCRIPT = """
import time
print("sleeping", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def submitted_runs(client):
    """Three spark_python_task runs submitted at once: one that works, one that fails, one that sleeps."""
    from databricks.sdk.service import compute, jobs

    client.dbfs.put("/jobs/input/words.txt", contents=base64.b64encode(b"apple\nbanana\n").decode(), overwrite=True)
    run_ids = {}
    for name, script in (("ok", OK_SCRIPT), ("failing", FAILING_SCRIPT), ("sleeping", SLEEPING_SCRIPT)):
        client.dbfs.put(f"/jobs/{name}.py", contents=base64.b64encode(script.encode()).decode(), overwrite=True)
        waiter = client.jobs.submit(
            run_name=f"emulator test {name}",
            tasks=[
                jobs.SubmitTask(
                    task_key=name,
                    spark_python_task=jobs.SparkPythonTask(
                        python_file=f"dbfs:/jobs/{name}.py",
                        parameters=["/dbfs/jobs/input/words.txt", "dbfs:/jobs/input/words.txt"],
                    ),
                    new_cluster=compute.ClusterSpec(
                        spark_version="17.3.x-scala2.13",
                        node_type_id="i3.xlarge",
                        num_workers=1,
                        spark_env_vars={"GREETING_ENV": "from-spark-env-vars"},
                    ),
                    libraries=[compute.Library(pypi=compute.PythonPyPiLibrary(package="pyarrow"))],
                )
            ],
        )
        run_ids[name] = waiter.run_id
    return run_ids


def test_spark_python_task_succeeds_with_spark_secrets_and_env(client, emulator, submitted_runs):
    run = client.jobs.wait_get_run_job_terminated_or_skipped(
        submitted_runs["ok"], timeout=timedelta(seconds=RUN_TIMEOUT)
    )
    assert run.state.life_cycle_state.value == "TERMINATED", run.state
    assert run.state.result_state.value == "SUCCESS", run.state.state_message
    assert run.run_page_url.startswith(emulator.url)
    [task] = run.tasks
    assert task.cluster_instance.cluster_id

    output = client.jobs.get_run_output(task.run_id)
    logs = output.logs
    fuse_path = emulator.local_path("dbfs:/jobs/input/words.txt")
    assert f"argv: ['{fuse_path}', '{fuse_path.as_uri()}']" in logs
    assert "rows: 10" in logs
    assert "same spark context: True" in logs
    assert "secret matches: True" in logs
    assert "secret printed: [REDACTED]" in logs  # as Databricks redacts secrets in run output
    assert "env from cluster: from-spark-env-vars" in logs
    assert "fuse parameter: apple\nbanana" in logs
    assert "spark reads dbfs uri: 2" in logs
    assert "dbutils.fs.ls: ['words.txt']" in logs

    recorded = emulator.get_run(run.run_id)
    assert recorded.would_install == ['{"pypi": {"package": "pyarrow"}}']
    assert recorded.new_cluster["spark_env_vars"] == {"GREETING_ENV": "from-spark-env-vars"}
    assert "would install library" in recorded.stderr_path.read_text()


def test_failing_task_ends_failed_with_its_traceback(client, emulator, submitted_runs):
    from databricks.sdk.errors import InvalidParameterValue

    run_id = submitted_runs["failing"]
    emulator.wait_for_run(run_id, timeout=RUN_TIMEOUT)
    run = client.jobs.get_run(run_id)
    assert run.state.life_cycle_state.value == "TERMINATED"
    assert run.state.result_state.value == "FAILED"
    assert "RuntimeError: boom from the failing task" in run.state.state_message
    assert "in explode" in run.state.state_message

    output = client.jobs.get_run_output(run.tasks[0].run_id)
    assert "about to fail, after 3 rows" in output.logs
    assert output.error == "RuntimeError: boom from the failing task"
    assert "Traceback (most recent call last)" in output.error_trace
    with pytest.raises(InvalidParameterValue, match="output of each individual task run"):
        client.jobs.get_run_output(run_id)  # as on Databricks: output belongs to task runs


def test_cancel_kills_the_task_process_group(client, emulator, submitted_runs):
    run_id = submitted_runs["sleeping"]
    recorded = emulator.get_run(run_id)
    deadline = time.monotonic() + RUN_TIMEOUT
    while "sleeping" not in (recorded.stdout_path.read_text() if recorded.stdout_path.exists() else ""):
        assert not recorded.terminated, recorded.state_message
        assert time.monotonic() < deadline, "the sleeping task never started"
        time.sleep(0.5)
    assert client.jobs.get_run(run_id).state.life_cycle_state.value == "RUNNING"
    pgid = recorded.pid  # the task runs in its own process group, led by the runner
    os.killpg(pgid, 0)  # alive: runner, Spark JVM, maybe Python workers

    client.jobs.cancel_run(run_id)
    emulator.wait_for_run(run_id, timeout=60)
    run = client.jobs.get_run(run_id)
    assert (run.state.life_cycle_state.value, run.state.result_state.value) == ("TERMINATED", "CANCELED")
    assert run.state.user_cancelled_or_timedout
    assert running_group_members(pgid) == []  # every process of the group has ended, the JVM included


def test_a_killed_process_waiting_to_be_reaped_no_longer_runs():
    """What the cancel test asserts: a zombie (killed, not yet reaped by its parent: under a subreaper that
    reaps late, a killed task's orphans stay so) still answers os.killpg(pgid, 0), and runs nothing."""
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert running_group_members(child.pid) == [child.pid]
        child.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        os.killpg(child.pid, 0)  # the group still "exists" for kill(2)
        assert running_group_members(child.pid) == []
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------- the Dagster step launcher

TINY_PACKAGE = "fruit_dbx_tiny"
TINY_DEFINITIONS = '''
"""A tiny code location whose Spark assets run through databricks_pyspark_step_launcher."""
import os

import fruit_dbx_tiny
from dagster import AssetExecutionContext, Definitions, MaterializeResult, asset, define_asset_job, in_process_executor
from dagster_databricks import databricks_pyspark_step_launcher
from dagster_pyspark import LazyPySparkResource


@asset(required_resource_keys={"step_launcher", "pyspark"})
def tiny_numbers(context: AssetExecutionContext) -> MaterializeResult:
    def worker_origin(batches):  # nested, so pickled by value: the workers cannot import this package
        import os
        import sys

        import pyspark

        zips = [entry for entry in [*sys.path, *sys.path_importer_cache] if entry.endswith(".zip") and "pyspark" in entry]
        for batch in batches:
            yield batch.assign(origin=f"{pyspark.__file__}|{os.environ.get('PYTHONPATH', '')}|{zips}")

    spark = context.resources.pyspark.spark_session
    rows = spark.range(10).count()
    [worker_origin] = spark.range(1, numPartitions=1).mapInPandas(worker_origin, "id long, origin string").toPandas().origin
    context.log.info(f"hello from the remote step: counted {rows} rows")
    return MaterializeResult(
        metadata={
            "rows": rows,
            "pid": os.getpid(),
            "package_file": fruit_dbx_tiny.__file__,
            "aws_key_from_storage_secret": os.environ.get("AWS_ACCESS_KEY_ID") == "AKIA-EMULATED-KEY",
            "env_from_secret": os.environ.get("TINY_GREETING") == "hello-from-secret-scope",
            "env_from_cluster": os.environ.get("CLUSTER_ENV", ""),
            "worker_origin": worker_origin,
        }
    )


@asset(required_resource_keys={"step_launcher", "pyspark"})
def tiny_failure(context: AssetExecutionContext) -> None:
    context.log.info("about to fail remotely")
    raise ValueError("tiny asset exploded on purpose")


defs = Definitions(
    assets=[tiny_numbers, tiny_failure],
    jobs=[
        define_asset_job("tiny_job", selection=["tiny_numbers"]),
        define_asset_job("tiny_failing_job", selection=["tiny_failure"]),
    ],
    # Configured by run config: a step launcher needs a reconstructable job (not dagster.materialize), and
    # the remote step rebuilds its resources from this code and the run config.
    resources={"step_launcher": databricks_pyspark_step_launcher, "pyspark": LazyPySparkResource(spark_config={})},
    executor=in_process_executor,
)


def tiny_job():
    return defs.resolve_job_def("tiny_job")


def tiny_failing_job():
    return defs.resolve_job_def("tiny_failing_job")
'''


def test_pyspark_zip_drops_every_file_under_a_pytest_tmp_path(tmp_path):
    """Why tiny_package is not in tmp_path: build_pyspark_zip's default excludes (r".*pytest.*") match the
    absolute path, so under /tmp/pytest-of-... the step launcher would upload an empty code.zip."""
    from dagster_pyspark.utils import build_pyspark_zip

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    build_pyspark_zip(str(tmp_path / "code.zip"), str(tmp_path))
    assert "pytest" in str(tmp_path)
    assert zipfile.ZipFile(tmp_path / "code.zip").namelist() == []


@pytest.fixture(scope="module")
def tiny_package():
    root = Path(tempfile.mkdtemp(prefix="fruit-dbx-tiny-"))  # not under tmp_path: see the test above
    (root / TINY_PACKAGE).mkdir()
    (root / TINY_PACKAGE / "__init__.py").write_text("")
    (root / TINY_PACKAGE / "definitions.py").write_text(textwrap.dedent(TINY_DEFINITIONS))
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == TINY_PACKAGE or m.startswith(TINY_PACKAGE + ".")]:
            del sys.modules[name]
        shutil.rmtree(root, ignore_errors=True)


def launcher_config(emulator, tiny_package, cluster, **overrides) -> dict:
    """databricks_pyspark_step_launcher config, as documented, pointed at the emulator."""
    config = {
        "run_config": {
            "run_name": "fruit_assets emulator test",
            "cluster": cluster,
            "libraries": [{"pypi": {"package": "pyarrow"}}],
        },
        "databricks_host": emulator.url,
        # From the environment, so the token is not pickled into the step run ref uploaded to DBFS.
        "databricks_token": {"env": "DATABRICKS_TOKEN"},
        "local_pipeline_package_path": str(tiny_package),
        "staging_prefix": "/dagster_staging",
        "storage": {"s3": {"secret_scope": "storage", "access_key_key": "access_key", "secret_key_key": "secret_key"}},
        # Required in practice: the launcher's constructor has no default for it (dagster-databricks 0.29.27).
        "secrets_to_env_variables": [{"name": "TINY_GREETING", "scope": "app", "key": "greeting"}],
        "wait_for_logs": True,
        "poll_interval_sec": 0.5,
        "max_completion_wait_time_seconds": RUN_TIMEOUT,
    }
    config.update(overrides)
    return {"resources": {"step_launcher": {"config": config}}}


NEW_CLUSTER = {
    "new": {
        "size": {"num_workers": 1},
        "spark_version": RUNTIME_18.spark_version,
        "nodes": {"node_types": {"node_type_id": "i3.xlarge"}},
        "spark_env_vars": {"CLUSTER_ENV": "from-new-cluster"},
        "cluster_log_conf": {"dbfs": {"destination": "dbfs:/cluster-logs"}},
    }
}


def _messages(instance, run_id) -> list[str]:
    return [entry.user_message or "" for entry in instance.all_logs(run_id)]


def test_step_launcher_materializes_an_asset_on_the_emulated_18_lts_runtime(runtime_emulator, tiny_package, monkeypatch):
    emulator = runtime_emulator
    import dagster
    from dagster import execute_job, instance_for_test, reconstructable
    from fruit_dbx_tiny.definitions import tiny_job

    monkeypatch.setenv("DATABRICKS_TOKEN", emulator.token)
    submits_before = len(emulator.requests_to(r"/jobs/runs/submit$"))
    with instance_for_test() as instance:
        result = execute_job(
            reconstructable(tiny_job),
            instance=instance,
            run_config=launcher_config(emulator, tiny_package, NEW_CLUSTER),
            raise_on_error=False,
        )
        messages = _messages(instance, result.run_id)
    assert result.success, "\n".join(messages[-40:])

    [materialization] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in materialization.materialization.metadata.items()}
    assert metadata["rows"] == 10
    assert metadata["pid"] != os.getpid()
    assert metadata["aws_key_from_storage_secret"] is True  # DatabricksConfig.setup read the S3 secrets
    assert metadata["env_from_secret"] is True  # secrets_to_env_variables
    assert metadata["env_from_cluster"] == "from-new-cluster"
    # The remote step imported the package from the uploaded code.zip, not from the local folder.
    assert metadata["package_file"].endswith(f"{TINY_PACKAGE}/__init__.py")
    assert not metadata["package_file"].startswith(str(tiny_package))

    assert any("hello from the remote step: counted 10 rows" in m for m in messages)
    assert any(m.startswith("Captured stdout for step tiny_numbers") for m in messages)
    assert any(re.match(r"Retrieving logs from dbfs:/cluster-logs/.+/driver/stdout", m) for m in messages)

    [run] = [r for r in emulator.runs if r.run_name == "fruit_assets emulator test" and r.new_cluster]
    assert (run.life_cycle_state, run.result_state) == ("TERMINATED", "SUCCESS")
    assert run.spark_python_task["python_file"].endswith("/tiny_numbers/databricks_step_main.py")
    assert f'{{"pypi": {{"package": "dagster=={dagster.__version__}"}}}}' in run.would_install
    # The step ran on 18 LTS's Python and packages, its libraries installed over them, as pip on a cluster
    # does: the unpinned "pyarrow" library is satisfied by the runtime's 21.0.0 and stays.
    runtime = json.loads(run.runtime_path.read_text())
    assert runtime["python"].startswith("3.12."), runtime
    assert (runtime["pyspark"], runtime["numpy"], runtime["pandas"]) == ("4.1.0", "2.1.3", "2.2.3"), runtime
    assert (runtime["pyarrow"], runtime["deltalake"], runtime["onnxruntime"]) == ("21.0.0", "1.1.4", None), runtime
    assert runtime["databricks_runtime_version"] == "18.0" and runtime["executable"] != sys.executable
    # Its Spark Python workers were given the runtime's pyspark.zip, and imported pyspark from the
    # environment's package all the same, with no zip importer left (the runner's daemon, spark_daemon.py).
    package, given, zips = metadata["worker_origin"].split("|")
    environment = Path(runtime["executable"]).parent.parent
    assert "pyspark.zip" in given and zips == "[]", metadata["worker_origin"]
    assert package == str(next(environment.glob("lib/python3.12/site-packages/pyspark/__init__.py"))), package
    assert "installed library" in run.stderr_path.read_text()
    assert len(emulator.requests_to(r"/jobs/runs/submit$")) == submits_before + 1
    assert emulator.requests_to(r"/jobs/runs/get$")
    assert len(emulator.requests_to(r"/dbfs/create$")) >= 4  # main file, code.zip, step run ref, config
    assert emulator.requests_to(r"/dbfs/read$", "GET")
    assert emulator.requests_to(r"/clusters/get$")
    staged = emulator.local_path(f"/dagster_staging/{result.run_id}/tiny_numbers")
    assert {"databricks_step_main.py", "code.zip", "step_run_ref.pkl", "config.pkl", "stdout", "stderr"} <= {
        p.name for p in staged.iterdir()
    }


def test_remote_asset_exception_fails_the_dagster_step(runtime_emulator, tiny_package, monkeypatch):
    emulator = runtime_emulator
    from dagster import execute_job, instance_for_test, reconstructable
    from fruit_dbx_tiny.definitions import tiny_failing_job

    monkeypatch.setenv("DATABRICKS_TOKEN", emulator.token)
    run_config = launcher_config(
        emulator,
        tiny_package,
        {"existing": "0101-000000-emulated"},
        wait_for_logs=False,
        permissions={"job_permissions": {"CAN_VIEW": [{"group_name": "data-team"}]}},
    )
    with instance_for_test() as instance:
        result = execute_job(
            reconstructable(tiny_failing_job), instance=instance, run_config=run_config, raise_on_error=False
        )
        messages = _messages(instance, result.run_id)
    assert not result.success

    [failure] = result.get_step_failure_events()
    error = failure.step_failure_data.error.to_string()
    assert "ValueError: tiny asset exploded on purpose" in error
    assert re.search(rf"{TINY_PACKAGE}/definitions.py\", line \d+, in tiny_failure", error), error  # remote traceback
    assert any("about to fail remotely" in m for m in messages)

    # The remote step reports the failure as a Dagster event; the Databricks run itself succeeds.
    [run] = [r for r in emulator.runs if r.existing_cluster_id == "0101-000000-emulated"]
    assert (run.life_cycle_state, run.result_state) == ("TERMINATED", "SUCCESS")
    assert emulator.permissions("jobs", run.job_id) == [{"group_name": "data-team", "permission_level": "CAN_VIEW"}]
    assert json.loads(run.runtime_path.read_text())["pyspark"] == "4.1.0"  # the registered cluster's runtime


# ------------------------------------------------------------------------------------- emulated runtimes


def test_a_spark_version_outside_the_table_is_refused_as_the_api_refuses_it(client, emulator):
    """Databricks answers 400 INVALID_PARAMETER_VALUE to a spark_version it does not run; the emulator
    runs only the supported runtimes (fruit_assets/databricks/runtimes.py), and lists them."""
    body = {"run_name": "old runtime", "tasks": [{
        "task_key": "t", "spark_python_task": {"python_file": "dbfs:/jobs/x.py"},
        "new_cluster": {"spark_version": "13.3.x-scala2.12", "node_type_id": "i3.xlarge", "num_workers": 1}}]}
    runs_before = len(emulator.runs)
    answer = requests.post(f"{emulator.url}/api/2.2/jobs/runs/submit", json=body, timeout=30,
                           headers={"Authorization": f"Bearer {emulator.token}"})
    assert answer.status_code == 400
    assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    message = answer.json()["message"]
    assert "'13.3.x-scala2.12'" in message
    for runtime in SUPPORTED_RUNTIMES:
        assert f"{runtime.name} (spark_version {runtime.spark_version})" in message
    assert len(emulator.runs) == runs_before  # nothing was started


FAKE_UV = """#!/bin/sh
# A stand-in for uv that records its calls: "venv ... DIR" makes DIR/bin/python, the rest succeed.
echo "$@" >> "$FAKE_UV_LOG"
if [ "$1" = venv ]; then
    for last; do :; done
    mkdir -p "$last/bin" && ln -s "$(command -v python3)" "$last/bin/python"
    sleep 1
fi
exit 0
"""


def test_an_environment_is_built_once_when_two_workers_ask_for_it_at_once(tmp_path, monkeypatch):
    """Two pytest-xdist workers may ask for the same environment at the same moment: one builds it (under
    the cache's file lock, in a temporary folder renamed into place), the other waits and uses it."""
    uv = tmp_path / "uv"
    uv.write_text(FAKE_UV)
    uv.chmod(0o755)
    monkeypatch.setenv("FAKE_UV_LOG", str(tmp_path / "calls"))
    monkeypatch.setenv("FRUIT_EMULATOR_PYTHON_3_12", sys.executable)  # not run: the fake uv ignores it
    cache = EnvironmentCache(tmp_path / "cache", uv=str(uv))
    cache._pythons["3.12"] = sys.executable
    results = []

    def ask():
        results.append(cache.environment(RUNTIME_18, ("onnxruntime==1.32.0",)))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2 and results[0].folder == results[1].folder
    assert sorted(r.build_seconds is None for r in results) == [False, True]  # built once, then found
    calls = (tmp_path / "calls").read_text().splitlines()
    assert sum(call.startswith("venv") for call in calls) == 1
    pins = next(call for call in calls if call.startswith("pip install") and "pyspark==" in call)
    for name, version in RUNTIME_18.python_packages().items():  # the product's table, and only it
        assert f"{name}=={version}" in pins
    assert any(call.startswith("pip install") and call.endswith("onnxruntime==1.32.0") for call in calls)
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []  # no partial left
    other = cache.environment(RUNTIME_18, ("onnxruntime==1.31.0",))
    assert other.folder != results[0].folder and other.build_seconds is not None


# -------------------------------------------------------------------------------------------------- CLI


def test_cli_serves_until_sigterm(tmp_path):
    from databricks.sdk import WorkspaceClient

    env = {**os.environ, "EMU_TOKEN": "cli-token-123", "EMU_SECRET": "cli-secret-value"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fruit_assets_dev.databricks_emulator", "--root", str(tmp_path / "root"), "--port", "0",
         "--token-env", "EMU_TOKEN", "--secret", "cli/key=EMU_SECRET"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        banner = process.stdout.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+) ", banner).group(1)
        rest = [process.stdout.readline() for _ in range(3)]
        assert rest[0].strip() == f"export DATABRICKS_HOST={url}"
        assert "cli-token-123" not in "".join(rest) and "cli-secret-value" not in "".join(rest)
        assert rest[2].strip() == "secret scope cli: keys key"

        cli_client = WorkspaceClient(host=url, token="cli-token-123", auth_type="pat")
        cli_client.dbfs.mkdirs("/from-cli")
        assert [f.path for f in cli_client.dbfs.list("/")] == ["/from-cli"]
        assert [s.name for s in cli_client.secrets.list_scopes()] == ["cli"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (tmp_path / "root" / "dbfs" / "from-cli").is_dir()


def test_cli_rejects_a_secret_whose_variable_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EMU_MISSING"}
    done = subprocess.run(
        [sys.executable, "-m", "fruit_assets_dev.databricks_emulator", "--root", str(tmp_path)]
        + ["--secret", "s/k=EMU_MISSING"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert "environment variable EMU_MISSING is not set" in done.stderr


def _site_packages(root: Path, distributions: dict[str, dict[str, str]], sources: Path) -> Path:
    """A site-packages folder holding `distributions` ({dist-info name: {path: source}}), its files hardlinks
    of `sources` as uv installs them."""
    site = root / "lib" / "python3.12" / "site-packages"
    for dist_info, files in distributions.items():
        (site / dist_info).mkdir(parents=True)
        (site / dist_info / "RECORD").write_text("".join(f"{path},sha256=x,1\n" for path in files) + f"{dist_info}/RECORD,,\n")
        for path, source in files.items():
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            if not (sources / source).exists():
                (sources / source).write_text(f"VALUE = {source!r}\n")
            os.link(sources / source, site / path)
    return site


def test_environments_share_the_bytecode_of_a_distribution_version_and_only_that(tmp_path):
    sources, shared = tmp_path / "uv-cache", tmp_path / "_bytecode"
    sources.mkdir()
    one = {"pkg-1.0.dist-info": {"pkg/__init__.py": "init1", "pkg/mod.py": "mod1"},
           "a-1.0.dist-info": {"ns/a.py": "a"}, "b-1.0.dist-info": {"ns/b.py": "b", "top.py": "top"}}
    first, second = (_site_packages(tmp_path / name, one, sources) for name in ("env1", "env2"))
    newer = _site_packages(tmp_path / "env3", {"pkg-2.0.dist-info": {"pkg/__init__.py": "init2", "pkg/mod.py": "mod2"}}, sources)
    assert [share_bytecode(site, shared) for site in (first, second, newer)] == [1, 1, 1]  # pkg/ only
    # Folders of two distributions, and site-packages itself, keep their own bytecode.
    assert not (first / "ns" / "__pycache__").exists() and not (first / "__pycache__").exists()
    assert (first / "pkg" / "__pycache__").resolve() == (second / "pkg" / "__pycache__").resolve()
    assert (newer / "pkg" / "__pycache__").resolve() == shared / "pkg-2.0.dist-info" / "pkg" / "__pycache__"

    def imported(site: Path, modules: str = "pkg.mod, ns.a") -> str:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"} | {"PYTHONPATH": str(site)}
        done = subprocess.run([sys.executable, "-c", f"import {modules}; print(pkg.mod.VALUE)"], env=env,
                              capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert imported(first) == "mod1"
    compiled = {p.name: p.stat().st_mtime_ns for p in (shared / "pkg-1.0.dist-info" / "pkg" / "__pycache__").iterdir()}
    assert len(compiled) == 2  # written through the link, once for both environments
    assert imported(second) == "mod1"
    assert {p.name: p.stat().st_mtime_ns for p in (shared / "pkg-1.0.dist-info" / "pkg" / "__pycache__").iterdir()} == compiled
    assert imported(newer, "pkg.mod") == "mod2"  # another version: its own folder, never the other's bytecode
    assert list((first / "ns" / "__pycache__").iterdir())  # the shared folder compiled in place
