"""The model spec's features (`spec.py`; MobileNetV2 by default) for a table of image paths, computed inside Spark.

A scalar-iterator pandas UDF: Spark hands each Python worker an iterator of Arrow batches of paths, so
the model is set up once per worker, not once per batch. The driver prepares the model once
(`prepare_model`) and ships it in the UDF's closure, so workers never download or convert anything; each worker
process keeps the model it built in `_MODELS` for the tasks that follow (Python worker reuse is on by
default).

Two runtimes (`FeaturizeSettings.runtime`), both exact fp32 and equal to Keras' model(x) within 1e-4:
- `onnxruntime` (default): the driver converts the Keras model to ONNX once (cached on disk by the
  spec's name and the weights' fingerprint, `onnx_model.py`) and ships the file; workers run it with ONNX Runtime
  and never import TensorFlow. Faster and far lighter (BENCHMARKS.md).
- `tensorflow`: the driver ships the spec and the weight arrays; workers rebuild the Keras model and run it as
  a frozen TensorFlow graph (`model.tensorflow_inference_function`).

Images are read by the workers themselves, through pyarrow (local folder or S3), never collected to the
driver. An image that cannot be read or decoded does not fail the task: its row gets null features and
the reason in `error`, and the caller decides what to do with it.

Speed (measured in BENCHMARKS.md, `python -m benchmarks.featurize`): one worker per core with one
intra-op thread each (two processes scale, intra-op threads barely do), and the files of the next
batches read by background threads while the model runs (hides storage latency).

The same code runs on classic Spark and on Spark Connect (serverless, standard access mode), which
has no broadcast variables and no accumulators: the model travels in the UDF's closure on both, and
only the workers' model set-up time (`WorkerModelSetup`, accumulators) is classic-only.

No Dagster here.
"""

from __future__ import annotations

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

from fruit_assets.ml.images import decode_image
from fruit_assets.ml.spec import DEFAULT_SPEC, ModelInput, ModelSpec, spec_named
from fruit_assets.plumbing.spark_connect import default_parallelism, is_connect
from fruit_assets.storage import read_bytes

RESULT_TYPE = StructType(
    [
        StructField("features", ArrayType(FloatType(), containsNull=False), nullable=True),
        StructField("error", StringType(), nullable=True),
    ]
)

RUNTIMES = ("onnxruntime", "tensorflow")
RUNTIME_SETTING = "runtime (feature_model resource)"

# The model built in this Python worker: (model key, settings) -> inference function. Spark reuses
# Python workers across tasks (spark.python.worker.reuse), so a worker builds the model once.
_MODELS: dict[tuple, Callable[[np.ndarray], np.ndarray]] = {}


@dataclass(frozen=True)
class FeaturizeSettings:
    # "onnxruntime" (default, fastest exact fp32 runtime measured) or "tensorflow" (frozen graph).
    runtime: str = "onnxruntime"
    # Images per model call. Small batches are faster on 2 cores than 32 (smaller activations stay in
    # cache), and take less memory: ONNX Runtime keeps one batch's activations in its arena, so a worker
    # holds ~50 MB less at 4 than at 8, and 4 ran at least as fast as 8 (BENCHMARKS.md).
    batch_size: int = 4
    intra_op_threads: int = 1  # per Python worker; Spark runs one worker per core
    inter_op_threads: int = 1
    # ONNX Runtime: whether idle pool threads busy-wait for work (off: they sleep, and leave the core
    # to the other workers; only matters with more than one thread per worker).
    allow_spinning: bool = False
    onnx_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # Overlap of I/O with inference: the files of the next `read_ahead` model batches (16 images) are read
    # by `io_threads` background threads while the model runs (it hides S3/network latency; 0: read inline).
    # Decoding stays on the worker's main thread: with one worker per core a second CPU-bound thread
    # only competes with the model for the core (measured ~10% slower on 2 cores, BENCHMARKS.md).
    read_ahead: int = 4
    io_threads: int = 4


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"{RUNTIME_SETTING}={runtime!r} is not a known runtime; use one of: {', '.join(RUNTIMES)}")
    return runtime


def prepare_model(
    weights: list[np.ndarray], fingerprint: str, settings: FeaturizeSettings, spec: ModelSpec = DEFAULT_SPEC
) -> tuple[object, dict]:
    """Driver side: (what to broadcast to the workers, JSON-able metadata about the runtime).

    onnxruntime: the converted ONNX model's bytes (converted now, or read from the cache);
    tensorflow: the spec and the weight arrays."""
    check_runtime(settings.runtime)
    if settings.runtime == "tensorflow":
        return (spec, weights), {
            "runtime": "tensorflow",
            "runtime_version": f"tensorflow {_version('tensorflow-cpu', 'tensorflow')} (frozen graph)",
        }
    from fruit_assets.ml import onnx_model

    onnx_model.check_providers(settings.onnx_providers)
    converted = onnx_model.converted_model(weights, fingerprint, spec=spec)
    described = {"runtime": "onnxruntime", "runtime_version": f"onnxruntime {_version('onnxruntime', 'onnxruntime-gpu')}"}
    return converted.data, described | {"onnx_providers": ",".join(settings.onnx_providers)} | converted.describe()


