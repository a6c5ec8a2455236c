"""Quiet consoles by default: every message a user sees should mean something to them.

Each known-harmless start-up message is turned off where it is made, never by hiding warnings in bulk:
- TensorFlow's C++ INFO lines ("This TensorFlow binary is optimized ...", "oneDNN custom operations are
  on", grappler's "Starting new session", and absl's "All log messages before absl::InitializeLog() ...",
  printed only because one of those is): `TF_CPP_MIN_LOG_LEVEL=1`, which keeps TensorFlow's warnings
  and errors. Set in the environment, so that the Spark Python workers (started by the JVM, which
  inherits it) get it too.
- Spark's log4j start-up lines ("Using Spark's default log4j profile", "Setting default log level",
  "To adjust logging level ...") and "Unable to load native-hadoop library" (pip's pyspark has no native
  Hadoop library; nothing here needs one): our own log4j configuration, `log4j2.properties` beside this
  file. Spark's warnings and errors still print.
- Keras' download progress bar: `keras_without_progress_bars` around the ImageNet download.
- TensorFlow 2.21's "oneDNN custom operations are on" notice, with absl's "All log messages before
  absl::InitializeLog() ..." preamble, printed the first time a model runs on a CPU where oneDNN is on
  by default (seen on an AMD EPYC with AVX-512; an AVX2-only EPYC prints nothing). It comes from a second
  copy of TensorFlow's logging inside `_pywrap_profiler_plugin.so`, which `TF_CPP_MIN_LOG_LEVEL` does not
  reach (measured: printed at every level, and by a plain Keras model too). `without_tensorflow_notices`
  drops exactly those two lines around every Keras build of the feature extractor (ml/model.py),
  where the process's first build prints them; the Spark workers' copies reach us through the JVM's stderr, where `spark_session`
  drops them too.
- The JVM's "WARNING: Using incubator modules: jdk.incubator.vector": Spark's launcher always adds that
  module and the JDK has no switch for the line, so `spark_session` drops exactly that line from
  the JVM's stderr (pyspark's documented `popen_kwargs` hook) and passes everything else through.

`FRUIT_VERBOSE=1` (the demo's `--verbose`) turns all of this off: the libraries' own defaults.

No Dagster here.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

VERBOSE_VARIABLE = "FRUIT_VERBOSE"
LOG4J_CONFIG = Path(__file__).resolve().with_name("log4j2.properties")
# What the JDK prints when Spark's launcher adds `--add-modules=jdk.incubator.vector` (always).
JVM_INCUBATOR_LINE = b"WARNING: Using incubator modules: jdk.incubator.vector"
BOOT_LINES = 5  # the JVM's stderr is read line by line, looking for it, only this long
# TensorFlow's notices that TF_CPP_MIN_LOG_LEVEL does not reach (see the module's docstring).
TENSORFLOW_NOTICES = (b"All log messages before absl::InitializeLog() is called", b"oneDNN custom operations are on")


def verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def configure_environment() -> None:
    """Environment defaults for this process and the ones it starts (the Spark JVM and its Python
    workers). A value the user has set is kept. Call it before TensorFlow is imported."""
    if not verbose():
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


@contextmanager
def keras_without_progress_bars() -> Iterator[None]:
    """Keras' console progress bars (the weights download's) off inside, unless verbose. Keras then
    sends those messages to absl's logging, which shows warnings only."""
    import keras

    if verbose() or not keras.config.is_interactive_logging_enabled():
        yield
        return
    keras.config.disable_interactive_logging()
    try:
        yield
    finally:
        keras.config.enable_interactive_logging()


def spark_java_options() -> str:
    """JVM options of the Spark driver: our log4j configuration, unless verbose."""
    return "" if verbose() else f"-Dlog4j2.configurationFile={LOG4J_CONFIG.as_uri()}"


def spark_session(config: Mapping[str, str]):
    """The Spark session with these settings. When this call starts the JVM (the first session of
    the process), the JVM starts quietly; an existing session is returned as it is."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    configure_environment()
    builder = SparkSession.builder
    for key, value in config.items():
        builder = builder.config(key, value)
    if not verbose() and SparkContext._gateway is None:
        from pyspark.java_gateway import launch_gateway

        conf = SparkConf().setAll(list(config.items()))
        gateway = launch_gateway(conf, popen_kwargs={"stderr": subprocess.PIPE})
        _pass_through(gateway.proc.stderr, drop=JVM_INCUBATOR_LINE)
        SparkContext(conf=conf, gateway=gateway)
    return builder.getOrCreate()


def _pass_through(stream, drop: bytes) -> None:
    """Copy the JVM's stderr to ours as it comes (Spark's log and its Python workers' stderr go
    there), but for the line `drop` if it is among the first few, and TensorFlow's notices."""

    def copy() -> None:
        for _ in range(BOOT_LINES):  # the JDK prints it while booting, before anything of Spark's
            line = stream.readline()
            if not line:
                return
            if line.rstrip(b"\r\n") == drop:
                break
            _write(line)
        _copy_lines(stream, 2)

    threading.Thread(target=copy, name="fruit-jvm-stderr", daemon=True).start()


def _copy_lines(stream, fd: int) -> None:
    """Every line of `stream` to `fd` but TensorFlow's notices."""
    for line in stream:
        if not any(notice in line for notice in TENSORFLOW_NOTICES):
            _write(line, fd)


@contextmanager
def without_tensorflow_notices() -> Iterator[None]:
    """Inside, this process's stderr (file descriptor 2: TensorFlow's C++ logging writes there) goes
    through a filter that drops TensorFlow's notices and passes every other line on, to wherever fd 2
    pointed before (a terminal, or Dagster's capture of a step's output). Unless verbose."""
    if verbose():
        yield
        return
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    reader = os.fdopen(read_end, "rb")
    copier = threading.Thread(target=_copy_lines, args=(reader, saved), name="fruit-tf-stderr", daemon=True)
    copier.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        os.dup2(saved, 2)  # the pipe's last writer is gone: the copier reads to its end and stops
        copier.join(timeout=10)  # a child process started inside may hold the pipe longer
        reader.close()
        os.close(saved)


def _write(data: bytes, fd: int = 2) -> None:
    """All of `data` to file descriptor `fd` (by default 2, wherever it points now: a terminal, a log,
    pytest's capture)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return
