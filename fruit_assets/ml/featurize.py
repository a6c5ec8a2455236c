"""MobileNetV2 features for a table of image paths, computed inside Spark.

A scalar-iterator pandas UDF: Spark hands each Python worker an iterator of Arrow batches of paths, so
the model is set up once per worker, not once per batch. The weights are resolved once on the driver
and broadcast, so workers never download anything; each worker process keeps the model it built in
`_MODELS` for the tasks that follow (Python worker reuse is on by default).

Images are read by the workers themselves, through pyarrow (local folder or S3), never collected to the
driver. An image that cannot be read or decoded does not fail the task: its row gets null features and
the reason in `error`, and the caller decides what to do with it.

Speed (measured in BENCHMARKS.md, `python -m benchmarks.featurize`): one worker per core with one
TensorFlow thread each (two processes scale, TensorFlow's intra-op threads barely do), the model run as
one graph with its weights frozen to constants (BatchNorm folded into the convolutions), and the files
of the next batches read by background threads while the model runs (hides storage latency).

No Dagster here.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.functions import pandas_udf
from pyspark.sql.types import ArrayType, FloatType, StringType, StructField, StructType

from fruit_assets.ml.images import decode_image, preprocess
from fruit_assets.storage import resolve

RESULT_TYPE = StructType(
    [
        StructField("features", ArrayType(FloatType(), containsNull=False), nullable=True),
        StructField("error", StringType(), nullable=True),
    ]
)

# The model built in this Python worker: (model key, inference mode) -> inference function. Spark
# reuses Python workers across tasks (spark.python.worker.reuse), so a worker builds the model once.
_MODELS: dict[tuple[str, str], Callable[[np.ndarray], np.ndarray]] = {}

# Set to a folder to make every task append one JSON line of timings there (benchmarks only).
TRACE_SETTING = "FRUIT_FEATURIZE_TRACE"


@dataclass(frozen=True)
class FeaturizeSettings:
    # Images per model call. 8 rather than 32: 1.1-1.3x faster on 2 cores in every measurement (smaller
    # activations stay in cache), and less memory per worker (BENCHMARKS.md).
    batch_size: int = 8
    tf_intra_op_threads: int = 1  # per Python worker; Spark runs one worker per core
    tf_inter_op_threads: int = 1
    # How the model is called (see BENCHMARKS.md for the measurements):
    # "frozen": one TensorFlow graph with the weights folded in as constants, so that TensorFlow's
    #   optimizer folds each BatchNorm into its convolution (fastest: ~1.3x "function");
    # "function": one graph (tf.function) reading the weights as variables; "call": eager, op by op;
    # "predict_on_batch" / "predict": through Keras' predict machinery.
    inference: str = "frozen"
    # Overlap of I/O with inference: the files of the next `read_ahead` model batches are read by
    # `io_threads` background threads while the model runs (it hides S3/network latency; 0: read inline).
    read_ahead: int = 2
    io_threads: int = 4
    # Decode (and preprocess) those batches in the background too. Off: with one worker per core the
    # model already keeps every core busy, and a second CPU-bound thread per worker only competes with it
    # for the core and its cache (measured ~10% slower on 2 cores, see BENCHMARKS.md).
    decode_ahead: bool = False


def _model(model_key: str, weights_broadcast, settings: FeaturizeSettings) -> Callable[[np.ndarray], np.ndarray]:
    """The inference function of this worker's model (built on first use, then kept)."""
    key = (model_key, settings.inference)
    infer = _MODELS.get(key)
    if infer is None:
        from fruit_assets.ml.model import configure_tensorflow_threads, feature_extractor_from_weights

        # TensorFlow's thread pools ignore OMP_NUM_THREADS that Spark sets; size them explicitly so
        # that N concurrent workers do not each spawn a pool as large as the machine.
        configure_tensorflow_threads(settings.tf_intra_op_threads, settings.tf_inter_op_threads)
        _MODELS.clear()  # a worker serves one model at a time; free the previous one first
        infer = _inference_function(feature_extractor_from_weights(weights_broadcast.value), settings.inference)
        _MODELS[key] = infer
    return infer


def _has_model(model_key: str, settings: FeaturizeSettings) -> bool:
    # A module-level function: the UDF, pickled by value, would otherwise see a copy of _MODELS.
    return (model_key, settings.inference) in _MODELS


