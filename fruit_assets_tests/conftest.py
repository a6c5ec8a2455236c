"""Shared test fixtures: one local Spark session and one demo image set per test session.

Everything is real: local Spark, TensorFlow, Dagster runs, files on disk. The model runs with the
deterministic random initialisation (`random:0`) because ImageNet weights cannot be downloaded here.
"""

import os
import sys

import pytest

# Set before any SparkContext starts (see resources.build_resources for why).
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable
# Tests must not pick up a developer's settings, nor ever reach a real AWS account.
for name in list(os.environ):
    if name.startswith(("FRUIT_", "AWS_", "DATABRICKS_")):
        del os.environ[name]

TEST_WEIGHTS = "random:0"
TEST_BUCKET = "fruit-test"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """ONNX conversions of this test session go to a fresh folder, not the user's cache: every session
    converts (and checks) the models it uses at least once."""
    folder = tmp_path_factory.mktemp("model_cache")
    os.environ["FRUIT_MODEL_CACHE"] = str(folder)
    yield folder
    os.environ.pop("FRUIT_MODEL_CACHE", None)


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3 server (SeaweedFS) per test session, on free loopback ports, with a bucket.

    Its AWS_* settings go into os.environ before Spark starts, because Spark's Python workers
    inherit the environment the JVM was started with: that is how they reach S3 too."""
    from fruit_assets.local_s3 import start_local_s3

    server = start_local_s3(data_dir=str(tmp_path_factory.mktemp("s3")), die_with_parent=True)
    try:
        server.create_bucket(TEST_BUCKET)
        os.environ.update(server.env())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def spark(s3):
    from pyspark.sql import SparkSession

    from fruit_assets.resources import local_spark_config

    config = local_spark_config() | {"spark.master": "local[2,4]", "spark.ui.enabled": "false"}
    builder = SparkSession.builder
    for key, value in config.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    from fruit_assets.demo_data import generate_demo_set

    root = tmp_path_factory.mktemp("demo_images")
    generate_demo_set(root)  # 24 labels x 3 images, like the original notebook's sample
    return root


def local_resources(images_uri, storage_uri, weights: str = TEST_WEIGHTS) -> dict:
    """The embedded-default resources, pointed at test folders."""
    from fruit_assets.io_manager import DeltaIOManager
    from fruit_assets.resources import FeatureModel, ImageSource, build_resources

    resources = build_resources("local")
    resources["io_manager"] = DeltaIOManager(base_uri=str(storage_uri))
    resources["images"] = ImageSource(uri=str(images_uri))
    resources["feature_model"] = FeatureModel(weights=weights)
    return resources


def materialize_all(resources: dict, selection=None, run_config=None, raise_on_error=True):
    from dagster import materialize

    from fruit_assets.definitions import all_assets_and_checks

    return materialize(
        all_assets_and_checks, resources=resources, selection=selection, run_config=run_config, raise_on_error=raise_on_error
    )


def metadata_of(result, asset_name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset_name]
    return {key: value.value for key, value in event.materialization.metadata.items()}


@pytest.fixture(scope="session")
def demo_run(spark, demo_images, tmp_path_factory):
    """The whole graph materialized once on the demo set, for the tests that inspect its outputs."""
    storage = tmp_path_factory.mktemp("storage")
    result = materialize_all(local_resources(demo_images, storage))
    return result, storage


def delta_options(uri: str) -> dict:
    """deltalake storage options for a table URI, as a user would write them for the test S3."""
    if not str(uri).startswith("s3://"):
        return {}
    return {"AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_REGION": os.environ["AWS_REGION"], "AWS_ALLOW_HTTP": "true"}


def read_asset(storage, name: str, version: int | None = None):
    """An asset's rows as users read them: a Delta table, with the deltalake package."""
    from deltalake import DeltaTable

    uri = f"{storage}/{name}"
    return DeltaTable(uri, version=version, storage_options=delta_options(uri)).to_pandas()


def private_copy(storage, tmp_path):
    """A copy of a run's storage, for tests that write new versions of its assets."""
    import shutil

    copy = tmp_path / "storage"
    shutil.copytree(storage, copy)
    return copy


def failure_text(result) -> str:
    """Every error message of a failed run: step failures, resource init failures, run failure."""
    texts = []
    for event in result.all_events:
        data = event.event_specific_data
        error = getattr(data, "error", None)
        while error is not None:
            texts.append(error.message)
            error = error.cause
        user_failure = getattr(data, "user_failure_data", None)
        if user_failure is not None:
            texts.append(user_failure.description or "")
    return "\n".join(texts)


def by_image(frame):
    """Index rows by <Label>/<file>, the part of the path that local and S3 runs share."""
    keyed = frame.assign(image=frame.path.str.split("/").str[-2:].str.join("/"))
    return keyed.set_index("image").sort_index()
