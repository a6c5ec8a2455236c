"""The host side of FRUIT_DEPLOYMENT=databricks_pipes: the `databricks_pipes` resource, which runs one
asset as one Databricks job run through Dagster Pipes, with no DBFS anywhere.

For each asset it:
1. stages the code in the settings file's volume through the Files API: the package as a zip named by
   its content (uploaded once per version of the code) and `entry.py`, the task's python_file;
2. for image_features, converts the model on the host and stages it in storage, as the step launcher
   does (ml/staged_model.py): the task needs ONNX Runtime only, never TensorFlow;
3. submits one `spark_python_task` on the settings file's compute (a new job cluster, an existing
   cluster, or serverless with an `environment_key` and the run's `environments`), with dagster-databricks'
   `PipesUnityCatalogVolumesContextInjector` and `PipesUnityCatalogVolumesMessageReader` (context and
   messages in the volume), and returns what the task reported: its materialization and check results.

Settings reach the task as Pipes extras: the resources' values and the FRUIT_*/AWS region and endpoint
variables, never credentials (the task reads S3 keys from a secret scope, or has an instance profile).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from fruit_assets.databricks.pipes.settings import CONFIG_SETTING, PipesSettings, load_settings

ENVIRONMENT_KEY = "fruit_assets"  # the serverless task's environment in the run's `environments`
CODE_FOLDER = "code"


def _fields(resource: Any) -> dict:
    """A resource's resolved settings, to build the same resource in the task."""
    return {name: getattr(resource, name) for name in type(resource).model_fields}


def code_archive() -> tuple[str, bytes]:
    """The package (as the step launcher ships it: resources.staged_package) as zip bytes, named by content."""
    from fruit_assets.resources import staged_package

    root = Path(staged_package())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(root.rglob("*.py")):
            # A fixed date: the same code gives the same bytes, hence the same name.
            info = zipfile.ZipInfo(str(path.relative_to(root)), date_time=(2020, 1, 1, 0, 0, 0))
            zipped.writestr(info, path.read_bytes())
    data = buffer.getvalue()
    return f"fruit_assets-{hashlib.sha256(data).hexdigest()[:12]}.zip", data


def stage_code(files, volume: str) -> tuple[str, str]:
    """(entry file, package zip) in the volume, uploaded unless this version is there already."""
    from databricks.sdk.errors import NotFound

    name, data = code_archive()
    package = f"{volume}/{CODE_FOLDER}/{name}"
    entry = package.removesuffix(".zip") + "-entry.py"
    try:
        files.get_metadata(entry)
    except NotFound:
        files.upload(package, io.BytesIO(data), overwrite=True)
        # The entry last: a task that finds it finds the whole package.
        files.upload(entry, io.BytesIO((Path(__file__).parent / "entry.py").read_bytes()), overwrite=True)
    return entry, package


def task_spec(settings: PipesSettings, asset: str, entry: str, package: str, poll: float) -> tuple[dict, dict]:
    """(the task, the other arguments of jobs/runs/submit). The task writes its messages as often as the
    host polls (`poll`), at most once a second (remote.message_interval)."""
    from databricks.sdk.service import jobs

    from fruit_assets.databricks.pipes.remote import INTERVAL_ARGUMENT

    parameters = ["--fruit-package", package, INTERVAL_ARGUMENT, str(poll)]
    task: dict[str, Any] = {"task_key": asset, "spark_python_task": {"python_file": entry, "parameters": parameters}}
    submit: dict[str, Any] = {"run_name": f"fruit_assets {asset}", "timeout_seconds": settings.timeout_seconds}
    compute = settings.compute
    if settings.serverless:
        # Serverless takes no cluster and no libraries: an environment with the dependencies
        # (https://docs.databricks.com/aws/en/compute/serverless/dependencies).
        task["environment_key"] = ENVIRONMENT_KEY
        spec = {"environment_version": str(compute["serverless"]["environment_version"]), "dependencies": settings.libraries}
        submit["environments"] = [jobs.JobEnvironment.from_dict({"environment_key": ENVIRONMENT_KEY, "spec": spec})]
        return task, submit
    task["libraries"] = [{"pypi": {"package": library}} for library in settings.libraries]
    if "existing_cluster_id" in compute:
        task["existing_cluster_id"] = compute["existing_cluster_id"]
    else:
        task["new_cluster"] = dict(compute["new_cluster"])
    return task, submit


def staged_model_environment(context, feature_model, storage) -> dict[str, str]:
    """The staged ONNX model's variables for the task (none for runtime tensorflow: the task builds it)."""
    settings = feature_model.featurize_settings()
    if settings.runtime != "onnxruntime":
        return {}
    from fruit_assets.ml.featurize import prepare_feature_extractor
    from fruit_assets.ml.staged_model import stage

    model = prepare_feature_extractor(feature_model.weights_source(), settings)
    staged = stage(model, storage.root())
    context.log.info(f"ONNX model of {model.metadata['weights_source']} (weights fingerprint {model.fingerprint}) "
                     f"{'staged at' if staged.uploaded else 'already staged at'} {staged.uri} for Databricks")
    return staged.environment()


