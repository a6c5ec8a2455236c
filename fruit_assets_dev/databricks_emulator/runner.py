"""The emulated Databricks driver: runs one ``spark_python_task`` in this process.

The emulator starts it as ``<python> -m fruit_assets_dev.databricks_emulator.runner`` in a new process
group, with the task's environment, and writes a JSON spec to its stdin (so secret values never appear
on a command line, in the environment or on disk). The runner then does what a Databricks driver does
for a Python task:

1. writes ``runtime.json`` (the spec's ``runtime_file``, in the run's folder): the Python and library
   versions this process sees (python, pyspark, numpy, pandas, pyarrow, deltalake, onnxruntime; null when
   missing), from the installed distributions' metadata, without importing them. On an emulated runtime
   this process runs that runtime's environment, with the task's libraries already installed (the
   emulator built it); in local mode it runs the emulator's Python and the libraries are only logged
   ("would install");
2. starts a local SparkSession (the emulator's ``spark_master``, UI off, bound to 127.0.0.1) with the
   cluster's ``spark_conf``, its Python workers' daemon ``spark_daemon.py`` unless that names another;
3. runs the Python file as ``__main__`` with ``sys.argv = [file, *parameters]`` and the Databricks globals
   ``spark``, ``sc`` and ``dbutils`` (``dbutils.secrets`` serves the emulator's secrets,
   ``dbutils.fs`` works on the emulator's DBFS folder). ``from pyspark.dbutils import DBUtils`` works too.

The file and the parameters arrive already translated by the emulator: ``/dbfs/x`` became the local
file of DBFS path ``/x``, ``dbfs:/x`` became the URI ``file:///<that file>`` (see ``server.py``).

Exit status: the script's (``sys.exit(n)``), 1 for an uncaught exception (the traceback goes to stderr
and to the spec's ``error_file``). The spec's ``ready_file`` is created once Spark is up, just before the
script starts: the emulator reports the run as RUNNING from then on, and a runner that exits without it
failed while "starting the cluster" (INTERNAL_ERROR).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import sys
import threading
import time
import traceback
import types
from collections import namedtuple
from pathlib import Path

from fruit_assets_dev.databricks_emulator.dbfs import DbfsPathError, DbfsRoot

LOG_PREFIX = "[databricks-emulator]"

FileInfo = namedtuple("FileInfo", ["path", "name", "size", "modificationTime"])
SecretMetadata = namedtuple("SecretMetadata", ["key"])
SecretScope = namedtuple("SecretScope", ["name"])


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", file=sys.stderr, flush=True)


class SecretNotFound(Exception):
    """dbutils.secrets.get of a scope or key the emulator was not given."""


class _Secrets:
    """``dbutils.secrets``: the emulator's secrets, read-only."""

    def __init__(self, secrets: dict[str, dict[str, str]]):
        self._secrets = secrets

    def get(self, scope: str, key: str) -> str:
        try:
            return self._secrets[scope][key]
        except KeyError:
            raise SecretNotFound(f"Secret does not exist with scope: {scope} and key: {key}") from None

    def getBytes(self, scope: str, key: str) -> bytes:
        return self.get(scope, key).encode()

    def list(self, scope: str) -> list[SecretMetadata]:
        if scope not in self._secrets:
            raise SecretNotFound(f"Secret scope {scope} does not exist")
        return [SecretMetadata(key) for key in sorted(self._secrets[scope])]

    def listScopes(self) -> list[SecretScope]:
        return [SecretScope(name) for name in sorted(self._secrets)]

    def __repr__(self) -> str:
        return "<dbutils.secrets (databricks emulator)>"


