"""Configurable resources, and `build_resources`: the one place that picks them per deployment.

Every setting is a field of its resource, so it can be set in the Launchpad (run config). The
important ones can also be set by a FRUIT_* environment variable. A field whose variable is listed in
its class's SETTINGS defaults to None, meaning "FRUIT_* variable if set, else the documented
default", and is resolved when Dagster builds the resource for a run (a pydantic "before" validator).

Why not `EnvVar`: Dagster treats the values a resource is constructed with as one default for the
resource's whole config, and run config that names the resource replaces all of it. A run config with
only `max_skipped_fraction` then dropped `weights=EnvVar("FRUIT_MODEL_WEIGHTS")`: the run fell back to
`imagenet`. Here nothing is constructed with values: run config overrides only the keys it names, and
every other key still comes from its variable. (Values given in code, as tests do, are still replaced
by run config that names the resource: that is Dagster's rule.)
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, ClassVar

from dagster import ConfigurableResource, ResourceDefinition
from dagster_pyspark import LazyPySparkResource, PySparkResource
from pydantic import Field

from fruit_assets import storage
from fruit_assets.ml.featurize import FeaturizeSettings, PreparedModel, check_runtime, prepare_feature_extractor
from fruit_assets.pipeline import listing
from fruit_assets.plumbing import quiet, spark_worker_daemon
from fruit_assets.plumbing.spark_connect import ui_url
from fruit_assets.resources.io_manager import DeltaIOManager
from fruit_assets.settings import (  # noqa: F401 - project_dir, default_*_uri: used by the demo and the tests
    FromEnvironment,
    Setting,
    default_images_uri,
    default_storage_uri,
    fraction,
    project_data_dir,
    project_dir,
    resolved,
    whole,
)
from fruit_assets.storage.resource import Storage

# Settings the step needs on the cluster too (never credentials: those come from a secret scope
# or the instance profile).
FORWARDED_TO_CLUSTER = (
    "FRUIT_IMAGES_URI", "FRUIT_STORAGE_URI", "FRUIT_MODEL_WEIGHTS", "FRUIT_MODEL_RUNTIME", "FRUIT_RETENTION_HOURS",
    "FRUIT_MODEL_BATCH_SIZE", "FRUIT_FEATURIZE_PARTITIONS", "FRUIT_MAX_SKIPPED_FRACTION",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)
DEFAULT_SPARK_MASTER = "local[*,4]"
# Attempts per Spark task, as spark.task.maxFailures gives on a cluster: a task that fails on a
# transient fault (an S3 error that outlived the client's retries, a Python worker killed) runs again.
# Its files are written under new names each time, so a repeated task is safe.
SPARK_TASK_ATTEMPTS = 4
_PLAIN_LOCAL_MASTER = re.compile(r"^local(?:\[(\*|\d+)\])?$")


PACKAGE = Path(__file__).resolve().parents[1]  # the fruit_assets folder: what ships to a cluster


class ImageSource(FromEnvironment, ConfigurableResource):
    """Where the images are: a folder or s3://bucket/prefix in the Fruits-360 layout <root>/<Label>/<file>."""

    SETTINGS: ClassVar[dict[str, Setting]] = {"uri": Setting("FRUIT_IMAGES_URI", default_images_uri)}
    RESOURCE_KEY: ClassVar[str] = "images"

    uri: str | None = Field(
        default=None,
        description="Local folder or s3://bucket/prefix. Null: FRUIT_IMAGES_URI, else data/demo in the checkout.",
    )
    list_concurrency: int = Field(
        default=listing.DEFAULT_CONCURRENCY, ge=1,
        description="Label folders listed at the same time (S3 LIST requests in flight).",
    )
    max_folder_listings: int = Field(
        default=listing.DEFAULT_MAX_FOLDER_LISTINGS, ge=0,
        description="Above this many label folders the root is listed as one flat listing (fewer requests).",
    )

    def location(self) -> storage.Location:
        return storage.resolve(resolved(self.uri), setting="FRUIT_IMAGES_URI")

    def list_images(self) -> listing.ImageListing:
        """Every image under FRUIT_IMAGES_URI; raises listing.ImageListingError naming it."""
        return listing.list_images(
            self.location(), concurrency=self.list_concurrency,
            max_folder_listings=self.max_folder_listings, setting="FRUIT_IMAGES_URI",
        )

    def setup_for_execution(self, context) -> None:
        self.log_settings(context)
        # Refuse a malformed URI, a missing bucket or refused credentials before any work starts.
        storage.check_reachable(self.location(), "FRUIT_IMAGES_URI")


