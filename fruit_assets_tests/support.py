"""Helpers the tests share (fixtures are in conftest): resources pointed at test folders, runs, and
readers of the stored assets as users read them."""

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from dagster import materialize

TEST_WEIGHTS = "random:0"
TEST_BUCKET = "fruit-test"


def output_context(**kwargs):
    """`dagster.build_output_context(**kwargs)`, its resources closed at once (these tests give it none).

    Dagster builds a context's resources with an ephemeral instance of its own and keeps them open until
    the context exits; a context that was never entered kept its instance until the interpreter's exit,
    where SQLAlchemy, rolling back a SQLite connection already closed, printed "Cannot operate on a closed
    database" (1 run in 10)."""
    from dagster import build_output_context

    with build_output_context(**kwargs) as context:
        pass
    return context


def input_context(**kwargs):
    """`dagster.build_input_context(**kwargs)`, its resources closed at once (see `output_context`)."""
    from dagster import build_input_context

    with build_input_context(**kwargs) as context:
        pass
    return context


def io_manager(storage_uri, retention_hours: int | None = None):
    """The Delta IO manager over a test storage folder or prefix."""
    from fruit_assets.resources.io_manager import DeltaIOManager
    from fruit_assets.storage.resource import Storage

    extra = {} if retention_hours is None else {"retention_hours": retention_hours}
    return DeltaIOManager(storage=Storage(base_uri=str(storage_uri), **extra))


def local_resources(images_uri, storage_uri, weights: str = TEST_WEIGHTS) -> dict:
    """The embedded-default resources, pointed at test folders."""
    from fruit_assets.resources import FeatureModel, ImageSource, build_resources

    resources = build_resources("local")
    resources["io_manager"] = io_manager(storage_uri)
    resources["storage"] = resources["io_manager"].storage
    resources["images"] = ImageSource(uri=str(images_uri))
    resources["feature_model"] = FeatureModel(weights=weights)
    return resources


@contextmanager
def new_python_workers(spark, **environment):
    """Spark Python functions created inside this block run in a new set of Python workers, with
    `environment` too: Spark keeps one worker daemon per set of worker environment variables, and a
    variable of its own makes a new set. Its workers start cold: no module imported, no model loaded."""
    worker_environment = spark.sparkContext.environment
    saved = dict(worker_environment)
    worker_environment.update({**environment, "FRUIT_TEST_WORKER_SET": uuid.uuid4().hex})
    try:
        yield
    finally:
        worker_environment.clear()
        worker_environment.update(saved)


def materialize_all(resources: dict, selection=None, run_config=None, raise_on_error=True):
    from fruit_assets.definitions import all_assets_and_checks

    return materialize(
        all_assets_and_checks, resources=resources, selection=selection, run_config=run_config, raise_on_error=raise_on_error
    )


def metadata_of(result, asset_name: str) -> dict:
    [event] = [e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == asset_name]
    return {key: value.value for key, value in event.materialization.metadata.items()}


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


# Modules a Databricks cluster step must not import: the host converts the model (databricks/launcher.py).
GUARDED_MODULES = ("tensorflow", "tf2onnx", "onnx", "keras")


def write_import_guard(folder: Path, record: Path) -> Path:
    """A folder to put first on PYTHONPATH, modelling a cluster without GUARDED_MODULES: its
    `sitecustomize` (which Python imports at start-up from the path) puts a finder first on the import
    path that, for any of them, appends the name and the process id to `record` and raises ImportError,
    for an import as for `importlib.util.find_spec` (the preflight's probe). Spark's Python workers get
    the driver's PYTHONPATH, so they are guarded too."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import os, sys\n"
        f"GUARDED = {set(GUARDED_MODULES)!r}\n"
        "class _Guard:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name.split('.')[0] not in GUARDED:\n"
        "            return None\n"
        f"        with open({str(record)!r}, 'a') as record:\n"
        "            record.write(f'{name} {os.getpid()}\\n')\n"
        "        raise ModuleNotFoundError(f'{name} is not installed on this cluster (fruit_assets test guard)', name=name)\n"
        "sys.meta_path.insert(0, _Guard)\n"
    )
    return folder
