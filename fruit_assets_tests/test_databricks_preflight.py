"""Databricks before any work: the supported runtimes (host and cluster side), the cluster step's library
preflight, the repository's databricks.yaml (the README shows it verbatim), and a workspace without DBFS
root. Unit-level: no Spark, no S3; the emulator only as an HTTP server."""

import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from fruit_assets.databricks import preflight, runtimes
from fruit_assets.databricks.runtimes import SUPPORTED_RUNTIMES, UnsupportedRuntimeError

REPO = Path(__file__).resolve().parents[1]
DATABRICKS_YAML = REPO / "databricks.yaml"
OLD_RUNTIME = "13.3.x-scala2.12"


def assert_names_runtime_and_supported(text: str, runtime: str) -> None:
    assert runtime in text
    for supported in SUPPORTED_RUNTIMES:
        assert supported.name in text and supported.spark_version in text


# ---------------------------------------------------------------- runtimes


def test_an_unsupported_spark_version_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(UnsupportedRuntimeError) as refused:
        runtimes.runtime_for_spark_version(OLD_RUNTIME)
    assert_names_runtime_and_supported(str(refused.value), OLD_RUNTIME)
    for runtime in SUPPORTED_RUNTIMES:
        assert runtimes.runtime_for_spark_version(runtime.spark_version) is runtime
    with pytest.raises(UnsupportedRuntimeError, match="spark_version is missing"):
        runtimes.runtime_for_spark_version(None)


def test_the_cluster_refuses_an_unsupported_databricks_runtime_version():
    assert runtimes.runtime_for_environment("17.3").name == "17.3 LTS"
    assert runtimes.runtime_for_environment("18").name == "18 LTS"  # "18" and "18.0" alike
    with pytest.raises(UnsupportedRuntimeError) as refused:
        preflight.cluster_preflight({"DATABRICKS_RUNTIME_VERSION": "13.3"})
    assert_names_runtime_and_supported(str(refused.value), "DATABRICKS_RUNTIME_VERSION=13.3")


def test_the_host_refuses_the_yaml_of_an_unsupported_runtime_when_it_reads_it(tmp_path, monkeypatch):
    from fruit_assets.resources import databricks_launcher_config

    settings = yaml.safe_load(DATABRICKS_YAML.read_text())
    settings["run_config"]["cluster"]["new"]["spark_version"] = OLD_RUNTIME
    path = tmp_path / "databricks.yaml"
    path.write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("FRUIT_DATABRICKS_CONFIG", str(path))
    with pytest.raises(UnsupportedRuntimeError) as refused:
        databricks_launcher_config()
    assert_names_runtime_and_supported(str(refused.value), OLD_RUNTIME)
    assert str(path) in str(refused.value)

    monkeypatch.setenv("FRUIT_DATABRICKS_CONFIG", str(DATABRICKS_YAML))
    assert databricks_launcher_config()["run_config"]["cluster"]["new"]["spark_version"] == "17.3.x-scala2.13"


# ---------------------------------------------------------------- preflight


def test_the_poll_interval_setting_overrides_the_files_and_a_bad_value_names_it(monkeypatch):
    from fruit_assets.resources import POLL_SETTING, databricks_launcher_config

    monkeypatch.setenv("FRUIT_DATABRICKS_CONFIG", str(DATABRICKS_YAML))
    assert databricks_launcher_config()["poll_interval_sec"] == 2  # the file's
    monkeypatch.setenv(POLL_SETTING, "0.5")
    assert databricks_launcher_config()["poll_interval_sec"] == 0.5
    monkeypatch.setenv(POLL_SETTING, "often")
    with pytest.raises(ValueError, match=f"{POLL_SETTING}='often' must be a number of seconds"):
        databricks_launcher_config()