class FeatureModel(FromEnvironment, ConfigurableResource):
    """The MobileNetV2 feature extractor and how Spark runs it."""

    SETTINGS: ClassVar[dict[str, Setting]] = {
        "weights": Setting("FRUIT_MODEL_WEIGHTS", "imagenet"),
        "runtime": Setting("FRUIT_MODEL_RUNTIME", FeaturizeSettings.runtime),
        "batch_size": Setting("FRUIT_MODEL_BATCH_SIZE", FeaturizeSettings.batch_size, whole(1)),
        "partitions": Setting("FRUIT_FEATURIZE_PARTITIONS", 0, whole(0)),
        "max_skipped_fraction": Setting("FRUIT_MAX_SKIPPED_FRACTION", 0.1, fraction),
    }
    RESOURCE_KEY: ClassVar[str] = "feature_model"

    weights: str | None = Field(
        default=None,
        description="'imagenet' (Keras download/cache), a path to a MobileNetV2 .h5 weights file (with or "
        "without top), or 'random[:seed]' (deterministic, NOT meaningful). Null: FRUIT_MODEL_WEIGHTS, else imagenet.",
    )
    runtime: str | None = Field(
        default=None,
        description="'onnxruntime' (the Keras model converted to ONNX once on the driver, cached by weights "
        "fingerprint; workers run ONNX Runtime and never import TensorFlow) or 'tensorflow' (workers rebuild the "
        "Keras model and run it as a frozen TensorFlow graph). Both exact fp32. Null: FRUIT_MODEL_RUNTIME, else onnxruntime.",
    )
    batch_size: int | None = Field(
        default=None, ge=1,
        description="Images per model call inside a Spark task. Null: FRUIT_MODEL_BATCH_SIZE, else 4.",
    )
    partitions: int | None = Field(
        default=None, ge=0,
        description="Spark partitions to featurize in; 0 = one per core. Null: FRUIT_FEATURIZE_PARTITIONS, else 0.",
    )
    intra_op_threads: int = Field(
        default=FeaturizeSettings.intra_op_threads, ge=1,
        description="Intra-op threads of the runtime in each Spark Python worker (Spark runs one worker per core).",
    )
    onnx_providers: list[str] = Field(
        default=list(FeaturizeSettings.onnx_providers),
        description="ONNX Runtime execution providers, in order of preference; a GPU cluster with onnxruntime-gpu "
        "can use ['CUDAExecutionProvider', 'CPUExecutionProvider'].",
    )
    max_skipped_fraction: float | None = Field(
        default=None, ge=0, le=1,
        description="Fail the run when more than this fraction of the images cannot be featurized (they are "
        "skipped and listed either way). Null: FRUIT_MAX_SKIPPED_FRACTION, else 0.1.",
    )

    def weights_source(self):
        from fruit_assets.ml.model import parse_weights_setting

        return parse_weights_setting(resolved(self.weights), setting_name="FRUIT_MODEL_WEIGHTS")

    def featurize_settings(self) -> FeaturizeSettings:
        return FeaturizeSettings(
            runtime=resolved(self.runtime).strip().lower(),
            batch_size=resolved(self.batch_size),
            intra_op_threads=self.intra_op_threads,
            onnx_providers=tuple(self.onnx_providers),
        )

    def uses_staged_model(self) -> bool:
        """Whether this step reads the ONNX model the host staged (on a Databricks cluster, runtime
        onnxruntime) instead of resolving the weights and converting the model itself."""
        return on_cluster() and self.featurize_settings().runtime == "onnxruntime"

    def feature_extractor(self) -> PreparedModel:
        """The model to featurize with: on a Databricks cluster (runtime onnxruntime), the one the host
        staged (ml/staged_model.py: no TensorFlow here); everywhere else, resolved and converted here."""
        if self.uses_staged_model():
            from fruit_assets.ml.staged_model import load_staged_from_environment

            return load_staged_from_environment()
        return prepare_feature_extractor(self.weights_source(), self.featurize_settings())

    def setup_for_execution(self, context) -> None:
        self.log_settings(context)
        # An unusable FRUIT_MODEL_WEIGHTS or runtime setting fails the step before any work. On a
        # cluster with the staged ONNX model the weights are the host's business (a weights file is a
        # path on the host), and only ONNX Runtime is needed.
        settings = self.featurize_settings()
        check_runtime(settings.runtime)
        if on_cluster():
            # The libraries of the runtime this resource resolved (cluster_preflight only sees the
            # cluster's FRUIT_MODEL_RUNTIME, which the host's setting does not reach).
            from fruit_assets.databricks.preflight import check_libraries

            check_libraries(settings.runtime)
        staged = self.uses_staged_model()
        if not staged:
            self.weights_source()
        if settings.runtime == "onnxruntime":
            from fruit_assets.ml.onnx_model import check_providers, require_packages

            require_packages(runtime_only=staged)
            check_providers(settings.onnx_providers)


