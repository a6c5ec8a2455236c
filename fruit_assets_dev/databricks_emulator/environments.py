"""The emulated Databricks runtimes: one Python environment per (runtime, cluster libraries).

A Databricks cluster runs its runtime's own Python (3.12 on 17.3 LTS and 18 LTS) with the runtime's
packages, then pip-installs the cluster's `pypi` libraries into it, after the runtime's packages: a
library's dependencies may upgrade what the runtime shipped, and pip reports (without failing) the
conflicts it leaves behind (BRIEF, "Databricks runtimes"; https://docs.databricks.com/aws/en/libraries/).
The emulator does the same in a virtual environment:

1. ``uv venv --relocatable --python <python 3.12>``: the runtime's Python (major.minor; the patch
   release is whatever this machine has, e.g. 3.12.1 where 17.3 ships 3.12.3);
2. ``uv pip install`` of the runtime's packages, pinned (``Runtime.python_packages``: pyspark, numpy,
   pandas, pyarrow, pillow, deltalake on 18 LTS, protobuf, grpcio, requests, pyyaml, boto3,
   databricks-sdk), the table of ``fruit_assets/databricks/runtimes.py`` and nothing else;
3. ``uv pip install`` of the libraries on top, in one command, as the cluster's library installer does;
   uv, like pip, keeps an installed package that satisfies the request and upgrades one that does not;
4. ``uv pip check``: conflicts are logged, as pip's "dependency conflicts" warning would be.

pyspark is published as a source package only, and uv 0.13 rebuilt it from source for every
environment (35-60 s each on 2 cores); its wheel is built once per pyspark version with pip (whose cache
keeps built wheels) into a wheelhouse, ``~/.cache/fruit_assets/emulator-wheels`` (XDG_CACHE_HOME respected; or
$FRUIT_EMULATOR_WHEELS), which every install then finds first (``--find-links``).

Environments share the bytecode of the distributions they have in common (`share_bytecode`): the
tasks write bytecode as they import (see below), and without sharing the first task of every environment
compiled dagster, pandas, pyarrow... again (2 CPU-seconds more than the next tasks on a 2-core AMD
EPYC Zen 4, 5 on a Zen 3).

Each environment is cached under the cache root by a key of its runtime's packages, its Python and its
sorted libraries: built once under a file lock (parallel test workers may ask for the same one at the
same time), in a temporary folder that is renamed into place when complete (``--relocatable``: the
environment still works after the rename), so a reader never sees half an environment. A build that
fails leaves nothing behind and raises ``LibraryInstallError`` with the installer's output.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the task runner imports this package inside the emulated runtime, without fruit_assets
    from fruit_assets.databricks.runtimes import Runtime

FORMAT = 4  # bump when the way environments are built changes: old cache entries are then ignored


class LibraryInstallError(RuntimeError):
    """The runtime's packages or the cluster's libraries could not be installed."""


@dataclass(frozen=True)
class Environment:
    folder: Path
    runtime: Runtime
    libraries: tuple[str, ...]  # the pip requirement strings installed on top of the runtime
    build_seconds: float | None  # None: found in the cache
    conflicts: str  # `uv pip check`'s report, "" when clean

    @property
    def python(self) -> Path:
        return self.folder / "bin" / "python"


def find_uv() -> str:
    """uv from the emulator's own environment (the project installs it), else from PATH."""
    beside = Path(sys.executable).with_name("uv")
    if beside.exists():
        return str(beside)
    found = shutil.which("uv")
    if not found:
        raise LibraryInstallError("uv is needed to build the emulated runtimes: pip install uv")
    return found


def _python_version(candidate: str) -> str | None:
    try:
        done = subprocess.run([candidate, "-c", "import platform; print(platform.python_version())"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def find_python(minor: str) -> str:
    """An interpreter of Python `minor` ("3.12") on this machine: $FRUIT_EMULATOR_PYTHON_3_12, pythonX.Y on
    PATH (a pyenv shim that cannot run it is skipped), pyenv's versions, /usr/bin."""
    candidates = [os.environ.get(f"FRUIT_EMULATOR_PYTHON_{minor.replace('.', '_')}", "")]
    candidates += [os.path.join(folder, f"python{minor}") for folder in os.environ.get("PATH", "").split(os.pathsep)]
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(pyenv, "versions", f"{minor}.*", "bin", f"python{minor}")), reverse=True)
    candidates += [f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}"]
    for candidate in filter(None, candidates):
        if os.path.exists(candidate) and (_python_version(candidate) or "").startswith(minor + "."):
            return candidate
    raise LibraryInstallError(f"no Python {minor} on this machine: the emulated runtime needs one "
                              f"(set FRUIT_EMULATOR_PYTHON_{minor.replace('.', '_')} to its path)")