@dataclass(frozen=True)
class PreparedModel:
    """The feature extractor, ready to ship to the workers: resolved on the driver once per run."""

    payload: object  # what the workers get, in the UDF's closure (see prepare_model)
    fingerprint: str  # of the spec and weights: the workers' model cache key, and what reuse is keyed on
    metadata: dict  # model spec, weights source and runtime, JSON-able, recorded with the features
    seconds: float  # to resolve the weights and prepare the runtime
    meaningful: bool  # False for random weights

    @property
    def spec(self) -> ModelSpec:
        """The model spec, named in the metadata (which a model staged for Databricks carries too)."""
        return spec_named(self.metadata.get("model_spec", DEFAULT_SPEC.name))


def prepare_feature_extractor(source, settings: FeaturizeSettings, spec: ModelSpec = DEFAULT_SPEC) -> PreparedModel:
    """Resolve the weights of `source` (an `ml.model.WeightsSource`) for the spec's model and prepare it
    for the configured runtime (onnxruntime: convert to ONNX once, then read it from the cache)."""
    from fruit_assets.ml.model import feature_extractor_weights, weights_fingerprint

    started = time.perf_counter()
    weights = feature_extractor_weights(source, spec)
    fingerprint = weights_fingerprint(weights, spec)
    payload, runtime = prepare_model(weights, fingerprint, settings, spec)
    described = spec.describe() | source.describe()
    return PreparedModel(payload, fingerprint, described | runtime, time.perf_counter() - started, described["weights_meaningful"])


def _version(*distributions: str) -> str:
    """The installed version of the first of these distributions (a cluster may have tensorflow, not
    tensorflow-cpu; onnxruntime-gpu, not onnxruntime)."""
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def _build_inference(payload, settings: FeaturizeSettings) -> Callable[[np.ndarray], np.ndarray]:
    """Worker side: the inference function of the shipped model. Only the tensorflow runtime
    imports TensorFlow."""
    if settings.runtime == "onnxruntime":
        from fruit_assets.ml.onnx_model import onnx_inference_function

        return onnx_inference_function(
            payload, settings.intra_op_threads, settings.inter_op_threads, settings.allow_spinning, settings.onnx_providers
        )
    if settings.runtime == "tensorflow":
        from fruit_assets.ml.model import tensorflow_inference_function

        spec, weights = payload
        return tensorflow_inference_function(weights, settings.intra_op_threads, settings.inter_op_threads, spec)
    raise ValueError(f"{RUNTIME_SETTING}={settings.runtime!r} is not a known runtime")


class WorkerModelSetup:
    """How long the Spark Python workers took to build their model (deserialize it, make the runtime's
    session, and its first call, which allocates and prepares the kernels; the images of that first
    batch are counted as set-up too), summed over the workers that built one: Spark accumulators, read
    on the driver once the features are computed. A worker that kept its model from an earlier task adds
    nothing. Featurization time minus this is the model running.

    Classic Spark only: Spark Connect has no accumulators, and there `measured` is False, the sums stay
    0 and `NOT_MEASURED` says why."""

    NOT_MEASURED = (
        "not measured on Spark Connect (serverless, standard access mode): it has no accumulators to add "
        "up the workers' times; featurize_seconds includes the workers' model set-up"
    )

    def __init__(self, spark: SparkSession):
        self.measured = not is_connect(spark)
        self.seconds = spark.sparkContext.accumulator(0.0) if self.measured else None
        self.workers = spark.sparkContext.accumulator(0) if self.measured else None

    def built(self) -> int:
        """How many workers built their model (0 where not measured)."""
        return self.workers.value if self.workers is not None else 0

    def per_worker(self) -> float:
        """Mean seconds per worker that built its model: about the wall time, as they build in parallel."""
        if self.seconds is None or not self.built():
            return 0.0
        return self.seconds.value / self.built()


def _has_model(model_key: str, settings: FeaturizeSettings) -> bool:
    """Whether this worker has built the model already. A module function: the UDF's closure would
    carry a copy of `_MODELS` (cloudpickle copies the globals of a nested function), not the worker's."""
    return (model_key, settings) in _MODELS