def test_preflight_lists_every_missing_or_incompatible_library_with_its_libraries_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # blocked: "not installed"
    fake = {"deltalake": "1.1.4", "pandas": "3.0.1"}  # too old; too new (pyspark 4 has no pandas 3)

    def version_of(requirement):
        return fake.get(requirement.distributions[0]) or preflight.installed_version(requirement)

    with pytest.raises(preflight.PreflightError) as failed:
        preflight.cluster_preflight({"DATABRICKS_RUNTIME_VERSION": "17.3"}, version_of=version_of)
    text = str(failed.value)
    assert "3 libraries are missing or incompatible" in text
    assert "onnxruntime: not installed" in text
    assert "deltalake: 1.1.4 installed, needs >= 1.6" in text
    assert "pandas: 3.0.1 installed, needs >= 2.2, < 3" in text
    for line in ('{"pypi": {"package": "onnxruntime==1.32.0"}}', '{"pypi": {"package": "deltalake==1.6.6"}}',
                 '{"pypi": {"package": "pandas==2.3.3"}}'):
        assert line in text
    assert "numpy" not in text and "tf2onnx" not in text  # only the problems


def test_the_cluster_deployment_runs_the_preflight_before_building_anything(monkeypatch):
    """What a step does first on the cluster (FRUIT_DEPLOYMENT=databricks_cluster, set by the launcher):
    building its resources runs the preflight, so an import-time failure with the whole message, which the
    launcher brings back as the remote traceback."""
    from fruit_assets.resources import build_resources

    monkeypatch.setenv("FRUIT_STORAGE_URI", "s3://bucket/assets")
    monkeypatch.setenv("FRUIT_IMAGES_URI", "s3://bucket/images")
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "17.3")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(preflight.PreflightError, match=re.escape('{"pypi": {"package": "onnxruntime==1.32.0"}}')):
        build_resources("databricks_cluster")
    monkeypatch.setenv("DATABRICKS_RUNTIME_VERSION", "13.3")
    with pytest.raises(UnsupportedRuntimeError, match="DATABRICKS_RUNTIME_VERSION=13.3"):
        build_resources("databricks_cluster")


def test_preflight_passes_here_without_importing_what_it_checks():
    before = set(sys.modules)
    preflight.cluster_preflight({"DATABRICKS_RUNTIME_VERSION": "18.0"})
    assert not {"tensorflow", "onnxruntime", "tf2onnx", "deltalake"} & (set(sys.modules) - before)


def yaml_libraries(settings: dict) -> dict[str, str]:
    packages = [library["pypi"]["package"] for library in settings["run_config"]["libraries"]]
    return dict(package.split("==") for package in packages)


def runtime_with_libraries(runtime, libraries: dict[str, str]):
    """Probes for `problems`: a cluster of this runtime (its Python libraries, from the table) with these
    pypi libraries installed over them."""
    shipped = {"numpy": runtime.numpy, "pandas": runtime.pandas, "pyarrow": runtime.pyarrow, "pillow": runtime.pillow,
               "pyspark": runtime.spark, **({"deltalake": runtime.deltalake} if runtime.deltalake else {})}
    installed = shipped | libraries

    def version_of(requirement):
        return next((installed[name] for name in requirement.distributions if name in installed), None)

    return {"present": lambda module: module == "pyspark.sql.datasource" or any(
        version_of(r) for r in preflight.requirements_for("onnxruntime") if r.module == module), "version_of": version_of}


@pytest.mark.parametrize("dropped", ["deltalake", "onnxruntime"])
@pytest.mark.parametrize("runtime", SUPPORTED_RUNTIMES, ids=lambda r: r.version)
def test_the_repository_yaml_gives_each_supported_runtime_every_library_and_dropping_one_is_named(runtime, dropped):
    libraries = yaml_libraries(yaml.safe_load(DATABRICKS_YAML.read_text()))
    requirements = preflight.requirements_for("onnxruntime")
    assert preflight.problems(requirements, **runtime_with_libraries(runtime, libraries)) == []

    without = {name: version for name, version in libraries.items() if name != dropped}
    found = preflight.problems(requirements, **runtime_with_libraries(runtime, without))
    assert [problem.requirement.module for problem in found] == [dropped]
    text = preflight.message(found)
    assert f"  - {dropped}: " in text and f'{{"pypi": {{"package": "{dropped}==' in text