class LocalSpark(FromEnvironment, PySparkResource):
    """The local Spark session (deployment `local`): our settings, then `spark_config` over them. It
    starts Spark quietly (see `plumbing/quiet.py`) and logs where the Spark UI is."""

    SETTINGS: ClassVar[dict[str, Setting]] = {"master": Setting("FRUIT_SPARK_MASTER", DEFAULT_SPARK_MASTER)}
    RESOURCE_KEY: ClassVar[str] = "pyspark"

    master: str | None = Field(
        default=None,
        description="Spark master. Null: FRUIT_SPARK_MASTER, else local[*,4] (all cores; a failed task is "
        "tried up to 4 times).",
    )
    driver_memory: str = Field(default="4g", description="spark.driver.memory.")
    spark_config: dict[str, Any] = Field(
        default_factory=dict,
        description="More Spark settings (\"spark.ui.enabled\": \"false\", ...), applied over the others: "
        "naming one keeps the rest.",
    )

    def session_config(self) -> dict[str, str]:
        extra = {key: str(value) for key, value in self.spark_config.items()}
        return local_spark_config(self.master, self.driver_memory) | extra

    def session(self):
        """The process's Spark session, started with these settings if there is none yet."""
        return quiet.spark_session(self.session_config())

    def setup_for_execution(self, context) -> None:
        self.log_settings(context)
        session = self._spark_session = self.session()
        url = ui_url(session)  # None on Spark Connect
        log = getattr(context, "log", None)
        if url and log is not None:
            log.info(f"Spark UI: {url}")


def with_task_retries(master: str) -> str:
    """`local` and `local[N]` give a failed task one attempt (local mode ignores spark.task.maxFailures);
    they become `local[N,4]`, as a cluster would retry. Other masters are left as they are."""
    match = _PLAIN_LOCAL_MASTER.match(master.strip())
    return f"local[{match.group(1) or 1},{SPARK_TASK_ATTEMPTS}]" if match else master


