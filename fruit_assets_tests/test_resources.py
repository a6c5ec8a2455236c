"""Resource settings (issue 16): run config overrides only the keys it names; every other key keeps
its value from its FRUIT_* variable. A bad variable value fails with an error that names it."""

import re

import pytest
from dagster import AssetExecutionContext, asset, materialize

from fruit_assets.resources import build_resources
from fruit_assets_tests.support import failure_text


@asset(required_resource_keys={"feature_model", "storage", "images", "io_manager"})
def settings_seen(context: AssetExecutionContext) -> None:
    """Records the settings the run's resources were built with."""
    model, store = context.resources.feature_model, context.resources.storage
    context.add_output_metadata(
        {
            "weights": model.weights,
            "runtime": model.runtime,
            "batch_size": model.batch_size,
            "max_skipped_fraction": model.max_skipped_fraction,
            "base_uri": store.base_uri,
            "retention_hours": store.retention_hours,
            "io_manager_retention_hours": context.resources.io_manager.storage.retention_hours,
            "images_uri": context.resources.images.uri,
        }
    )


def _materialize(run_config: dict, raise_on_error: bool = True):
    resources = build_resources("local")
    del resources["pyspark"], resources["step_launcher"]  # not needed: no Spark for this asset
    return materialize([settings_seen], resources=resources, run_config=run_config, raise_on_error=raise_on_error)


def _run(run_config: dict) -> dict:
    result = _materialize(run_config)
    [event] = result.get_asset_materialization_events()
    return {key: value.value for key, value in event.materialization.metadata.items()}


@pytest.fixture
def environment(monkeypatch, tmp_path):
    (tmp_path / "images" / "Apple").mkdir(parents=True)
    settings = {
        "FRUIT_MODEL_WEIGHTS": "random:3",
        "FRUIT_MODEL_BATCH_SIZE": "7",
        "FRUIT_STORAGE_URI": str(tmp_path / "assets"),
        "FRUIT_IMAGES_URI": str(tmp_path / "images"),
        "FRUIT_RETENTION_HOURS": "24",
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    return settings


def test_run_config_naming_one_field_keeps_the_others_from_the_environment(environment):
    seen = _run(
        {
            "resources": {
                "feature_model": {"config": {"max_skipped_fraction": 0.5}},
                "storage": {"config": {"retention_hours": 5}},
            }
        }
    )
    assert seen["max_skipped_fraction"] == 0.5
    assert seen["weights"] == "random:3"  # the EnvVar resources went back to imagenet here
    assert seen["batch_size"] == 7
    assert seen["runtime"] == "onnxruntime"  # documented default
    assert seen["retention_hours"] == 5
    assert seen["io_manager_retention_hours"] == 5  # the IO manager uses the same, configured storage
    assert seen["base_uri"] == environment["FRUIT_STORAGE_URI"]
    assert seen["images_uri"] == environment["FRUIT_IMAGES_URI"]


def test_without_run_config_every_setting_comes_from_the_environment(environment):
    seen = _run({})
    assert (seen["weights"], seen["batch_size"], seen["max_skipped_fraction"]) == ("random:3", 7, 0.1)
    assert (seen["retention_hours"], seen["io_manager_retention_hours"]) == (24, 24)


# Where each bad value surfaces: the model's settings when the code location loads (build_resources
# resolves them), the storage's when the run starts (it is configured at launch and fails resource
# initialisation).
@pytest.mark.parametrize(
    ("variable", "value", "surfaces"),
    [
        ("FRUIT_MODEL_BATCH_SIZE", "many", "at load"),
        ("FRUIT_MODEL_BATCH_SIZE", "0", "at load"),
        ("FRUIT_MAX_SKIPPED_FRACTION", "2", "at load"),
        ("FRUIT_RETENTION_HOURS", "-1", "at run start"),
        ("FRUIT_FEATURIZE_PARTITIONS", "1.5", "at load"),
    ],
)
def test_a_bad_variable_value_gives_an_error_naming_the_variable(monkeypatch, variable, value, surfaces):
    """The error says which variable and what it expects, where the value is read."""
    monkeypatch.setenv(variable, value)
    expected = f"{variable}='{value}' is not (a whole number|a number from 0 to 1)"
    if surfaces == "at load":
        with pytest.raises(ValueError, match=expected):
            build_resources("local")
    else:
        result = _materialize({}, raise_on_error=False)
        assert not result.success
        assert re.search(expected, failure_text(result)), failure_text(result)