def _inference_function(model, mode: str) -> Callable[[np.ndarray], np.ndarray]:
    """preprocessed float32 (n, 224, 224, 3) -> float32 (n, 1280) features, by `mode` (see settings)."""
    import tensorflow as tf

    if mode == "call":
        return lambda x: np.asarray(model(x, training=False), dtype=np.float32)
    if mode == "predict":
        return lambda x: np.asarray(model.predict(x, batch_size=len(x), verbose=0), dtype=np.float32)
    if mode == "predict_on_batch":
        return lambda x: np.asarray(model.predict_on_batch(x), dtype=np.float32)
    spec = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
    if mode in ("function", "xla"):
        # One graph for any batch size (the last batch of a partition is smaller): traced once.
        graph = tf.function(lambda x: model(x, training=False), input_signature=spec, jit_compile=mode == "xla")
        return lambda x: graph(x).numpy()
    if mode == "frozen":
        # The same computation as "function", with variables turned into constants: TensorFlow's graph
        # optimizer (grappler) then folds every BatchNorm's scale and shift into the preceding
        # convolution's weights and fuses the activations. Results differ from model(x) by float
        # rounding only (~1e-5 on unit-scale features).
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(*spec)
        frozen = convert_variables_to_constants_v2(graph)
        return lambda x: frozen(tf.constant(x))[0].numpy()
    raise ValueError(f"unknown inference mode {mode!r}")


def read_bytes(uri: str) -> bytes:
    location = resolve(uri)
    with location.filesystem.open_input_file(location.path) as source:
        return source.read()


def load_batch(paths: list[str]) -> tuple[np.ndarray, list[str | None]]:
    """Decoded 224x224 RGB images of the readable paths (in order) and an error per path (None = ok)."""
    return decode_batch([_read(path) for path in paths])