def local_spark_config(master: str | None = None, driver_memory: str = "4g") -> dict[str, str]:
    config = {
        # local[N,F]: plain local[N] never retries a failed task; F=4 attempts lets a Python worker
        # that dies (killed, out of memory) be replaced, and a task that met an S3 fault run again.
        "spark.master": with_task_retries(master or os.environ.get("FRUIT_SPARK_MASTER") or DEFAULT_SPARK_MASTER),
        "spark.app.name": "fruit_assets",
        "spark.driver.memory": driver_memory,
        "spark.python.worker.reuse": "true",  # keep workers, and the model each one built, across tasks
        # Workers import pyspark from its installed package, with its bytecode, not from pyspark.zip.
        spark_worker_daemon.DAEMON_SETTING: spark_worker_daemon.__name__,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "1024",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.showConsoleProgress": "false",
    }
    java_options = quiet.spark_java_options()  # Spark's log: warnings and errors, no start-up chatter
    return config | ({"spark.driver.extraJavaOptions": java_options} if java_options else {})


def deployment_name(deployment: str | None = None) -> str:
    """The deployment to run as: `deployment`, else FRUIT_DEPLOYMENT, else `local`."""
    name = (deployment or os.environ.get("FRUIT_DEPLOYMENT") or "local").strip().lower()
    if name not in SPARK_BY_DEPLOYMENT:
        raise ValueError(f"FRUIT_DEPLOYMENT={name!r} is not a known deployment; use one of: {', '.join(SPARK_BY_DEPLOYMENT)}")
    return name


def _local_spark() -> dict:
    # Read when the local SparkContext starts: bind Spark to loopback rather than guessing a
    # public interface, and run Python workers (UDFs, data sources) with this interpreter, the
    # one that has TensorFlow; pyspark takes it from PYSPARK_PYTHON, not from spark.pyspark.python.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Spark assets run in-process locally.
    return {"pyspark": LocalSpark(), "step_launcher": ResourceDefinition.none_resource()}


def on_cluster() -> bool:
    """Whether this process is a step the launcher runs on a Databricks cluster (it sets FRUIT_DEPLOYMENT)."""
    return os.environ.get("FRUIT_DEPLOYMENT", "").strip().lower() == "databricks_cluster"


def _databricks_host() -> dict:
    _require_s3("FRUIT_STORAGE_URI", "databricks")
    _require_s3("FRUIT_IMAGES_URI", "databricks")
    # Lazy: the host only launches the Spark steps, it must not start a Spark session of its own.
    return {
        "pyspark": LazyPySparkResource(spark_config={}),
        "step_launcher": step_launcher().configured(databricks_launcher_config()),
    }


def step_launcher() -> ResourceDefinition:
    """dagster-databricks' `databricks_pyspark_step_launcher`, which stages the feature model on the host
    before it launches a step that featurizes (databricks/launcher.py), and whose start (once per step, on
    the host, before anything is uploaded) first checks that the workspace has the DBFS root it stages files on
    (databricks/workspace.py): without one, the step fails saying so, instead of a bare 403 on upload."""
    from dagster_databricks import databricks_pyspark_step_launcher

    from fruit_assets.databricks.launcher import StagingStepLauncher
    from fruit_assets.databricks.workspace import require_dbfs_root

    def launcher(context):
        # dagster-databricks' own launcher (its resource function constructs it from the same config),
        # which stages the ONNX model on the host before each launch (databricks/launcher.py).
        started = StagingStepLauncher(**context.resource_config)
        client = started.databricks_runner.client.workspace_client
        require_dbfs_root(client.dbfs, started.databricks_host, started.staging_prefix)
        return started

    return ResourceDefinition(
        resource_fn=launcher,
        config_schema=databricks_pyspark_step_launcher.config_schema,
        description=databricks_pyspark_step_launcher.description,
    )


def _databricks_cluster() -> dict:
    # The step the launcher runs on the cluster: the session is the cluster's, no launcher. Before
    # anything else, the runtime and every library the step imports are checked (one message for all).
    from fruit_assets.databricks.preflight import cluster_preflight

    cluster_preflight()
    _require_s3("FRUIT_STORAGE_URI", "databricks_cluster")
    _require_s3("FRUIT_IMAGES_URI", "databricks_cluster")
    ship_package_to_executors()
    return {"pyspark": LazyPySparkResource(spark_config={}), "step_launcher": ResourceDefinition.none_resource()}