def pypi_requirements(libraries: list) -> tuple[tuple[str, ...], list[str]]:
    """The pip requirement strings of a run's `pypi` libraries, sorted, and notes on the others (jar,
    maven, whl...: not installed by the emulator)."""
    requirements, notes = [], []
    for library in libraries or []:
        pypi = library.get("pypi") if isinstance(library, dict) else None
        if isinstance(pypi, dict) and isinstance(pypi.get("package"), str):
            if pypi.get("repo"):
                notes.append(f"library {json.dumps(library)}: its repo is ignored, the default index is used")
            requirements.append(pypi["package"].strip())
        else:
            notes.append(f"library {json.dumps(library, sort_keys=True)} is not installed: the emulator installs pypi libraries only")
    return tuple(sorted(set(requirements))), notes


SHARED_BYTECODE = "_bytecode"  # under the cache root: the environments' shared __pycache__ folders


def share_bytecode(site_packages: Path, shared: Path) -> int:
    """Make the `__pycache__` of each package folder a link to a folder shared by every environment that
    has the same distribution at the same version (`shared/<name>-<version>.dist-info/<folder>`), so that
    a module compiled by one environment's task is not compiled again by another's. Returns the number of
    folders linked.

    Safe because Python checks every bytecode file against its source (size and modification time) and
    rewrites it when they differ, and the key is the distribution and version the source came from (the
    files are uv's hardlinks of one unpacked wheel). A folder that holds modules of two distributions
    (site-packages itself, namespace packages) keeps its own `__pycache__`: one key could not cover it."""
    owners: dict[Path, set[str]] = {}
    for record in site_packages.glob("*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            path = line.split(",", 1)[0]
            if path.endswith(".py") and not path.startswith(("..", "/")):
                owners.setdefault(Path(path).parent, set()).add(record.parent.name)
    linked = 0
    for folder, distributions in owners.items():
        cache = site_packages / folder / "__pycache__"
        if len(distributions) != 1 or folder == Path(".") or cache.exists() or cache.is_symlink():
            continue
        target = shared / distributions.pop() / folder / "__pycache__"
        target.mkdir(parents=True, exist_ok=True)  # before the link: Python does not write through a dangling one
        cache.symlink_to(target, target_is_directory=True)
        linked += 1
    return linked


class EnvironmentCache:
    """Emulated runtime environments under `root`, built on demand and kept (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, uv: str | None = None, wheels: str | os.PathLike | None = None):
        self.root = Path(root).resolve()
        self.uv = uv
        cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.expanduser("~/.cache")  # as the model cache
        default = os.environ.get("FRUIT_EMULATOR_WHEELS") or os.path.join(cache, "fruit_assets", "emulator-wheels")
        self.wheels = Path(wheels or default)
        self._pythons: dict[str, str] = {}

    def _python(self, runtime: Runtime) -> str:
        if runtime.python_minor not in self._pythons:
            self._pythons[runtime.python_minor] = find_python(runtime.python_minor)
        return self._pythons[runtime.python_minor]

    def key(self, runtime: Runtime, requirements: tuple[str, ...]) -> str:
        identity = {"format": FORMAT, "spark_version": runtime.spark_version, "python": runtime.python_minor,
                    "packages": runtime.python_packages(), "libraries": sorted(requirements)}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return f"{runtime.version}-{digest}"

    def environment(self, runtime: Runtime, requirements: tuple[str, ...], log=lambda message: None) -> Environment:
        """The environment of this runtime with these libraries, built if no one has built it yet."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / self.key(runtime, requirements)
        with open(self.root / f"{folder.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building it: wait, then read what it built
            if not (folder / "environment.json").exists():
                self._build(runtime, requirements, folder, log)
                built = True
            else:
                built = False
        record = json.loads((folder / "environment.json").read_text())
        return Environment(folder, runtime, requirements, record["build_seconds"] if built else None, record["conflicts"])

    def _run(self, command: list[str], what: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "CONDA_PREFIX")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
        if done.returncode != 0:
            raise LibraryInstallError(f"{what} failed (exit {done.returncode}):\n{(done.stderr or done.stdout)[-4000:]}")
        return done.stdout + done.stderr

    def pyspark_wheel(self, version: str, log=lambda message: None) -> None:
        """pyspark's wheel in the wheelhouse, built once (pip wheel) under a lock."""
        self.wheels.mkdir(parents=True, exist_ok=True)
        with open(self.wheels / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if glob.glob(str(self.wheels / f"pyspark-{version}-*.whl")):
                return
            log(f"building the wheel of pyspark {version} (published as a source package only)")
            partial = self.wheels / f".partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            try:
                # Stored, not deflated: the wheel is 430 MB of jars, which are zip files already; deflating
                # them again took 19 CPU-seconds of the build where storing takes 12 (2 cores, AMD EPYC).
                self._run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--use-pep517",
                           "--config-settings=--build-option=--compression=stored", "-w", str(partial),
                           f"pyspark=={version}"], f"building pyspark {version}")
                for wheel in partial.glob("*.whl"):
                    os.replace(wheel, self.wheels / wheel.name)
            finally:
                shutil.rmtree(partial, ignore_errors=True)

    def _build(self, runtime: Runtime, requirements: tuple[str, ...], folder: Path, log) -> None:
        uv = self.uv or find_uv()
        temporary = self.root / f".{folder.name}.{os.getpid()}.partial"
        shutil.rmtree(temporary, ignore_errors=True)
        started = time.monotonic()
        try:
            python = self._python(runtime)
            self._run([uv, "venv", "--quiet", "--relocatable", "--python", python, str(temporary)], "creating the runtime's Python")
            pins = [f"{name}=={version}" for name, version in sorted(runtime.python_packages().items())]
            log(f"installing the {runtime.name} runtime's packages: {' '.join(pins)}")
            if self.uv is None:  # a real uv: give it pyspark's wheel
                self.pyspark_wheel(runtime.spark, log)
            # No bytecode compiled here (uv's default, where pip compiles everything): compiling all of
            # site-packages cost 28 of an environment's 30 CPU-seconds, for the few modules a task
            # imports (2 cores, AMD EPYC Zen 4). The tasks write the bytecode of what they import
            # instead, once (the emulator lets them: `_task_env`).
            options = ["--find-links", str(self.wheels)] if self.wheels.is_dir() else []
            self._run([uv, "pip", "install", "--quiet", *options, "-p", str(temporary / "bin" / "python"), *pins],
                      f"installing the {runtime.name} runtime's packages")
            if requirements:
                log(f"installing the cluster's libraries over them: {' '.join(requirements)}")
                self._run([uv, "pip", "install", "--quiet", *options, "-p", str(temporary / "bin" / "python"), *requirements],
                          "installing the cluster's libraries " + " ".join(requirements))
            check = subprocess.run([uv, "pip", "check", "-p", str(temporary / "bin" / "python")],
                                   capture_output=True, text=True, timeout=600)
            conflicts = "" if check.returncode == 0 else (check.stdout + check.stderr).strip()
            for site_packages in temporary.glob("lib/python*/site-packages"):
                share_bytecode(site_packages, self.root / SHARED_BYTECODE)
            freeze = self._run([uv, "pip", "freeze", "-p", str(temporary / "bin" / "python")], "listing the environment")
            record = {"runtime": runtime.name, "spark_version": runtime.spark_version, "python": python,
                      "runtime_packages": runtime.python_packages(), "libraries": list(requirements),
                      "build_seconds": round(time.monotonic() - started, 1), "conflicts": conflicts,
                      "installed": sorted(freeze.split())}
            (temporary / "environment.json").write_text(json.dumps(record, indent=1))
            os.rename(temporary, folder)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        with contextlib.suppress(OSError):
            (self.root / "builds.log").open("a").write(json.dumps({k: record[k] for k in ("runtime", "libraries", "build_seconds")}) + "\n")

    def emulator_path(self, package_root: Path) -> Path:
        """A folder holding only `fruit_assets_dev` (a link to it), for the task's PYTHONPATH: the task runner
        comes from there, and the project's own package only from what the step launcher ships."""
        folder = self.root / "_emulator_path"
        link = folder / "fruit_assets_dev"
        if not link.exists():
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".link.{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            partial.symlink_to(package_root / "fruit_assets_dev", target_is_directory=True)
            os.replace(partial, link)
        return folder