def _read(path: str) -> bytes | str:
    """The file's bytes, or why it could not be read (an error string, as recorded in `error`)."""
    try:
        return read_bytes(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file is recorded, not fatal
        return f"{type(error).__name__}: {error}"


def decode_batch(blobs: list[bytes | str]) -> tuple[np.ndarray, list[str | None]]:
    """Decoded images of the blobs that decode (in order) and an error per blob (None = ok); a blob
    that is already an error string (the read failed) stays that error."""
    images, errors = [], []
    for blob in blobs:
        if isinstance(blob, str):
            errors.append(blob)
            continue
        try:
            images.append(decode_image(blob))
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - any undecodable file is recorded, not fatal
            errors.append(f"{type(error).__name__}: {error}")
    stacked = np.stack(images) if images else np.zeros((0, 224, 224, 3), dtype=np.uint8)
    return stacked, errors


def _preprocessed(decoded: tuple[np.ndarray, list[str | None]]) -> tuple[np.ndarray | None, list[str | None]]:
    images, errors = decoded
    return (preprocess(images) if len(images) else None), errors


def _load_preprocessed(paths: list[str]) -> tuple[np.ndarray | None, list[str | None]]:
    return _preprocessed(load_batch(paths))


def _assemble(vectors: np.ndarray | None, errors: list[str | None]) -> list[np.ndarray | None]:
    rows = iter(vectors if vectors is not None else ())
    return [next(rows) if error is None else None for error in errors]


def features_for_paths(model, paths: list[str], batch_size: int) -> pd.DataFrame:
    """Features (or an error) for each path, decoding one model batch at a time so that memory stays
    bounded by `batch_size` images whatever size of Arrow batch Spark hands us. `model` is an
    inference function (see `_model`) or a Keras model. No read-ahead: `featurize` overlaps decoding
    with inference (`_stream_features`); this is the simple sequential form of the same computation."""
    infer = model if not hasattr(model, "get_weights") else (lambda x: np.asarray(model(x, training=False), dtype=np.float32))
    features: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for start in range(0, len(paths), batch_size):
        images, chunk_errors = _load_preprocessed(paths[start : start + batch_size])
        features.extend(_assemble(infer(images) if images is not None else None, chunk_errors))
        errors.extend(chunk_errors)
    return pd.DataFrame({"features": features, "error": errors})


def _chunks(batches: Iterator[pd.Series], batch_size: int) -> Iterator[tuple[list[str], bool]]:
    """(paths of one model batch, whether it ends its Arrow batch), for every Arrow batch in order; an
    empty Arrow batch gives one empty chunk so that it still gets its (empty) output batch."""
    for batch in batches:
        paths = batch.tolist()
        if not paths:
            yield [], True
        for start in range(0, len(paths), batch_size):
            yield paths[start : start + batch_size], start + batch_size >= len(paths)


def _stream_features(infer, batches: Iterator[pd.Series], settings: FeaturizeSettings, trace: dict) -> Iterator[pd.DataFrame]:
    """One output DataFrame per input Arrow batch. The files of the next `settings.read_ahead` model
    batches are read by background I/O threads (and, with `decode_ahead`, decoded and preprocessed there
    too) while the model runs on the current batch.

    The input iterator is only ever advanced by this (the worker's main) thread; background threads only
    read files and decode, so Spark's socket protocol is untouched. Reading ahead may pull the next Arrow
    batch before this one's output is yielded, which Spark allows (output never exceeds the input read
    so far). Memory: at most `read_ahead + 1` model batches of files (or decoded images) at a time."""
    chunks = _chunks(batches, settings.batch_size)
    features: list[np.ndarray | None] = []
    errors: list[str | None] = []

    def step(loaded, ends_batch):
        images, chunk_errors = loaded
        started = time.perf_counter()
        vectors = infer(images) if images is not None else None
        spent = time.perf_counter() - started
        trace["first_call_s" if trace["model_calls"] == 0 else "infer_s"] += spent
        trace["model_calls"] += 1
        trace["rows"] += len(chunk_errors)
        features.extend(_assemble(vectors, chunk_errors))
        errors.extend(chunk_errors)
        if not ends_batch:
            return None
        frame = pd.DataFrame({"features": features.copy(), "error": errors.copy()})
        features.clear()
        errors.clear()
        return frame

    if settings.read_ahead <= 0:
        for paths, ends_batch in chunks:
            started = time.perf_counter()
            loaded = _load_preprocessed(paths)
            trace["load_s"] += time.perf_counter() - started
            frame = step(loaded, ends_batch)
            if frame is not None:
                yield frame
        return

    executor = ThreadPoolExecutor(max_workers=max(1, settings.io_threads), thread_name_prefix="fruit-read")
    try:
        window: deque = deque()  # (ends_batch, future(s) of the chunk), in input order
        exhausted = False
        while True:
            while not exhausted and len(window) <= settings.read_ahead:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                elif settings.decode_ahead:
                    window.append((chunk[1], executor.submit(_load_preprocessed, chunk[0])))
                else:
                    window.append((chunk[1], [executor.submit(_read, path) for path in chunk[0]]))
            if not window:
                break
            ends_batch, pending = window.popleft()
            started = time.perf_counter()
            if settings.decode_ahead:
                loaded = pending.result()
            else:
                blobs = [future.result() for future in pending]
                trace["wait_read_s"] += time.perf_counter() - started
                loaded = _preprocessed(decode_batch(blobs))
            trace["load_s"] += time.perf_counter() - started
            frame = step(loaded, ends_batch)
            if frame is not None:
                yield frame
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _write_trace(trace: dict) -> None:
    folder = os.environ.get(TRACE_SETTING)
    if folder:
        trace = {k: round(v, 4) if isinstance(v, float) else v for k, v in trace.items()}
        with open(os.path.join(folder, f"task-{os.getpid()}.jsonl"), "a") as out:
            out.write(json.dumps(trace) + "\n")


def featurize(
    images: DataFrame,
    weights: list[np.ndarray],
    model_key: str,
    settings: FeaturizeSettings = FeaturizeSettings(),
    partitions: int | None = None,
) -> DataFrame:
    """`images` (catalog columns: path, label, size_bytes, modified_at) -> the same columns plus
    features (1280 float32, or null) and error (null, or why the image was skipped)."""
    spark = images.sparkSession
    weights_broadcast = spark.sparkContext.broadcast(weights)

    @pandas_udf(RESULT_TYPE)
    def mobilenet_features(paths: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        trace = {"pid": os.getpid(), "started": time.time(), "cached_model": _has_model(model_key, settings),
                 "rows": 0, "model_calls": 0, "first_call_s": 0.0, "infer_s": 0.0, "load_s": 0.0, "wait_read_s": 0.0}
        started = time.perf_counter()
        infer = _model(model_key, weights_broadcast, settings)
        trace["model_setup_s"] = time.perf_counter() - started
        yield from _stream_features(infer, paths, settings, trace)
        trace["task_s"] = time.perf_counter() - started
        _write_trace(trace)

    if partitions:
        images = images.repartition(partitions)
    columns = [name for name in images.columns if name not in ("features", "error")]
    return images.select(*columns, mobilenet_features(F.col("path")).alias("result")).select(
        *columns, "result.features", "result.error"
    )


def default_partitions(spark: SparkSession, rows: int) -> int:
    """Enough partitions to keep every core busy, never more than there are rows."""
    return max(1, min(rows, spark.sparkContext.defaultParallelism))




SOURCE_VERSION = ["path", "size_bytes", "modified_at"]  # an image file, as it was when featurized


@dataclass(frozen=True)
class IncrementalPlan:
    """Which catalogued images can keep their stored vectors and which must go through the model."""

    reused: DataFrame | None  # catalog columns + features, from the previous version
    todo: DataFrame           # catalog rows to featurize
    dropped: DataFrame | None  # previous rows whose image is no longer catalogued


def plan_incremental(catalog: DataFrame, previous: DataFrame | None, weights_fingerprint: str) -> IncrementalPlan:
    """Reuse a stored vector when the same file (path, size, modification time) was featurized by the
    same weights; everything else (new, changed, or featurized by another model) is featurized."""
    needed = set(SOURCE_VERSION) | {"features", "weights_fingerprint"}
    if previous is None or not needed <= set(previous.columns):
        return IncrementalPlan(reused=None, todo=catalog, dropped=None)
    same_model = previous.where(F.col("weights_fingerprint") == weights_fingerprint).select(*SOURCE_VERSION, "features")
    reused = catalog.join(same_model, on=SOURCE_VERSION, how="inner")
    todo = catalog.join(same_model.select(*SOURCE_VERSION), on=SOURCE_VERSION, how="left_anti")
    dropped = previous.join(catalog.select("path"), on="path", how="left_anti")
    return IncrementalPlan(reused=reused, todo=todo, dropped=dropped)