def test_the_cluster_needs_no_tensorflow_tf2onnx_or_onnx_unless_it_runs_tensorflow():
    """The host converts the model and stages it (databricks/launcher.py): with the default runtime a cluster
    step checks, and the YAML installs, none of the converter's packages."""
    converter = {"tensorflow", "tf2onnx", "onnx", "keras"}
    assert not converter & {r.module for r in preflight.requirements_for("onnxruntime")}
    libraries = yaml_libraries(yaml.safe_load(DATABRICKS_YAML.read_text()))
    assert not {"tensorflow", "tensorflow-cpu", "tf2onnx", "onnx", "keras"} & set(libraries)
    assert "onnxruntime" in libraries
    assert "tensorflow" in {r.module for r in preflight.requirements_for("tensorflow")}
    assert "onnxruntime" not in {r.module for r in preflight.requirements_for("tensorflow")}


def test_the_pins_offered_are_the_tested_ones():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = dict(dependency.split("==") for dependency in project["dependencies"])
    for requirement in preflight.BASE + preflight.ONNX + preflight.TENSORFLOW:
        if requirement.pin:
            assert pinned[requirement.distributions[0]] == requirement.pin, requirement
    for package, version in yaml_libraries(yaml.safe_load(DATABRICKS_YAML.read_text())).items():
        assert pinned[package] == version, package


# ---------------------------------------------------------------- one YAML


def test_the_readme_shows_the_repository_databricks_yaml_verbatim():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run on Databricks (AWS)", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert match, "no yaml block in README's 'Run on Databricks (AWS)'"
    block = match.group(1)
    assert block == DATABRICKS_YAML.read_text()
    cluster = yaml.safe_load(block)["run_config"]["cluster"]["new"]
    assert cluster["spark_version"] == runtimes.DEFAULT_RUNTIME.spark_version


# ---------------------------------------------------------------- a workspace without DBFS root


def test_a_workspace_without_dbfs_root_refuses_and_the_launcher_says_what_it_means(tmp_path, monkeypatch):
    import dagster
    from databricks.sdk.errors import PermissionDenied

    from fruit_assets.databricks.workspace import NoDbfsRootError
    from fruit_assets.resources import databricks_launcher_config, step_launcher
    from fruit_assets_dev.databricks_emulator import DatabricksEmulator

    with DatabricksEmulator(tmp_path / "workspace", dbfs_root=False) as workspace:
        with pytest.raises(PermissionDenied, match="Public DBFS root is disabled. Access is denied on path: /x"):
            workspace.workspace_client().dbfs.create("/x", overwrite=True)

        monkeypatch.setenv("DATABRICKS_HOST", workspace.url)
        monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
        monkeypatch.setenv("FRUIT_DATABRICKS_CONFIG", str(DATABRICKS_YAML))
        launcher = step_launcher().configured(databricks_launcher_config())
        with pytest.raises(dagster.DagsterResourceFunctionError) as failed:
            with dagster.build_resources({"step_launcher": launcher}):
                pass
        error = failed.value.__cause__
        assert isinstance(error, NoDbfsRootError)
        text = str(error)
        assert f"The Databricks workspace {workspace.url} has no DBFS root" in text
        assert "Public DBFS root is disabled" in text and "dbfs:/dagster_staging/fruit_assets" in text
        assert "disable_legacy_dbfs" in text and "Config:" not in text and workspace.token not in text
        assert "Use FRUIT_DEPLOYMENT=databricks_pipes instead" in text and "databricks_pipes.yaml" in text
        # One call, before anything is uploaded or submitted.
        assert [(r.path, r.status) for r in workspace.request_log] == [("/api/2.0/dbfs/create", 403),
                                                                        ("/api/2.0/dbfs/get-status", 403)]

    with DatabricksEmulator(tmp_path / "with_root") as workspace:  # a workspace with its DBFS root: no error
        monkeypatch.setenv("DATABRICKS_HOST", workspace.url)
        monkeypatch.setenv("DATABRICKS_TOKEN", workspace.token)
        with dagster.build_resources({"step_launcher": step_launcher().configured(databricks_launcher_config())}):
            pass
        assert [(r.path, r.status) for r in workspace.request_log] == [("/api/2.0/dbfs/get-status", 404)]
