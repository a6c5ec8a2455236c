"""Preflight of a cluster step: the runtime, and every library the step imports, checked before any work.

A Databricks cluster has the runtime's own Python packages, then the `libraries` of the launcher YAML
pip-installed on top. A missing or too old library would otherwise surface deep inside a Spark task
(onnxruntime on an executor) or at the first Delta commit, after minutes of work, one library at a
time. `cluster_preflight` (called by resources/__init__.py when the step starts on the cluster, before Spark is
used) fails with ONE message naming every such library and the `libraries` line that fixes it.

Dagster-free and import-free: presence is `importlib.util.find_spec` and versions come from the
installed distributions' metadata, so checking never imports TensorFlow or ONNX Runtime.

Minimum versions, and why (tested pins: pyproject.toml; the `pin` of each entry is the line offered):
- numpy 2.1, pandas 2.2, pyarrow 19.0: what the supported runtimes ship (databricks/runtimes.py); the
  package is tested on newer ones, and older majors (numpy 1, pandas 1.5, pyarrow 14/15 on 15.4/16.4)
  are not known to work. pandas stays below 3: pyspark 4 does not support pandas 3.
- pillow 9.1: `Image.Resampling` (ml/images.py). matplotlib 3.5: the `matplotlib.colormaps` registry (pipeline/plots.py).
- deltalake 1.6: the transaction API (`deltalake.transaction.RemoveAction`, `create_table_with_add_actions`,
  `CommitProperties(max_commit_retries=...)`, storage/delta.py) is tested with 1.6.6 only; 18 LTS's
  preinstalled 1.1.4 is not known to have it, so the YAML installs 1.6.6 over it.
- onnxruntime 1.31: the oldest build the README documents (onnxruntime-gpu 1.31.1); tested with 1.32.0.
  With the default runtime that is all the model needs on the cluster: the host, where Dagster runs,
  builds the Keras model, converts it to ONNX and stages it in storage (databricks/launcher.py), so a
  cluster step imports no TensorFlow, tf2onnx or onnx, and none is checked or offered.
- tensorflow 2.21: only with `runtime: tensorflow` (FRUIT_MODEL_RUNTIME), where the driver resolves the
  weights and the executors rebuild the Keras model; the version tested.
- pyspark: the Python data sources (`pyspark.sql.datasource`, Spark 4) that storage/spark_io.py uses;
  no library line fixes that, only a supported runtime.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

from fruit_assets.databricks import runtimes

_NUMBERS = re.compile(r"^(\d+(?:\.\d+)*)")


@dataclass(frozen=True)
class Requirement:
    module: str  # what the code imports
    distributions: tuple[str, ...]  # pip names that provide it (the first is the one to install)
    minimum: str
    pin: str | None  # version for the `libraries` line; None: no library can fix it
    why: str
    below: str | None = None  # first version that is not supported


@dataclass(frozen=True)
class Problem:
    requirement: Requirement
    found: str | None  # the installed version; None: missing

    def describe(self) -> str:
        r = self.requirement
        needed = f">= {r.minimum}" + (f", < {r.below}" if r.below else "")
        state = "not installed" if self.found is None else f"{self.found} installed"
        return f"{r.distributions[0] if r.pin else r.module}: {state}, needs {needed} ({r.why})"

    def library_line(self) -> str | None:
        r = self.requirement
        if r.pin is None:
            return None
        return json.dumps({"pypi": {"package": f"{r.distributions[0]}=={r.pin}"}})


BASE = (
    Requirement("pyspark.sql.datasource", ("pyspark",), "4.0", None,
                "Spark 4 Python data sources read the Delta tables: use a supported runtime"),
    Requirement("numpy", ("numpy",), "2.1", "2.4.6", "features are numpy arrays"),
    Requirement("pandas", ("pandas",), "2.2", "2.3.3", "the Spark pandas UDFs", below="3"),
    Requirement("pyarrow", ("pyarrow",), "19.0", "26.0.1", "S3 access and Parquet files"),
    Requirement("PIL", ("pillow",), "9.1", "13.0.0", "decodes the images"),
    Requirement("matplotlib", ("matplotlib",), "3.5", "3.11.2", "the PCA's explained-variance plot"),
    Requirement("deltalake", ("deltalake",), "1.6", "1.6.6", "commits every Delta table"),
)
# runtime onnxruntime (the default): the host stages the converted model; the cluster only runs it.
ONNX = (
    Requirement("onnxruntime", ("onnxruntime", "onnxruntime-gpu"), "1.31", "1.32.0",
                "the executors run the ONNX model the host staged"),
)
# runtime tensorflow: the driver resolves the weights, the executors rebuild the Keras model.
TENSORFLOW = (
    Requirement("tensorflow", ("tensorflow-cpu", "tensorflow", "tensorflow-gpu"), "2.21", "2.21.0",
                "runtime tensorflow: the driver and the executors build the Keras model"),
)


class PreflightError(RuntimeError):
    """The cluster cannot run the step: every missing or incompatible library, with the fix."""


def requirements_for(model_runtime: str) -> tuple[Requirement, ...]:
    """What a step needs with this inference runtime (FRUIT_MODEL_RUNTIME: onnxruntime or tensorflow)."""
    return BASE + (TENSORFLOW if model_runtime.strip().lower() == "tensorflow" else ONNX)


def _version_tuple(text: str) -> tuple[int, ...]:
    match = _NUMBERS.match(text.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def is_present(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a None entry in sys.modules blocks it)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or blocked
        return False


def installed_version(requirement: Requirement) -> str | None:
    """The version of the first installed distribution providing it; None when none has metadata
    (Databricks' own pyspark is not pip-installed, for example)."""
    for name in requirement.distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def problems(
    requirements: tuple[Requirement, ...],
    present: Callable[[str], bool] = is_present,
    version_of: Callable[[Requirement], str | None] = installed_version,
) -> list[Problem]:
    """Every requirement that is missing or outside its versions, in order."""
    found: list[Problem] = []
    for requirement in requirements:
        if not present(requirement.module):
            found.append(Problem(requirement, None))
            continue
        version = version_of(requirement)
        if version is None or requirement.pin is None:
            continue  # present, and no metadata to judge: the import itself is the test
        numbers = _version_tuple(version)
        too_old = numbers < _version_tuple(requirement.minimum)
        too_new = requirement.below is not None and numbers >= _version_tuple(requirement.below)
        if too_old or too_new:
            found.append(Problem(requirement, version))
    return found


def message(found: list[Problem]) -> str:
    lines = [f"This cluster cannot run the fruit_assets step: {len(found)} librar{'y is' if len(found) == 1 else 'ies are'} "
             "missing or incompatible:"]
    lines += [f"  - {problem.describe()}" for problem in found]
    fixes = [line for line in (problem.library_line() for problem in found) if line]
    if fixes:
        lines.append("Add to run_config.libraries in the launcher YAML (FRUIT_DATABRICKS_CONFIG), replacing any "
                     "other version of the same library:")
        lines += [f"  - {line}" for line in fixes]
    return "\n".join(lines)


def check_libraries(model_runtime: str, **probes) -> None:
    """PreflightError naming every problem, or nothing."""
    found = problems(requirements_for(model_runtime), **probes)
    if found:
        raise PreflightError(message(found))


def cluster_preflight(environ: dict[str, str] | os._Environ = os.environ, **probes) -> None:
    """The checks of a step starting on a cluster: the runtime (DATABRICKS_RUNTIME_VERSION, which every
    Databricks cluster sets), then the libraries for the configured inference runtime."""
    version = environ.get(runtimes.RUNTIME_VARIABLE)
    if version:
        runtimes.runtime_for_environment(version)
    check_libraries(environ.get("FRUIT_MODEL_RUNTIME") or "onnxruntime", **probes)
