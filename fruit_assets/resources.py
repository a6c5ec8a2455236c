"""Configurable resources, and `build_resources`: the one place that picks them per deployment.

Settings come from environment variables, read the Dagster way: a resource field set to
`EnvVar("NAME")` when the variable is set (the UI then shows where the value came from), and to the
documented default otherwise.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from dagster import ConfigurableResource, EnvVar, ResourceDefinition
from dagster_pyspark import PySparkResource
from pydantic import Field

from fruit_assets import storage
from fruit_assets.io_manager import ParquetIOManager

DEPLOYMENTS = ("local",)


def project_data_dir() -> Path:
    """`data/` of the checkout this package runs from, or of the working directory when installed."""
    checkout = Path(__file__).resolve().parent.parent
    base = checkout if (checkout / "pyproject.toml").exists() else Path.cwd()
    return base / "data"


def default_images_uri() -> str:
    return str(project_data_dir() / "demo")


def default_storage_uri() -> str:
    return str(project_data_dir() / "assets")


def env_or_default(name: str, default):
    """`EnvVar(name)` when the variable is set, else the default."""
    return EnvVar(name) if os.environ.get(name) else default


class ImageSource(ConfigurableResource):
    """Where the images are: a folder or s3://bucket/prefix in the Fruits-360 layout <root>/<Label>/<file>."""

    uri: str = Field(description="FRUIT_IMAGES_URI: local folder or s3://bucket/prefix")

    def location(self) -> storage.Location:
        return storage.resolve(self.uri, setting="FRUIT_IMAGES_URI")

    def setup_for_execution(self, context) -> None:
        # Refuse a malformed URI, a missing bucket or refused credentials before any work starts.
        storage.check_reachable(self.location(), "FRUIT_IMAGES_URI")


class FeatureModel(ConfigurableResource):
    """The MobileNetV2 feature extractor and how Spark runs it."""

    weights: str = Field(
        default="imagenet",
        description="FRUIT_MODEL_WEIGHTS: 'imagenet' (Keras download/cache), a path to a MobileNetV2 "
        ".h5 weights file (with or without top), or 'random[:seed]' (deterministic, NOT meaningful)",
    )
    batch_size: int = Field(default=32, description="Images per model call inside a Spark task.")
    partitions: int = Field(default=0, description="Spark partitions to featurize in; 0 = one per core.")
    tf_intra_op_threads: int = Field(default=1, description="TensorFlow threads per Spark Python worker.")
    max_skipped_fraction: float = Field(
        default=0.1,
        description="Fail the run when more than this fraction of the images cannot be featurized "
        "(they are skipped and listed either way).",
    )

    def weights_source(self):
        from fruit_assets.ml.model import parse_weights_setting

        return parse_weights_setting(self.weights, setting_name="FRUIT_MODEL_WEIGHTS")

    def setup_for_execution(self, context) -> None:
        self.weights_source()  # an unusable FRUIT_MODEL_WEIGHTS value fails the step before any work


def weights_fingerprint(weights) -> str:
    """A short content hash of the weight arrays: identifies the model in worker caches and metadata."""
    digest = hashlib.sha256()
    for array in weights:
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def local_spark_config() -> dict[str, str]:
    return {
        # local[N,F]: plain local[N] never retries a failed task; F=4 attempts lets a Python worker
        # that dies (killed, out of memory) be replaced, as on a cluster.
        "spark.master": os.environ.get("FRUIT_SPARK_MASTER", "local[*,4]"),
        "spark.app.name": "fruit_assets",
        "spark.driver.memory": "4g",
        "spark.python.worker.reuse": "true",  # keep workers, and the model each one built, across tasks
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "1024",
        "spark.sql.session.timeZone": "UTC",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
        "spark.ui.showConsoleProgress": "false",
    }


def build_resources(deployment: str | None = None) -> dict:
    """Resources for a deployment (FRUIT_DEPLOYMENT, default `local`)."""
    deployment = (deployment or os.environ.get("FRUIT_DEPLOYMENT") or "local").strip().lower()
    if deployment not in DEPLOYMENTS:
        raise ValueError(
            f"FRUIT_DEPLOYMENT={deployment!r} is not a known deployment; use one of: {', '.join(DEPLOYMENTS)}"
        )
    # Read when the local SparkContext starts: bind Spark to loopback rather than guessing a public
    # interface, and run Python workers (UDFs, data sources) with this interpreter, the one that has
    # TensorFlow; pyspark takes it from PYSPARK_PYTHON, not from the spark.pyspark.python conf.
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return {
        "io_manager": ParquetIOManager(base_uri=env_or_default("FRUIT_STORAGE_URI", default_storage_uri())),
        "images": ImageSource(uri=env_or_default("FRUIT_IMAGES_URI", default_images_uri())),
        "feature_model": FeatureModel(weights=env_or_default("FRUIT_MODEL_WEIGHTS", "imagenet")),
        "pyspark": PySparkResource(spark_config=local_spark_config()),
        # Spark assets run in-process locally; the Databricks deployment puts its step launcher here.
        "step_launcher": ResourceDefinition.none_resource(),
    }
