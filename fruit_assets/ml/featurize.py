"""MobileNetV2 features for a table of image paths, computed inside Spark.

A scalar-iterator pandas UDF: Spark hands each Python worker an iterator of Arrow batches of paths, so
the model is set up once per worker, not once per batch. The weights are resolved once on the driver
and broadcast, so workers never download anything; each worker process keeps the model it built in
`_MODELS` for the tasks that follow (Python worker reuse is on by default).

Images are read by the workers themselves, through pyarrow (local folder or S3), never collected to the
driver. An image that cannot be read or decoded does not fail the task: its row gets null features and
the reason in `error`, and the caller decides what to do with it.

No Dagster here.
"""

from __future__ import annotations

from collections.abc import Iterator
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

# Keras models built in this Python worker, by model key (one per set of broadcast weights).
_MODELS: dict[str, object] = {}


@dataclass(frozen=True)
class FeaturizeSettings:
    batch_size: int = 32          # images per model call
    tf_intra_op_threads: int = 1  # per Python worker; Spark runs one worker per core
    tf_inter_op_threads: int = 1


def _model(model_key: str, weights_broadcast, settings: FeaturizeSettings):
    model = _MODELS.get(model_key)
    if model is None:
        from fruit_assets.ml.model import configure_tensorflow_threads, feature_extractor_from_weights

        # TensorFlow's thread pools ignore OMP_NUM_THREADS that Spark sets; size them explicitly so
        # that N concurrent workers do not each spawn a pool as large as the machine.
        configure_tensorflow_threads(settings.tf_intra_op_threads, settings.tf_inter_op_threads)
        model = feature_extractor_from_weights(weights_broadcast.value)
        _MODELS.clear()  # a worker serves one model at a time; free the previous one
        _MODELS[model_key] = model
    return model


def read_bytes(uri: str) -> bytes:
    location = resolve(uri)
    with location.filesystem.open_input_file(location.path) as source:
        return source.read()


def load_batch(paths: list[str]) -> tuple[np.ndarray, list[str | None]]:
    """Decoded 224x224 RGB images of the readable paths (in order) and an error per path (None = ok)."""
    images, errors = [], []
    for path in paths:
        try:
            images.append(decode_image(read_bytes(path)))
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - any unreadable file is recorded, not fatal
            errors.append(f"{type(error).__name__}: {error}")
    stacked = np.stack(images) if images else np.zeros((0, 224, 224, 3), dtype=np.uint8)
    return stacked, errors


def features_for_paths(model, paths: list[str], batch_size: int) -> pd.DataFrame:
    """Features (or an error) for each path, decoding one model batch at a time so that memory stays
    bounded by `batch_size` images whatever size of Arrow batch Spark hands us."""
    features: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for start in range(0, len(paths), batch_size):
        images, chunk_errors = load_batch(paths[start : start + batch_size])
        vectors = iter(np.asarray(model(preprocess(images), training=False), dtype=np.float32)) if len(images) else iter(())
        features.extend(next(vectors) if error is None else None for error in chunk_errors)
        errors.extend(chunk_errors)
    return pd.DataFrame({"features": features, "error": errors})


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
        model = _model(model_key, weights_broadcast, settings)
        for batch in paths:
            yield features_for_paths(model, batch.tolist(), settings.batch_size)

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
