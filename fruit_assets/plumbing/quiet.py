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
  module (`JavaModuleOptions` in spark-launcher 4.3, not configurable) and the JDK has no switch for the
  line, so `spark_session` drops exactly that line from the JVM's stderr and passes everything else
  through. It does so at the file-descriptor level, with no private pyspark API: while the session is
  made, this process's stderr is a pipe, which a JVM started then inherits as its own stderr for life.

`FRUIT_VERBOSE=1` (the demo's `--verbose`) turns all of this off: the libraries' own defaults.

No Dagster here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

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
    from pyspark.sql import SparkSession

    configure_environment()
    builder = SparkSession.builder
    for key, value in config.items():
        builder = builder.config(key, value)
    if verbose():
        return builder.getOrCreate()
    # A JVM started inside keeps the filter as its stderr; with a JVM running already, nothing changes.
    with _stderr_through(_without_jvm_boot_line, wait_seconds=0):
        return builder.getOrCreate()


def _without_jvm_boot_line(stream: BinaryIO, sink: _Sink) -> None:
    """Copy a JVM's stderr as it comes (Spark's log and its Python workers' stderr go there), but for
    JVM_INCUBATOR_LINE if it is among the first few lines, and TensorFlow's notices."""
    for _ in range(BOOT_LINES):  # the JDK prints it while booting, before anything of Spark's
        line = stream.readline()
        if not line:
            return
        if line.rstrip(b"\r\n") == JVM_INCUBATOR_LINE:
            break
        sink.write(line)
    _without_tensorflow_notices(stream, sink)


def _without_tensorflow_notices(stream: BinaryIO, sink: _Sink) -> None:
    """Every line of `stream` to `sink` but TensorFlow's notices."""
    for line in stream:
        if not any(notice in line for notice in TENSORFLOW_NOTICES):
            sink.write(line)


@contextmanager
def without_tensorflow_notices() -> Iterator[None]:
    """Inside, this process's stderr (file descriptor 2: TensorFlow's C++ logging writes there) goes
    through a filter that drops TensorFlow's notices and passes every other line on, to wherever fd 2
    pointed before (a terminal, or Dagster's capture of a step's output). Unless verbose."""
    if verbose():
        yield
        return
    # Waits until every line written inside is out, before what follows (a child process started
    # inside may hold the pipe longer: not that long).
    with _stderr_through(_without_tensorflow_notices, wait_seconds=10):
        yield


class _Sink:
    """Where a filter's lines go: the stderr of before the filter while it is in place, then fd 2
    wherever it points at each write (a terminal, a log, Dagster's or pytest's capture)."""

    def __init__(self, saved_fd: int) -> None:
        self._fd = saved_fd
        self._lock = threading.Lock()  # no write to the saved descriptor once `release` closed it

    def write(self, line: bytes) -> None:
        with self._lock:
            _write(line, self._fd)

    def release(self) -> None:
        with self._lock:
            os.close(self._fd)
            self._fd = 2


# fd 2 belongs to the whole process: one filter window at a time. Two threads' windows that overlap
# without nesting would restore each other's pipes as stderr. Nested ones, in one thread, are fine.
_FD2_FILTER = threading.RLock()


@contextmanager
def _stderr_through(copy: Callable[[BinaryIO, _Sink], None], wait_seconds: float) -> Iterator[None]:
    """Inside, this process's fd 2 is a pipe, and a thread runs `copy(the pipe, a sink)` to the
    stderr of before. A process started inside inherits the pipe as its stderr and keeps it: the
    thread copies its lines after the window too, until the last writer is gone. On the way out,
    waits up to `wait_seconds` for that."""
    with _FD2_FILTER:
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        sink = _Sink(saved)

        def run() -> None:
            with os.fdopen(read_end, "rb") as stream:
                copy(stream, sink)

        copier = threading.Thread(target=run, name="fruit-stderr-filter", daemon=True)
        copier.start()
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield
        finally:
            os.dup2(saved, 2)  # this process's own writes go straight out again
            sink.release()
            copier.join(timeout=wait_seconds)


def _write(data: bytes, fd: int = 2) -> None:
    """All of `data` to file descriptor `fd` (by default 2, wherever it points now: a terminal, a log,
    pytest's capture)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return
