"""Databricks before any work: the supported runtimes (host and cluster side), the cluster step's library
preflight, the repository's databricks.yaml (the README shows it verbatim), and a workspace without DBFS
root. Unit-level: no Spark, no S3."""

import sys

import pytest

from fruit_assets import databricks_runtimes, preflight
from fruit_assets.databricks_runtimes import SUPPORTED_RUNTIMES, UnsupportedRuntimeError

OLD_RUNTIME = "13.3.x-scala2.12"


def assert_names_runtime_and_supported(text: str, runtime: str) -> None:
    assert runtime in text
    for supported in SUPPORTED_RUNTIMES:
        assert supported.name in text and supported.spark_version in text


# ---------------------------------------------------------------- runtimes


def test_an_unsupported_spark_version_is_refused_naming_it_and_the_supported_ones():
    with pytest.raises(UnsupportedRuntimeError) as refused:
        databricks_runtimes.runtime_for_spark_version(OLD_RUNTIME)
    assert_names_runtime_and_supported(str(refused.value), OLD_RUNTIME)
    for runtime in SUPPORTED_RUNTIMES:
        assert databricks_runtimes.runtime_for_spark_version(runtime.spark_version) is runtime
    with pytest.raises(UnsupportedRuntimeError, match="spark_version is missing"):
        databricks_runtimes.runtime_for_spark_version(None)


def test_the_cluster_refuses_an_unsupported_databricks_runtime_version():
    assert databricks_runtimes.runtime_for_environment("17.3").name == "17.3 LTS"
    assert databricks_runtimes.runtime_for_environment("18").name == "18 LTS"  # "18" and "18.0" alike
    with pytest.raises(UnsupportedRuntimeError) as refused:
        preflight.cluster_preflight({"DATABRICKS_RUNTIME_VERSION": "13.3"})
    assert_names_runtime_and_supported(str(refused.value), "DATABRICKS_RUNTIME_VERSION=13.3")


# ---------------------------------------------------------------- preflight


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


def test_preflight_passes_here_without_importing_what_it_checks():
    before = set(sys.modules)
    preflight.cluster_preflight({"DATABRICKS_RUNTIME_VERSION": "18.0"})
    assert not {"tensorflow", "onnxruntime", "tf2onnx", "deltalake"} & (set(sys.modules) - before)
