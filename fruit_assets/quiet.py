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
    there), but for the line `drop` if it is among the first few."""

    def copy() -> None:
        for _ in range(BOOT_LINES):  # the JDK prints it while booting, before anything of Spark's
            line = stream.readline()
            if not line:
                return
            if line.rstrip(b"\r\n") == drop:
                break
            _write(line)
        while chunk := stream.read1(65536):
            _write(chunk)

    threading.Thread(target=copy, name="fruit-jvm-stderr", daemon=True).start()


def _write(data: bytes) -> None:
    """All of `data` to file descriptor 2, wherever it points now (a terminal, a log, pytest's capture)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(2, view) :]
        except OSError:
            return