class _Fs:
    """``dbutils.fs`` basics on the emulator's DBFS folder. ``dbfs:/x`` and ``/x`` are DBFS paths,
    ``file:/x`` a local file, as on Databricks."""

    def __init__(self, root: DbfsRoot):
        self._root = root

    def _local(self, path: str) -> Path:
        if path.startswith("file:"):
            return Path("/" + path[len("file:") :].lstrip("/"))
        try:
            return self._root.local(path)
        except DbfsPathError as e:
            raise ValueError(f"dbutils.fs (databricks emulator): {e}") from None

    def _display(self, path: str, local: Path) -> str:
        if path.startswith("file:"):
            return "file:" + str(local)
        return "dbfs:" + self._root.dbfs_path(local)

    def ls(self, dir: str) -> list[FileInfo]:
        local = self._local(dir)
        if not local.exists():
            raise FileNotFoundError(f"java.io.FileNotFoundException: File {dir} does not exist.")
        entries = sorted(local.iterdir()) if local.is_dir() else [local]
        out = []
        for entry in entries:
            stat = entry.stat()
            name = entry.name + ("/" if entry.is_dir() else "")
            path = self._display(dir, entry) + ("/" if entry.is_dir() else "")
            out.append(FileInfo(path, name, 0 if entry.is_dir() else stat.st_size, int(stat.st_mtime * 1000)))
        return out

    def mkdirs(self, dir: str) -> bool:
        self._local(dir).mkdir(parents=True, exist_ok=True)
        return True

    def put(self, file: str, contents: str, overwrite: bool = False) -> bool:
        local = self._local(file)
        if local.exists() and not overwrite:
            raise FileExistsError(f"File {file} already exists (use overwrite=True)")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(contents)
        return True

    def head(self, file: str, maxBytes: int = 65536) -> str:
        with open(self._local(file), "rb") as handle:
            return handle.read(maxBytes).decode("utf-8", errors="replace")

    def cp(self, source: str, destination: str, recurse: bool = False) -> bool:
        src, dst = self._local(source), self._local(destination)
        if src.is_dir():
            if not recurse:
                raise IsADirectoryError(f"{source} is a directory: use recurse=True")
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            if dst.is_dir():
                dst = dst / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        return True

    def mv(self, source: str, destination: str, recurse: bool = False) -> bool:
        src, dst = self._local(source), self._local(destination)
        if src.is_dir() and not recurse:
            raise IsADirectoryError(f"{source} is a directory: use recurse=True")
        if dst.is_dir():
            dst = dst / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, dst)
        return True

    def rm(self, dir: str, recurse: bool = False) -> bool:
        local = self._local(dir)
        if not local.exists():
            return False
        if local.is_dir():
            if not recurse and any(local.iterdir()):
                raise OSError(f"{dir} is a non-empty directory: use recurse=True")
            shutil.rmtree(local)
        else:
            local.unlink()
        return True

    def __repr__(self) -> str:
        return "<dbutils.fs (databricks emulator)>"


class DBUtils:
    """The subset of Databricks' ``dbutils`` the emulator provides: ``secrets`` and ``fs``."""

    def __init__(self, secrets: dict[str, dict[str, str]], dbfs_root: DbfsRoot):
        self.secrets = _Secrets(secrets)
        self.fs = _Fs(dbfs_root)

    def __getattr__(self, name: str):
        raise AttributeError(f"dbutils.{name} is not provided by the databricks emulator (only secrets and fs)")

    def __repr__(self) -> str:
        return "<dbutils (databricks emulator): secrets, fs>"


def _install_pyspark_dbutils_module(dbutils: DBUtils) -> None:
    """Make ``from pyspark.dbutils import DBUtils; DBUtils(spark)`` work, as on Databricks. OSS pyspark has
    no such module, so this adds one; nothing existing is patched."""
    module = types.ModuleType("pyspark.dbutils")
    module.DBUtils = lambda spark=None: dbutils
    module.__doc__ = "Databricks emulator: DBUtils(spark) returns the emulated dbutils."
    sys.modules["pyspark.dbutils"] = module