def _first_call_timed(infer, started: float, seconds) -> Callable[[np.ndarray], np.ndarray]:
    """`infer`, adding to the accumulator `seconds` the time from `started` (the model build) to the end
    of its first call: a runtime's first run allocates its memory and prepares its kernels."""
    first = True

    def timed(images: np.ndarray) -> np.ndarray:
        nonlocal first
        if not first:
            return infer(images)
        vectors = infer(images)
        first = False
        seconds.add(time.perf_counter() - started)
        return vectors

    return timed


def _model(model_key: str, model_payload, settings: FeaturizeSettings) -> Callable[[np.ndarray], np.ndarray]:
    """The inference function of this worker's model (built on first use, then kept)."""
    key = (model_key, settings)
    infer = _MODELS.get(key)
    if infer is None:
        _MODELS.clear()  # a worker serves one model at a time; free the previous one first
        infer = _build_inference(model_payload, settings)
        _MODELS[key] = infer
    return infer


def load_batch(paths: list[str], size: int = DEFAULT_SPEC.inputs.size) -> tuple[np.ndarray, list[str | None]]:
    """Decoded size x size RGB images of the readable paths (in order) and an error per path (None = ok)."""
    return decode_batch([_read(path) for path in paths], size)


def _read(path: str) -> bytes | str:
    """The file's bytes, or why it could not be read (an error string, as recorded in `error`)."""
    try:
        return read_bytes(path)
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def decode_batch(blobs: list[bytes | str], size: int) -> tuple[np.ndarray, list[str | None]]:
    """Decoded images of the blobs that decode (in order) and an error per blob (None = ok); a blob
    that is already an error string (the read failed) stays that error."""
    images, errors = [], []
    for blob in blobs:
        if isinstance(blob, str):
            errors.append(blob)
            continue
        try:
            images.append(decode_image(blob, size=size))
            errors.append(None)
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype=np.uint8)
    return stacked, errors


def _preprocessed(decoded: tuple[np.ndarray, list[str | None]], inputs: ModelInput) -> tuple[np.ndarray | None, list[str | None]]:
    images, errors = decoded
    return (inputs.preprocess(images) if len(images) else None), errors


def _load_preprocessed(paths: list[str], inputs: ModelInput) -> tuple[np.ndarray | None, list[str | None]]:
    return _preprocessed(load_batch(paths, inputs.size), inputs)


def _assemble(vectors: np.ndarray | None, errors: list[str | None]) -> list[np.ndarray | None]:
    rows = iter(vectors if vectors is not None else ())
    return [next(rows) if error is None else None for error in errors]


def _chunks(batches: Iterator[pd.Series], batch_size: int) -> Iterator[tuple[list[str], bool]]:
    """(paths of one model batch, whether it ends its Arrow batch), for every Arrow batch in order; an
    empty Arrow batch gives one empty chunk so that it still gets its (empty) output batch."""
    for batch in batches:
        paths = batch.tolist()
        if not paths:
            yield [], True
        for start in range(0, len(paths), batch_size):
            yield paths[start : start + batch_size], start + batch_size >= len(paths)


def _stream_features(infer, batches: Iterator[pd.Series], settings: FeaturizeSettings, inputs: ModelInput) -> Iterator[pd.DataFrame]:
    """One output DataFrame per input Arrow batch, the model called on `settings.batch_size` images at
    a time, so that memory stays bounded whatever size of Arrow batch Spark hands us."""
    chunks = _chunks(batches, settings.batch_size)
    loaded = _loaded_ahead(chunks, settings, inputs) if settings.read_ahead > 0 else _loaded_inline(chunks, inputs)
    features: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for (images, chunk_errors), ends_batch in loaded:
        features.extend(_assemble(infer(images) if images is not None else None, chunk_errors))
        errors.extend(chunk_errors)
        if ends_batch:
            yield pd.DataFrame({"features": features, "error": errors})
            features, errors = [], []


def _loaded_inline(chunks: Iterator[tuple[list[str], bool]], inputs: ModelInput):
    """(preprocessed images, errors), ends_batch for each chunk: read and decoded in turn."""
    for paths, ends_batch in chunks:
        yield _load_preprocessed(paths, inputs), ends_batch