def ship_package_to_executors() -> str | None:
    """Give the cluster's Spark executors this package: the step launcher puts it on the driver only
    (databricks_step_main extracts code.zip into a temporary folder and calls `site.addsitedir`), so
    every Spark Python worker that unpickles a function of the package (the featurization UDF, the PCA's
    statistics) would fail with `ModuleNotFoundError: No module named 'fruit_assets'`. Found when the
    workspace emulator began to run the runtime's own Python (issue 22), whose workers no longer saw
    the checkout. The package, as the driver has it, is zipped (named by its content, so a second step
    on the same all-purpose cluster adds the same file) and `addPyFile`d: Spark copies it to every
    executor and puts it on its Python workers' path. Nothing happens without an active Spark session."""
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is None:
        return None
    package = PACKAGE
    files = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha256(b"".join(str(p.relative_to(package)).encode() + p.read_bytes() for p in files)).hexdigest()[:12]
    archive = Path(tempfile.gettempdir()) / f"fruit_assets_executors_{digest}" / "fruit_assets.zip"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        partial = archive.with_name(f".fruit_assets.{os.getpid()}.zip")
        with zipfile.ZipFile(partial, "w") as zipped:
            for path in files:
                zipped.write(path, str(Path("fruit_assets") / path.relative_to(package)))
        os.replace(partial, archive)
    session.sparkContext.addPyFile(str(archive))
    return str(archive)


def _databricks_pipes_host() -> dict:
    from fruit_assets.databricks.pipes.host import DatabricksPipes

    _require_s3("FRUIT_STORAGE_URI", "databricks_pipes")
    _require_s3("FRUIT_IMAGES_URI", "databricks_pipes")
    return {"databricks_pipes": DatabricksPipes(), "step_launcher": ResourceDefinition.none_resource()}


# The deployment switch: what differs between deployments is how Spark runs. Functions, because
# building a deployment's resources reads its settings (and checks them) only when it is chosen.
SPARK_BY_DEPLOYMENT = {
    "local": _local_spark,  # the embedded default: local Spark, local folders or S3
    "databricks": _databricks_host,  # Spark steps sent to a Databricks cluster by the step launcher
    "databricks_cluster": _databricks_cluster,  # set by the launcher for the step on the cluster
    "databricks_pipes": _databricks_pipes_host,  # Spark assets as Databricks runs through Dagster Pipes
}


def build_resources(deployment: str | None = None) -> dict:
    """Resources for a deployment (FRUIT_DEPLOYMENT, default `local`): the shared ones, and Spark's."""
    name = deployment_name(deployment)
    quiet.configure_environment()  # before anything starts TensorFlow or the Spark JVM
    # Constructed without values: every setting is resolved from its FRUIT_* variable (or default)
    # when a run builds the resource, so run config overrides only the keys it names. The IO manager
    # gets the run's `storage` resource itself (configured at launch), so run config for `storage`
    # reaches it too: a nested resource built in place would have only its own defaults.
    store = Storage.configure_at_launch()
    shared = {
        "storage": store,
        "io_manager": DeltaIOManager(storage=store),
        "images": ImageSource(),
        "feature_model": FeatureModel(),
    }
    return shared | SPARK_BY_DEPLOYMENT[name]()


def _require_s3(setting: str, deployment: str) -> None:
    if not os.environ.get(setting, "").startswith("s3://"):
        raise ValueError(
            f"FRUIT_DEPLOYMENT={deployment} needs {setting}=s3://bucket/prefix: a Databricks cluster "
            "cannot see this machine's folders"
        )