class DatabricksPipes(ConfigurableResource):
    """Runs an asset as a Databricks job run through Dagster Pipes (Unity Catalog volume, no DBFS)."""

    config_path: str | None = Field(default=None, description=f"The settings file. Null: {CONFIG_SETTING}.")
    poll_interval_seconds: float | None = Field(default=None, description="Null: the settings file's.")

    def settings(self) -> PipesSettings:
        return load_settings(self.config_path)

    def materialize(self, context, storage, feature_model=None, pca_config: dict | None = None):
        """Run the context's asset remotely; yields its MaterializeResult and check results."""
        from databricks.sdk import WorkspaceClient
        from databricks.sdk.service import files, jobs

        from fruit_assets.resources import FORWARDED_TO_CLUSTER

        settings, asset = self.settings(), context.asset_key.to_user_string()
        client = WorkspaceClient()  # DATABRICKS_HOST and DATABRICKS_TOKEN, or any databricks-sdk auth
        entry, package = stage_code(files.FilesAPI(client.api_client), settings.volume)
        environment = {name: value for name in FORWARDED_TO_CLUSTER if (value := os.environ.get(name))}
        resources = {"storage": _fields(storage)}
        if feature_model is not None:
            resources["feature_model"] = _fields(feature_model)
            environment |= staged_model_environment(context, feature_model, storage)
        extras = {"environment": environment, "resources": resources, "pca_config": pca_config or {},
                  "storage_secret_scope": settings.storage_secret_scope}
        task, submit = task_spec(settings, asset, entry, package, self.poll_seconds(settings))
        pipes_client = self.client(client, settings)
        invocation = pipes_client.run(context=context, task=jobs.SubmitTask.from_dict(task), submit_args=submit, extras=extras)
        if pipes_client.interrupted:
            # dagster-databricks (0.29.27) cancels the Databricks run, then returns as if it had ended:
            # its results would be an implicit materialization of an asset that nothing wrote.
            from dagster._core.errors import DagsterExecutionInterruptedError

            raise DagsterExecutionInterruptedError(f"interrupted: Databricks run of {asset} cancelled, nothing materialized")
        # Only what the task reported: a task that reported no materialization materialized nothing.
        yield from invocation.get_results(implicit_materializations=False)

    def poll_seconds(self, settings: PipesSettings) -> float:
        from fruit_assets.resources import POLL_SETTING

        # FRUIT_DATABRICKS_POLL_SECONDS over the file's, as for the step launcher (the tests poll often).
        return self.poll_interval_seconds or float(os.environ.get(POLL_SETTING) or settings.poll_interval_seconds)

    def client(self, client, settings: PipesSettings):
        # Not exported by the package's __init__ (0.29.27): from the module.
        from dagster_databricks.pipes import (
            PipesDatabricksClient,
            PipesDatabricksServerlessClient,
            PipesUnityCatalogVolumesContextInjector,
            PipesUnityCatalogVolumesMessageReader,
        )

        poll = self.poll_seconds(settings)
        pipes_folder = f"{settings.volume}/pipes"
        injector = PipesUnityCatalogVolumesContextInjector(client=client, volume_path=pipes_folder)
        reader = PipesUnityCatalogVolumesMessageReader(client=client, volume_path=pipes_folder, interval=poll)
        if settings.serverless:
            serverless = type("CancellingServerlessClient", (CancelsFirst, PipesDatabricksServerlessClient), {})
            return serverless(client, pipes_folder, injector, reader, poll_interval_seconds=poll)
        classic = type("CancellingClient", (CancelsFirst, PipesDatabricksClient), {})
        return classic(client, context_injector=injector, message_reader=reader, poll_interval_seconds=poll)


class CancelsFirst:
    """Mixed into dagster-databricks' Pipes clients: an interrupted run is cancelled before anything else,
    with further interrupts held back. Ctrl-C reaches a step twice (the terminal's process group, then
    the executor forwarding it); the second one, raised inside the client's own handler, stopped its
    `cancel_run` call, and the Databricks run went on to the end (found by test_databricks_pipes)."""

    client: Any
    interrupted = False  # set when an interrupt cancelled the run (see DatabricksPipes.materialize)

    def _poll_til_success(self, context, run_id: int) -> None:
        from dagster._core.errors import DagsterExecutionInterruptedError
        from dagster._utils.interrupts import capture_interrupts

        try:
            super()._poll_til_success(context, run_id)  # type: ignore[misc]
        except DagsterExecutionInterruptedError:
            self.interrupted = True
            with capture_interrupts():
                context.log.info(f"interrupted: cancelling Databricks run {run_id}")
                self.client.jobs.cancel_run(run_id)
            raise