def _loaded_ahead(chunks: Iterator[tuple[list[str], bool]], settings: FeaturizeSettings, inputs: ModelInput):
    """As `_loaded_inline`, but the files of the next `settings.read_ahead` chunks are read by
    background I/O threads while the caller runs the model on the current one.

    The input iterator is only ever advanced by this (the worker's main) thread; background threads only
    read files, so Spark's socket protocol is untouched. Reading ahead may pull the next Arrow batch
    before this one's output is yielded, which Spark allows (output never exceeds the input read so
    far). Memory: at most `read_ahead + 1` model batches of files at a time."""
    executor = ThreadPoolExecutor(max_workers=max(1, settings.io_threads), thread_name_prefix="fruit-read")
    try:
        window: deque = deque()  # (ends_batch, futures of the chunk's files), in input order
        exhausted = False
        while True:
            while not exhausted and len(window) <= settings.read_ahead:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                else:
                    window.append((chunk[1], [executor.submit(_read, path) for path in chunk[0]]))
            if not window:
                return
            ends_batch, pending = window.popleft()
            yield _preprocessed(decode_batch([future.result() for future in pending], inputs.size), inputs), ends_batch
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def featurize(
    images: DataFrame,
    model_payload,
    model_key: str,
    settings: FeaturizeSettings = FeaturizeSettings(),
    partitions: int | None = None,
    model_setup: WorkerModelSetup | None = None,
    inputs: ModelInput = DEFAULT_SPEC.inputs,
) -> DataFrame:
    """`images` (catalog columns: path, label, size_bytes, modified_at) -> the same columns plus
    features (the spec's output_dim float32, or null) and error (null, or why the image was skipped).

    `model_payload` is what `prepare_model` returned for `settings.runtime`; `model_key` identifies
    it (the fingerprint) in the workers' model cache; `inputs` is its spec's (image size,
    preprocessing). `model_setup`, if given, adds up the workers' model building time."""
    check_runtime(settings.runtime)
    # The model reaches the workers in the UDF's closure, which Spark ships with the plan (classic Spark
    # broadcasts a pickled UDF over 1 MB itself; Spark Connect sends it to the server with the plan): no
    # broadcast variable, which Spark Connect does not have. Measured on classic Spark against
    # `sc.broadcast` in BENCHMARKS.md ("The model's way to the workers").
    setup_seconds, setup_workers = (model_setup.seconds, model_setup.workers) if model_setup else (None, None)

    @pandas_udf(RESULT_TYPE)  # type: ignore[call-overload]  # pyspark's overloads miss the iterator form with a return type
    def model_features(paths: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        building = not _has_model(model_key, settings)
        started = time.perf_counter()
        infer = _model(model_key, model_payload, settings)
        if building and setup_seconds is not None and setup_workers is not None:
            infer = _first_call_timed(infer, started, setup_seconds)
            setup_workers.add(1)
        yield from _stream_features(infer, paths, settings, inputs)

    if partitions:
        images = images.repartition(partitions)
    columns = [name for name in images.columns if name not in ("features", "error")]
    result = model_features(F.col("path")).alias("result")  # type: ignore[arg-type,attr-defined]
    return images.select(*columns, result).select(*columns, "result.features", "result.error")


def featurize_here(
    images: pd.DataFrame, model_payload, settings: FeaturizeSettings = FeaturizeSettings(), inputs: ModelInput = DEFAULT_SPEC.inputs
) -> pd.DataFrame:
    """`featurize` in this process, for a handful of images: the same reading, decoding, model batches
    and runtime settings as a Spark worker, so the same vectors (ONNX Runtime's result for an image
    does not depend on its batch), without a Spark job. Only for the onnxruntime runtime: the
    driver never loads the TensorFlow runtime to run it."""
    if check_runtime(settings.runtime) != "onnxruntime":
        raise ValueError(f"featurize_here runs the onnxruntime runtime only, not {settings.runtime!r}")
    images = images.reset_index(drop=True)
    if images.empty:
        return images.assign(features=pd.Series(dtype=object), error=pd.Series(dtype=object))
    infer = _build_inference(model_payload, settings)
    [result] = list(_stream_features(infer, iter([images.path]), settings, inputs))
    return images.assign(features=result.features.to_numpy(), error=result.error.to_numpy())


@dataclass(frozen=True)
class Featurizer:
    """A prepared model with its runtime settings, run over catalog rows (path, label, size_bytes,
    modified_at): in Spark's Python workers (`in_spark`) or, for a handful of images, in this process
    (`on_driver`), with the same code and settings, so the same vectors."""

    model: PreparedModel
    settings: FeaturizeSettings
    workers_setup: WorkerModelSetup | None = None  # adds up the workers' model set-up (classic Spark)
    partitions: int | None = None  # of the Spark job; None: as many as the caller plans

    @property
    def runs_on_driver(self) -> bool:
        """Whether `on_driver` can run: the driver never loads the TensorFlow runtime."""
        return self.settings.runtime == "onnxruntime"

    def in_spark(self, images: DataFrame, partitions: int) -> DataFrame:
        return featurize(images, self.model.payload, self.model.fingerprint, self.settings, self.partitions or partitions,
                         self.workers_setup, self.model.spec.inputs)

    def on_driver(self, images: pd.DataFrame) -> pd.DataFrame:
        return featurize_here(images, self.model.payload, self.settings, self.model.spec.inputs)


def default_partitions(spark: SparkSession, rows: int) -> int:
    """Enough partitions to keep every core busy, never more than there are rows."""
    return max(1, min(rows, default_parallelism(spark)))