def _die_with_parent(parent_pid: int) -> None:
    """If the emulator goes away without stopping this run, take the whole process group down
    (the Spark JVM and its Python workers included) rather than leaving orphans."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-emulator", daemon=True).start()


RUNTIME_PACKAGES = ("pyspark", "numpy", "pandas", "pyarrow", "deltalake", "onnxruntime")


def write_runtime(path: str, spec: dict) -> dict:
    """What this process runs: the versions a step would import, from the distributions' metadata."""
    import importlib.metadata
    import platform

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    found = {"python": platform.python_version(), **{name: version(name) for name in RUNTIME_PACKAGES},
             "executable": sys.executable, "runtime": spec.get("runtime"),
             "databricks_runtime_version": os.environ.get("DATABRICKS_RUNTIME_VERSION")}
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        json.dump(found, handle, indent=1)
    os.replace(partial, path)
    return found


def _spark_session(spec: dict):
    from pyspark.sql import SparkSession

    conf = {
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.driver.host": "127.0.0.1",
        "spark.driver.bindAddress": "127.0.0.1",
    }
    conf.update({k: str(v) for k, v in (spec.get("spark_conf") or {}).items()})
    conf["spark.master"] = spec["spark_master"]
    # Python workers import pyspark from the environment's package, with bytecode, not from pyspark.zip
    # (spark_daemon.py); a cluster's own spark_conf may name another daemon.
    conf.setdefault("spark.python.daemon.module", "fruit_assets_dev.databricks_emulator.spark_daemon")
    conf.setdefault("spark.app.name", spec.get("app_name") or "databricks-emulator")
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def _connect_session(spec: dict):
    """Serverless (serverless.py): a client session of the environment's Spark Connect server, which the
    emulator runs; this process gets no JVM."""
    url = spec["connect_url"]
    # What a serverless driver has: every SparkSession.builder.getOrCreate() is this server's client.
    os.environ["SPARK_REMOTE"] = url
    os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"
    from pyspark.sql import SparkSession

    return SparkSession.builder.remote(url).getOrCreate()


def main() -> int:
    spec = json.loads(sys.stdin.read())
    # The script gets an empty stdin, like a job on Databricks.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    _die_with_parent(spec["parent_pid"])

    for note in spec.get("notes", []):
        log(note)
    if spec.get("runtime_file"):
        found = write_runtime(spec["runtime_file"], spec)
        log("runtime: " + ", ".join(f"{name} {found[name]}" for name in ("python", *RUNTIME_PACKAGES)))
    for library in spec.get("libraries", []):
        if spec.get("installed"):
            log(f"installed library {json.dumps(library, sort_keys=True)} (emulated {spec.get('runtime')} runtime)")
        else:
            log(f"would install library {json.dumps(library, sort_keys=True)} (not installed: the local environment is used)")

    python_file = spec["python_file"]
    if not os.path.isfile(python_file):
        log(f"python_file {spec['python_file_uri']} does not exist on DBFS ({python_file})")
        return 3

    started = time.time()
    serverless = bool(spec.get("serverless"))
    spark = _connect_session(spec) if serverless else _spark_session(spec)
    kind = "Spark Connect session (serverless)" if serverless else "SparkSession"
    log(f"{kind} {spark.version} on {spec['spark_master']} ready in {time.time() - started:.1f} s")
    dbutils = DBUtils(spec.get("secrets") or {}, DbfsRoot(spec["dbfs_root"]))
    del spec["secrets"]
    _install_pyspark_dbutils_module(dbutils)

    sys.argv = [python_file, *spec["parameters"]]
    sys.path.insert(0, os.path.dirname(python_file))
    # Serverless has no `sc` (https://docs.databricks.com/aws/en/compute/serverless/limitations).
    init_globals = {"spark": spark, "dbutils": dbutils, **({} if serverless else {"sc": spark.sparkContext})}
    Path(spec["ready_file"]).touch()

    code = 0
    try:
        runpy.run_path(python_file, init_globals=init_globals, run_name="__main__")
    except SystemExit as e:
        if e.code is None or e.code == 0:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        trace = traceback.format_exc()
        sys.stderr.write(trace)
        Path(spec["error_file"]).write_text(trace)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            spark.stop()
        except Exception as e:
            log(f"stopping Spark failed: {e!r}")
    return code


if __name__ == "__main__":
    sys.exit(main())