def databricks_launcher_config() -> dict:
    """Settings of `databricks_pyspark_step_launcher`: our defaults, overridden by the YAML file named
    by FRUIT_DATABRICKS_CONFIG (cluster spec, libraries, storage secret scope, ...: any key the
    launcher takes). The workspace host and token come from DATABRICKS_HOST and DATABRICKS_TOKEN, or
    an OAuth service principal given as `oauth_credentials` in the file."""
    settings = _launcher_file()
    forwarded = {name: os.environ[name] for name in FORWARDED_TO_CLUSTER if os.environ.get(name)}
    config = {
        "databricks_host": {"env": "DATABRICKS_HOST"},
        # By reference: a literal token would be pickled into the step files uploaded to DBFS.
        "databricks_token": {"env": "DATABRICKS_TOKEN"},
        "local_pipeline_package_path": staged_package(),
        "staging_prefix": "/dagster_staging/fruit_assets",
        "secrets_to_env_variables": [],
        "wait_for_logs": True,
        "poll_interval_sec": 5,
        **settings,
        "env_variables": forwarded | settings.get("env_variables", {}) | {"FRUIT_DEPLOYMENT": "databricks_cluster"},
    }
    if "oauth_credentials" in settings:
        config.pop("databricks_token")
    poll = os.environ.get(POLL_SETTING, "").strip()
    if poll:  # one setting over the file's: the tests poll their local emulator often
        try:
            config["poll_interval_sec"] = float(poll)
        except ValueError:
            raise ValueError(f"{POLL_SETTING}={poll!r} must be a number of seconds") from None
    return config


def _launcher_file() -> dict:
    """The YAML file named by FRUIT_DATABRICKS_CONFIG, checked: a mapping with a supported cluster."""
    import yaml

    path = os.environ.get("FRUIT_DATABRICKS_CONFIG", "").strip()
    if not path:
        raise ValueError(
            "FRUIT_DEPLOYMENT=databricks needs FRUIT_DATABRICKS_CONFIG: the path of a YAML file with the "
            "step launcher settings (see README, 'Run on Databricks')"
        )
    try:
        with open(path) as handle:
            settings = yaml.safe_load(handle) or {}
    except OSError as error:
        raise ValueError(f"FRUIT_DATABRICKS_CONFIG={path!r} cannot be read: {error.strerror}") from None
    if not isinstance(settings, dict) or "run_config" not in settings:
        raise ValueError(f"FRUIT_DATABRICKS_CONFIG={path!r} must be a YAML mapping with at least run_config.cluster")
    check_cluster_runtime(settings["run_config"], path)
    return settings


# How often the host reads a cluster step's state and events, over the file's `poll_interval_sec`.
POLL_SETTING = "FRUIT_DATABRICKS_POLL_SECONDS"


def check_cluster_runtime(run_config: Any, path: str) -> None:
    """A new cluster's `spark_version` must be a supported runtime (databricks/runtimes.py): refused here,
    when the host reads the YAML, before any job is submitted. An existing cluster's runtime is not in
    the file; the step checks it when it starts on the cluster (databricks/preflight.py)."""
    from fruit_assets.databricks.runtimes import runtime_for_spark_version

    cluster = run_config.get("cluster") if isinstance(run_config, dict) else None
    new = cluster.get("new") if isinstance(cluster, dict) else None
    if isinstance(new, dict):
        runtime_for_spark_version(new.get("spark_version"), f"run_config.cluster.new.spark_version in {path}")




def staged_package() -> str:
    """A folder holding only a clean copy of the `fruit_assets` package, for the launcher to zip.

    Zipping the checkout would ship .venv and data/ (the launcher's default excludes match `venv`,
    not `.venv`), and its `.*pytest.*` exclude empties the zip under pytest's temporary folders."""
    source = PACKAGE
    files = sorted(p for p in source.rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"fruit_assets_code_{digest}"
    if not (target / "fruit_assets").exists():
        staging = Path(tempfile.mkdtemp(prefix="fruit_assets_code_"))
        for path in files:
            destination = staging / "fruit_assets" / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
        try:
            staging.rename(target)
        except OSError:  # another process staged the same code meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)
